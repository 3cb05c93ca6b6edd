"""`splitserve serve` start-up feedback: a missing or unusable model directory, a bad config,
a taken HTTP or gRPC port are each one clear line on stderr and exit code 2 within two
seconds, before Ray (not even imported). Workers report their KV cache capacity and warm-up
to the driver, and the warm-up leaves no trace."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LLAMA = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
         "vocab_size": 256, "max_position_embeddings": 512, "hidden_act": "silu"}

# Runs the CLI in a fresh interpreter; reports the CPU seconds the whole process took
# (interpreter start-up and imports included: on an idle machine that is its wall time, and
# unlike wall time it does not grow with other load on a shared test machine) and whether
# it imported ray.
PROBE = """
import sys, time
from app.cli import main
rc = main(sys.argv[1:])
print(f"cpu={time.process_time():.3f} ray={'ray' in sys.modules}")
sys.exit(rc)
"""


def model_dir(root: Path, config: dict | None = LLAMA, weights: bool = True,
              tokenizer: bool = True) -> Path:
    """A folder that passes (or, with parts left out, fails) the pre-start checks."""
    root.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (root / "config.json").write_text(json.dumps(config))
    if weights:
        (root / "model.safetensors").write_bytes(b"\0" * 16)
    if tokenizer:
        (root / "tokenizer.json").write_text("{}")
    return root


def serve(*argv: str) -> tuple[int, str, float, bool]:
    """(exit code, stderr, CPU seconds of the process, whether ray was imported)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("SPLITSERVE_API_KEY", None)
    done = subprocess.run([sys.executable, "-c", PROBE, "serve", *argv], capture_output=True,
                          text=True, timeout=60, cwd=ROOT, env=env)
    stats = dict(kv.split("=") for kv in done.stdout.split()[-2:])
    return done.returncode, done.stderr, float(stats["cpu"]), stats["ray"] == "True"


def check_one_line(code: int, err: str, cpu_s: float, ray: bool, *expected: str) -> None:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("splitserve serve: ")
    for text in expected:
        assert text in lines[0], lines[0]
    assert "Traceback" not in err and not ray
    assert cpu_s < 2.0


def test_missing_model_directory(tmp_path):
    missing = tmp_path / "nope"
    check_one_line(*serve("--model", str(missing), "--grpc-port", "0", "--http-port", "0"),
                   f"model directory {missing} does not exist", "--model")


@pytest.mark.parametrize(("parts", "expected"), [
    ({"config": None}, "no config.json in"),
    ({"weights": False}, "no weights in"),
    ({"tokenizer": False}, "no tokenizer in"),
    ({"config": {**LLAMA, "architectures": ["GPT2LMHeadModel"]}},
     "unsupported model architecture 'GPT2LMHeadModel'; supported architectures: "),
    ({"config": {"architectures": ["LlamaForCausalLM"]}}, "config.json cannot be used"),
])
def test_unusable_model_directory(tmp_path, parts, expected):
    folder = model_dir(tmp_path / "m", **parts)
    check_one_line(*serve("--model", str(folder), "--grpc-port", "0", "--http-port", "0"),
                   expected)


def test_bad_config(tmp_path):
    folder = model_dir(tmp_path / "m")
    yaml = tmp_path / "pool.yaml"
    yaml.write_text("prefill:\n  replicas: -1\n  colour: blue\n")
    check_one_line(*serve("--model", str(folder), "--config", str(yaml)),
                   "invalid configuration: ", "prefill.replicas: ", "prefill.colour: ")
    check_one_line(*serve("--model", str(folder), "--config", str(tmp_path / "absent.yaml")),
                   "invalid configuration: cannot read pool config")


@pytest.mark.parametrize("which", ["http", "grpc"])
def test_port_in_use(tmp_path, which):
    folder = model_dir(tmp_path / "m")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        ports = {"grpc": ["--grpc-port", str(port), "--http-port", "0"],
                 "http": ["--grpc-port", "0", "--http-port", str(port)]}[which]
        what = {"grpc": "gRPC", "http": "HTTP"}[which]
        check_one_line(*serve("--model", str(folder), *ports),
                       f"{what} port {port} on 127.0.0.1 is already in use", f"--{which}-port")


