"""Tensor-parallel workers, everything but Ray: the pool config field and its checks, the
serve flags that set it, a group's placement bundles, and the autoscaler's unit (a worker of
TP devices). Fast: no Ray, no model loaded (the head check reads config.json only)."""

from __future__ import annotations

import argparse

import pytest
from pydantic import ValidationError
from test_cli_startup import LLAMA, check_one_line, model_dir, serve

from app.commands.serve import add_cluster_flags, load_config
from cluster.autoscaler import WindowMetrics
from cluster.autoscaling import AutoscalingLoop
from cluster.config import ClusterConfig, PoolSection
from cluster.tp_group import bundles


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_cluster_flags(parser)
    return parser.parse_args(["--model", "m", *argv])


# -- config ------------------------------------------------------------------------------------
def test_tensor_parallel_size_defaults_to_one_and_reaches_the_engine():
    config = ClusterConfig()
    assert config.prefill.tensor_parallel_size == config.decode.tensor_parallel_size == 1
    pool = PoolSection.model_validate({"num_gpus": 1, "engine": {"tensor_parallel_size": 4}})
    assert pool.tensor_parallel_size == 4 and pool.gpus_per_worker == 4
    assert pool.engine.engine_options(config.model, "cuda")["tensor_parallel_size"] == 4
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        PoolSection.model_validate({"engine": {"tensor_parallel_size": 0}})


def test_the_collective_timeout_reaches_the_ranks_not_the_engine_constructor():
    """A hung rank (SIGSTOP'd, a wedged GPU) held a worker's requests for a fixed 60 s."""
    from cluster.tp_group import parallel_options
    from engine.parallel.launch import ParallelConfig

    pool = PoolSection.model_validate({"engine": {"tensor_parallel_size": 2,
                                                  "tp_collective_timeout_s": 5}})
    assert "tp_collective_timeout_s" not in pool.engine.engine_options(ClusterConfig().model,
                                                                       "cpu")
    options = parallel_options(None, "prefill-0", pool, "127.0.0.1")
    options.pop("launcher")
    assert ParallelConfig(2, **options).timeout_s == 5
    with pytest.raises(ValidationError, match="greater than 0"):
        PoolSection.model_validate({"engine": {"tp_collective_timeout_s": 0}})


def test_a_rank_takes_one_whole_gpu():
    with pytest.raises(ValidationError, match="each rank takes one whole GPU"):
        PoolSection.model_validate({"num_gpus": 0.5, "engine": {"tensor_parallel_size": 2}})
    with pytest.raises(ValidationError, match="each rank takes one whole GPU"):
        PoolSection.model_validate({"num_gpus": 2, "engine": {"tensor_parallel_size": 2}})
    assert PoolSection.model_validate({"num_gpus": 0.5}).gpus_per_worker == 0.5  # TP 1: shared


def test_a_size_that_cannot_split_the_model_is_one_line_before_ray(tmp_path):
    folder = model_dir(tmp_path / "m")  # 4 attention heads, 2 KV heads
    over = {"model": {"path": str(folder)}}
    ClusterConfig.model_validate({**over, "decode": {"engine": {"tensor_parallel_size": 2}}}
                                 ).check_tensor_parallel()
    bad = ClusterConfig.model_validate({**over, "prefill": {"engine": {
        "tensor_parallel_size": 3}}})
    with pytest.raises(ValueError, match=r"^prefill.engine.tensor_parallel_size=3 does not fit "
                       r"the model .*attention heads \(4\) is not divisible"):
        bad.check_tensor_parallel()
    colocated = ClusterConfig.model_validate({**over, "colocated": True, "prefill": {"engine": {
        "tensor_parallel_size": 3}}})
    colocated.check_tensor_parallel()  # no prefill pool when colocated
    ClusterConfig.model_validate({"model": {"path": str(tmp_path / "absent")}}
                                 ).check_tensor_parallel()  # TP 1 reads nothing
    check_one_line(*serve("--model", str(folder), "--grpc-port", "0", "--http-port", "0",
                          "--decode-tp", "3"),
                   "invalid configuration: decode.engine.tensor_parallel_size=3",
                   "attention heads (4) is not divisible by tensor_parallel_size=3")
    assert LLAMA["num_attention_heads"] == 4


