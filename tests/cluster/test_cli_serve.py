"""`splitserve serve`'s vLLM-style flags: each lands in the config field its help names, a
flag wins over the YAML, which wins over the defaults; --help says so; `demo --help` ends
its sentences."""

from __future__ import annotations

import argparse
import contextlib
import io

import pytest

from app.cli import build_parser
from app.commands.serve import add_cluster_flags, load_config


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_cluster_flags(parser)
    return parser.parse_args(["--model", "m", *argv])


def _help(command: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        build_parser([command]).parse_args([command, "--help"])
    return out.getvalue()


def test_vllm_flags_set_both_pools_engines():
    config = load_config(_args(
        "--served-model-name", "my-llm", "--max-model-len", "1024", "--dtype", "bfloat16",
        "--block-size", "32", "--max-num-seqs", "12", "--max-num-batched-tokens", "256",
        "--gpu-memory-utilization", "0.5", "--no-enable-prefix-caching", "--api-key", "k"))
    assert config.model.name == "my-llm" and config.model.dtype == "bfloat16"
    assert config.router.api_key == "k"
    assert config.scheduler.block_size == 32  # must equal the pools' block size
    for pool in (config.prefill, config.decode):
        e = pool.engine
        assert (e.max_model_len, e.block_size, e.max_num_seqs, e.max_num_batched_tokens,
                e.gpu_memory_utilization, e.enable_prefix_caching) == (1024, 32, 12, 256, 0.5,
                                                                       False)
    assert load_config(_args("--enable-prefix-caching")).decode.engine.enable_prefix_caching
    assert load_config(_args("--enforce-eager")).prefill.engine.enforce_eager
    assert not load_config(_args()).prefill.engine.enforce_eager
    fp8 = load_config(_args("--kv-cache-dtype", "fp8_e4m3"))
    assert fp8.prefill.engine.kv_cache_dtype == fp8.decode.engine.kv_cache_dtype == "fp8_e4m3"


def test_a_flag_wins_over_the_yaml_and_an_absent_flag_keeps_it(tmp_path):
    yaml = tmp_path / "pool.yaml"
    yaml.write_text("model:\n  name: from-yaml\n"
                    "prefill:\n  engine:\n    max_num_seqs: 8\n    enable_prefix_caching: false\n"
                    "decode:\n  engine:\n    max_num_seqs: 9\n")
    kept = load_config(_args("--config", str(yaml)))
    assert kept.model.name == "from-yaml"
    assert (kept.prefill.engine.max_num_seqs, kept.decode.engine.max_num_seqs) == (8, 9)
    assert not kept.prefill.engine.enable_prefix_caching  # the YAML's, no flag given
    assert kept.decode.engine.enable_prefix_caching  # the default
    won = load_config(_args("--config", str(yaml), "--max-num-seqs", "16",
                            "--served-model-name", "from-flag", "--enable-prefix-caching"))
    assert won.model.name == "from-flag"
    assert (won.prefill.engine.max_num_seqs, won.decode.engine.max_num_seqs) == (16, 16)
    assert won.prefill.engine.enable_prefix_caching


def test_serve_help_lists_the_flags_and_the_precedence():
    text = _help("serve")
    for flag in ("--served-model-name", "--max-model-len", "--dtype", "--block-size",
                 "--max-num-seqs", "--max-num-batched-tokens", "--gpu-memory-utilization",
                 "--api-key", "--enable-prefix-caching", "--no-enable-prefix-caching",
                 "--autoscale", "--tls-cert"):
        assert flag in text, flag
    flat = " ".join(text.split())
    assert "a flag given on the command line wins over the --config YAML" in flat
    assert "CUDA workers only: refused with --device cpu" in flat


def test_demo_help_does_not_stop_mid_sentence():
    text = _help("demo")
    description = text.split("\n\n")[1]  # after the usage block
    assert " ".join(description.split()).endswith("and a latency table.")
    assert "RANDOM" in text.upper() and "random" in text
    for paragraph in text.split("\n\n")[1:]:
        assert paragraph.rstrip().endswith((".", ")")) or paragraph.lstrip().startswith(
            ("options:", "-")), paragraph


def test_pools_that_store_kv_differently_are_refused_at_start():
    """The KV moves between the pools as is: fp8 on one side and auto (or other scales) on
    the other is a one-line configuration error, not a failure of every request."""
    from cluster.config import ClusterConfig

    def config(prefill: dict, decode: dict, **extra) -> ClusterConfig:
        return ClusterConfig.model_validate({"prefill": {"engine": prefill},
                                             "decode": {"engine": decode}, **extra})

    fp8 = {"kv_cache_dtype": "fp8_e4m3", "k_scale": 0.5}
    assert config(fp8, fp8).decode.engine.k_scale == 0.5
    with pytest.raises(ValueError, match="must store KV alike.*fp8_e4m3.*auto"):
        config(fp8, {})
    with pytest.raises(ValueError, match="must store KV alike"):
        config(fp8, {**fp8, "v_scale": 2.0})
    assert config(fp8, {}, colocated=True)  # no transfer: the prefill section is unused
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        config({"kv_cache_dtype": "fp8"}, {})