def test_gpu_memory_utilization_is_refused_on_cpu(tmp_path):
    folder = model_dir(tmp_path / "m")
    check_one_line(*serve("--model", str(folder), "--device", "cpu", "--grpc-port", "0",
                          "--http-port", "0", "--gpu-memory-utilization", "0.5"),
                   "--gpu-memory-utilization applies to CUDA workers only")
    # the same setting written in the pool config is refused the same way, not ignored
    config = tmp_path / "pool.yaml"
    config.write_text("decode:\n  engine:\n    gpu_memory_utilization: 0.5\n")
    check_one_line(*serve("--model", str(folder), "--device", "cpu", "--grpc-port", "0",
                          "--http-port", "0", "--config", str(config)),
                   "decode.engine.gpu_memory_utilization applies to CUDA workers only")


def test_the_same_port_twice(tmp_path):
    folder = model_dir(tmp_path / "m")
    check_one_line(*serve("--model", str(folder), "--grpc-port", "24123", "--http-port",
                          "24123"), "both given port 24123")


def test_startup_report_line_and_warmup_leaves_no_trace():
    """The worker's report gives the KV line the driver prints; warm-up caches no prefix,
    counts no query, and leaves every block free."""
    from app.commands.startup_report import worker_line
    from engine.engine_host import EngineHost
    from engine.make_model import ensure_model

    model = ensure_model("llama", "tiny", seed=0)
    host = EngineHost("decode-0", "decode", str(model),
                      {"device": "cpu", "block_size": 16, "max_num_seqs": 8,
                       "max_num_batched_tokens": 128, "max_model_len": 256,
                       "num_blocks": 64}, lambda outs: None)
    try:
        report = host.startup_report()
        assert report["num_blocks"] == 64 and report["block_size"] == 16
        assert report["warmup_s"] is not None and report["warmup_s"] > 0
        line = worker_line("decode-0", report)
        assert "decode-0" in line and "KV cache: 64 blocks = 1024 tokens" in line
        engine = host.engine
        assert engine.pool.num_free == 64 and engine.pool.cached_hashes() == []
        assert engine.kv_manager.num_prefix_queries == 0
        engine.check_integrity()
        t0 = time.perf_counter()
        assert engine.warmup() < 60 and time.perf_counter() - t0 < 60
        assert engine.pool.enable_prefix_caching  # switched back on after
    finally:
        host.shutdown()


def test_report_workers_prints_one_line_per_worker(capsys, caplog):
    """The driver asks each registered worker for its start-up report (Ray actors' logs do
    not reach it); a worker lost meanwhile is a warning, not a failed start."""
    import asyncio
    from types import SimpleNamespace

    from app.commands.startup_report import report_workers

    class Handle:
        def __init__(self, report):
            self.report = report

        async def startup_report(self):
            if self.report is None:
                raise RuntimeError("worker prefill-1 is gone")
            return self.report

    good = {"num_blocks": 10, "block_size": 16, "kv_cache_bytes": 2**20, "load_s": 1.5,
            "warmup_s": 0.25}
    cluster = SimpleNamespace(backend=SimpleNamespace(workers={
        "prefill-1": Handle(None), "decode-0": Handle(good)}))
    asyncio.run(report_workers(cluster, 3.25))
    out = capsys.readouterr().out.splitlines()
    assert out == ["  decode-0   KV cache: 10 blocks = 160 tokens (1.0 MiB); engine loaded in "
                   "1.5 s, warm-up 0.25 s", "cluster up in 3.2 s"]
    assert "prefill-1 did not report its start-up" in caplog.text


def test_model_dtype_names_the_engine_accepts_pass_and_others_do_not(tmp_path):
    from app.commands.preflight import PreflightError, check_model_dir

    folder = model_dir(tmp_path / "m")
    for name in ("float32", "bf16", "half"):
        check_model_dir(str(folder), name)
    with pytest.raises(PreflightError, match="model.dtype='float8' is not supported"):
        check_model_dir(str(folder), "float8")


def test_weights_are_not_required_on_the_driver_of_a_remote_ray_cluster(tmp_path):
    """Joining a Ray cluster, the workers read the weights on their own nodes; the router's
    machine needs config.json and the tokenizer only."""
    from types import SimpleNamespace

    from app.commands.preflight import PreflightError, check_all

    folder = model_dir(tmp_path / "m", weights=False)

    def config(address):
        return SimpleNamespace(
            model=SimpleNamespace(path=str(folder), dtype="float32", device="auto"),
            router=SimpleNamespace(host="127.0.0.1", grpc_port=0, http_port=0),
            ray=SimpleNamespace(address=address))

    check_all(config("ray://head:10001"), gpu_memory_flag=False)
    with pytest.raises(PreflightError, match="no weights in"):
        check_all(config(None), gpu_memory_flag=False)
