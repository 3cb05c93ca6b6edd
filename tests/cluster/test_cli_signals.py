"""`splitserve serve` ends on SIGTERM (what Kubernetes and systemd send) and on SIGINT
(Ctrl-C) the same way: it shuts the cluster down and exits 0, with no traceback. Before,
uvicorn took SIGTERM while it served and handed it on to Ray's handler, which made it
SystemExit(15): the process exited 15 in the middle of its shutdown."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_shuts_down_cleanly_on_a_signal(tmp_path, sig):
    from engine.make_model import ensure_model

    model = ensure_model("llama", "tiny", seed=0)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("SPLITSERVE_API_KEY", None)
    err_path = tmp_path / "serve.err"
    with open(err_path, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--model", str(model), "--prefill", "1",
             "--decode", "1", "--device", "cpu", "--host", "127.0.0.1",
             "--http-port", str(_free_port()), "--grpc-port", str(_free_port())],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        try:
            deadline = time.monotonic() + 180
            lines = []
            while not any(line.startswith("splitserve ready") for line in lines):
                line = proc.stdout.readline()
                assert line or proc.poll() is None, err_path.read_text()[-3000:]
                assert time.monotonic() < deadline, "never ready"
                lines.append(line)
            proc.send_signal(sig)
            rc = proc.wait(90)
            rest = proc.stdout.read()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
    stderr = err_path.read_text()
    assert rc == 0, stderr[-3000:]
    assert "shutting down..." in rest
    for trace in ("Traceback", "never retrieved", "destroyed but it is pending"):
        assert trace not in stderr, stderr[-3000:]