# -- CLI ---------------------------------------------------------------------------------------
def test_serve_tp_flags_set_each_pool_and_win_over_the_yaml_and_the_alias(tmp_path):
    config = load_config(_args("--prefill-tp", "2", "--decode-tp", "1"))
    assert (config.prefill.tensor_parallel_size, config.decode.tensor_parallel_size) == (2, 1)
    both = load_config(_args("--tensor-parallel-size", "4"))
    assert (both.prefill.tensor_parallel_size, both.decode.tensor_parallel_size) == (4, 4)
    mixed = load_config(_args("-tp", "4", "--decode-tp", "1"))
    assert (mixed.prefill.tensor_parallel_size, mixed.decode.tensor_parallel_size) == (4, 1)
    yaml = tmp_path / "pool.yaml"
    yaml.write_text("prefill:\n  engine:\n    tensor_parallel_size: 2\n")
    kept = load_config(_args("--config", str(yaml)))
    assert (kept.prefill.tensor_parallel_size, kept.decode.tensor_parallel_size) == (2, 1)
    won = load_config(_args("--config", str(yaml), "--prefill-tp", "8"))
    assert won.prefill.tensor_parallel_size == 8


# -- placement ---------------------------------------------------------------------------------
def test_a_group_has_one_bundle_per_rank_and_the_worker_resources_once():
    gpu = PoolSection.model_validate({"num_gpus": 1, "num_cpus": 4, "accelerator_type": "H100",
                                      "resources": {"splitserve_prefill": 1},
                                      "engine": {"tensor_parallel_size": 3}})
    assert bundles(gpu) == [
        {"CPU": 4, "GPU": 1, "splitserve_prefill": 1, "accelerator_type:H100": 0.001},
        {"CPU": 4, "GPU": 1}, {"CPU": 4, "GPU": 1}]
    cpu = PoolSection.model_validate({"num_cpus": 0.5, "engine": {"tensor_parallel_size": 2}})
    assert bundles(cpu) == [{"CPU": 0.5}, {"CPU": 0.5}]


# -- autoscaler --------------------------------------------------------------------------------
class _Cluster:
    """What the loop reads of a cluster at construction."""

    def __init__(self, config: ClusterConfig) -> None:
        from types import SimpleNamespace

        self.config = config
        self.backend = SimpleNamespace(window=None)


def _loop(prefill_tp: int, decode_tp: int) -> AutoscalingLoop:
    config = ClusterConfig.model_validate({
        "prefill": {"replicas": 2, "max_replicas": 8, "num_gpus": 1,
                    "engine": {"tensor_parallel_size": prefill_tp}},
        "decode": {"replicas": 3, "max_replicas": 8, "num_gpus": 1,
                   "engine": {"tensor_parallel_size": decode_tp}},
        "autoscaler": {"enabled": True, "max_total_replicas": 8}})
    return AutoscalingLoop(_Cluster(config), config.autoscaler_config(), config.slo)


def test_the_autoscaler_counts_a_worker_as_its_tp_devices():
    loop = _loop(prefill_tp=2, decode_tp=1)
    assert loop.autoscaler.gpus_per_worker == {"prefill": 2, "decode": 1}
    sizes = {"prefill": 2, "decode": 3}  # 2 x 2 + 3 x 1 = 7 of 8 GPUs
    slow_ttft = WindowMetrics(ttft_p=5.0, itl_p=0.001)
    # A prefill worker is 2 GPUs: 1 left is not one; and decode workers (1 GPU) cannot
    # change role into prefill ones.
    assert loop.autoscaler.decide(0.0, slow_ttft, sizes) == []
    (grow,) = loop.autoscaler.decide(0.0, WindowMetrics(ttft_p=0.01, itl_p=5.0), sizes)
    assert (grow.pool, grow.current, grow.target) == ("decode", 3, 4)  # the last GPU
    # The same pools at TP 1 have 3 GPUs left: prefill grows.
    (flat,) = _loop(1, 1).autoscaler.decide(0.0, slow_ttft, sizes)
    assert (flat.pool, flat.current) == ("prefill", 2) and flat.target > 2
