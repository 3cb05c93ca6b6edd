"""`splitserve serve` ends on SIGTERM (what Kubernetes and systemd send) and on SIGINT
(Ctrl-C) the same way: it drains, shuts the cluster down and exits 0, with no traceback.
Before, uvicorn took SIGTERM while it served and handed it on to Ray's handler, which made it
SystemExit(15): the process exited 15 in the middle of its shutdown. And the servers were
stopped before the requests in flight ended, so every stream was cut mid-way (no
finish_reason, no [DONE]); now a stream in flight finishes (SIGTERM), or ends with "abort"
when a second signal asks for a quick stop (Ctrl-C twice)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Stream(threading.Thread):
    """A long streaming completion, read to its end."""

    def __init__(self, port: int, model: str, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.port, self.model, self.max_tokens = port, model, max_tokens
        self.events: list[dict] = []
        self.done, self.error = False, None
        self.flowing = threading.Event()

    def run(self) -> None:
        body = {"model": self.model, "prompt": "hi", "max_tokens": self.max_tokens,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        try:
            with httpx.stream("POST", f"http://127.0.0.1:{self.port}/v1/completions",
                              json=body, timeout=60) as resp:
                assert resp.status_code == 200, resp.read()
                for line in resp.iter_lines():
                    if line == "data: [DONE]":
                        self.done = True
                    elif line.startswith("data: "):
                        self.events.append(json.loads(line[6:]))
                        if len(self.events) >= 5:
                            self.flowing.set()
        except Exception as exc:  # the test reads it: a cut stream raises here
            self.error = exc
        finally:
            self.flowing.set()

    def finish_reason(self) -> str | None:
        reasons = [c["finish_reason"] for e in self.events for c in e["choices"]]
        return next((r for r in reversed(reasons) if r), None)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_drains_and_shuts_down_cleanly_on_a_signal(tmp_path, sig):
    """SIGTERM: the stream in flight finishes (length, all its tokens, [DONE]); SIGINT
    twice: it ends at once with "abort" and [DONE]. Either way, exit 0."""
    from engine.make_model import ensure_model

    model = ensure_model("llama", "tiny", seed=0)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("SPLITSERVE_API_KEY", None)
    err_path = tmp_path / "serve.err"
    http_port = _free_port()
    with open(err_path, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--model", str(model), "--prefill", "1",
             "--decode", "1", "--device", "cpu", "--host", "127.0.0.1",
             "--http-port", str(http_port), "--grpc-port", str(_free_port())],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        try:
            deadline = time.monotonic() + 180
            lines = []
            while not any(line.startswith("splitserve ready") for line in lines):
                line = proc.stdout.readline()
                assert line or proc.poll() is None, err_path.read_text()[-3000:]
                assert time.monotonic() < deadline, "never ready"
                lines.append(line)
            card = httpx.get(f"http://127.0.0.1:{http_port}/v1/models",
                             timeout=10).json()["data"][0]
            stream = _Stream(http_port, card["id"], max_tokens=card["max_model_len"] - 8)
            stream.start()
            assert stream.flowing.wait(60) and stream.error is None
            at_signal = len(stream.events)
            proc.send_signal(sig)
            draining = ""  # the endpoints' lines, then the one printed as the drain begins
            while "shutting down:" not in draining:
                line = proc.stdout.readline()
                assert line, "the serve process ended before its drain began"
                draining += line
            if sig == signal.SIGINT:  # Ctrl-C again: no more waiting
                proc.send_signal(sig)
            stream.join(90)
            rc = proc.wait(90)
            rest = draining + proc.stdout.read()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
    stderr = err_path.read_text()
    assert rc == 0, stderr[-3000:]
    assert "shutting down: 1 request(s) in flight" in rest
    for trace in ("Traceback", "never retrieved", "destroyed but it is pending"):
        assert trace not in stderr, stderr[-3000:]
    assert stream.error is None and stream.done, (stream.error, stream.events[-2:])
    if sig == signal.SIGTERM:
        assert stream.finish_reason() == "length"
        assert stream.events[-1]["usage"]["completion_tokens"] == stream.max_tokens
        assert len(stream.events) > at_signal + 1  # it went on after the signal
    else:
        assert stream.finish_reason() == "abort"


def _serve_with_pools(tmp_path, pools_yaml: str) -> tuple[list[str], dict]:
    """The command and environment of a ``serve`` of the tiny model with ``pools_yaml``."""
    from engine.make_model import ensure_model

    model = ensure_model("llama", "tiny", seed=0)
    config = tmp_path / "pool.yaml"
    config.write_text(f"model: {{path: {model}, device: cpu}}\n{pools_yaml}")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("SPLITSERVE_API_KEY", None)
    return [sys.executable, "-m", "app.cli", "serve", "--config", str(config), "--host",
            "127.0.0.1", "--http-port", str(_free_port()), "--grpc-port",
            str(_free_port())], env


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_during_start_up_stops_it_at_once(tmp_path, sig):
    """Two workers of 2 CPUs on a local Ray of 2: the second waits for the first to go,
    which it never does; before, Ctrl-C was only read once start-up ended (up to
    worker_start_timeout_s, 300 s) and SIGTERM went to Ray's handler, which dumped a stack."""
    command, env = _serve_with_pools(
        tmp_path, "prefill: {num_cpus: 2}\ndecode: {num_cpus: 2}\nray: {num_cpus: 2}\n")
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        # The first worker ready holds both CPUs: from then on the other one is pending.
        for line in proc.stderr:
            if "cluster.pools: worker " in line and line.rstrip().endswith(" ready"):
                break
        assert proc.poll() is None
        t0 = time.monotonic()
        proc.send_signal(sig)
        rc = proc.wait(60)
        took = time.monotonic() - t0
        out, err = proc.stdout.read(), proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert rc == 128 + sig, err[-3000:]
    assert took < 30, took
    assert "stopping before the server was ready" in out
    for trace in ("Traceback", "SIGTERM received", "destroyed but it is pending"):
        assert trace not in err, err[-3000:]


@pytest.mark.timeout(120)
def test_a_worker_no_local_node_can_hold_is_one_line_at_once(tmp_path):
    """A local Ray is one node with no autoscaler: a worker asking for more than it has
    would wait out worker_start_timeout_s (300 s) in silence (Ray's 'infeasible' warning
    goes to its own log)."""
    command, env = _serve_with_pools(tmp_path, "prefill: {num_cpus: 64}\nray: {num_cpus: 2}\n")
    t0 = time.monotonic()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=90)
    assert done.returncode == 1, done.stderr[-3000:]
    assert time.monotonic() - t0 < 60
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("splitserve serve: a prefill worker asks for CPU 64 (this node "
                           "has 2)"), done.stderr[-3000:]
    assert "Traceback" not in done.stderr
