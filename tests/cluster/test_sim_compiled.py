"""The simulator compiled with mypyc (``cluster.compiled``) decides and measures exactly what the
interpreted one does (a sweep's processes too), is built once however many processes ask, is
never used for sources it was not built from, and falls back to the interpreted modules when
the compile fails.

A whole compile takes ~25 s on 2 cores: only the equivalence test runs one (two processes at
once, into a fresh cache, to test the lock). The failing-compile tests stop at mypy's check
or at the C compiler.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

from cluster import compiled
from tests.cluster.test_sim_placement_equivalence import DIRECT, SIMS

ROOT = Path(__file__).resolve().parents[2]

# Run in a fresh process: activate, check that MODULES load compiled (here and in a sweep's
# processes), run the placement-equivalence workloads and a sweep on two processes, print
# the outcomes.
COMPILED_RUN = textwrap.dedent("""
    import json, sys, sysconfig
    from cluster import compiled

    def loaded_compiled(context):
        import cluster.simulator.loop  # noqa: F401 (imports every module of the build)
        suffix = sysconfig.get_config_var("EXT_SUFFIX")
        return [m for m in compiled.MODULES if sys.modules[m].__file__.endswith(suffix)]

    if __name__ == "__main__":
        why = compiled.activate(log=lambda line: print(line, file=sys.stderr))
        assert why is None, why
        from cluster.simulator.parallel import map_in_processes
        from tests.cluster.test_sim_compiled import outcomes, split_sweep
        here = loaded_compiled(None)
        children = map_in_processes(loaded_compiled, [(), ()], None, jobs=2)
        print(json.dumps({"here": here, "children": children, "outcomes": outcomes(),
                          "sweep": split_sweep(jobs=2)}))
""")


def split_sweep(jobs: int) -> dict:
    """tests/cluster/test_sim_parallel.py's split sweep (as JSON text would give it back)."""
    from cluster.simulator import SimConfig, synthetic
    from cluster.simulator.sweep import sweep

    result = sweep(SimConfig(), synthetic(10, 15, seed=7), total_gpus=4,
                   chunk_sizes=[512, 2048], jobs=jobs)
    return json.loads(json.dumps(result, sort_keys=True))


def outcomes() -> dict:
    """Every decision of the direct scheduler workloads, and each simulation's whole result
    plus every request's first-token and finish times (a different placement moves them)."""
    from cluster.policy_config import SchedulerConfig
    from cluster.simulator import SimConfig, Simulation, synthetic
    from cluster.simulator.trace import with_shared_prefixes
    from tests.cluster.test_sim_placement_equivalence import direct_workload

    out: dict = {"direct": {name: direct_workload(name, 0) for name in DIRECT}, "sims": {}}
    for name, (policy, sched_kw, cfg_kw, rate, groups) in SIMS.items():
        trace = synthetic(rate, 12, seed=11, prompt_median=400)
        if groups:
            trace = with_shared_prefixes(trace, groups, 512, seed=3)
        sim = Simulation(SimConfig(scheduler=SchedulerConfig(**sched_kw), **cfg_kw), trace,
                         policy=policy)
        result = sim.run()
        out["sims"][name] = {"result": result, "first_token": sim.rec.first_token.tolist(),
                             "finish": sim.rec.finish.tolist()}
    out["odd_inputs"] = odd_inputs()
    # JSON text: exact floats (repr round-trips), and NaN (unfinished) equal to NaN
    return json.loads(json.dumps(out, sort_keys=True))


def odd_inputs() -> dict:
    """Inputs Python takes and a compiled class would refuse unless they are converted where
    they enter: a trace (a tuple) of numpy numbers, a profile with a float capacity and an
    int latency, a policy object instead of its name, a sweep's numpy GPU count and chunks."""
    import numpy as np

    from cluster.placement import KVAwarePolicy
    from cluster.simulator import SimConfig, TraceRequest, resolve_profile, simulate, synthetic

    trace = tuple(TraceRequest(np.float64(r.arrival_s), np.int64(r.prompt_tokens),
                               np.int64(r.output_tokens)) for r in synthetic(20, 8, seed=2))
    profile = resolve_profile("H100", "llama-3-8b", 1).with_(kv_capacity_tokens=4.4e5,
                                                             transfer_latency_s=0)
    from cluster.simulator.sweep import sweep

    result = simulate(SimConfig(num_prefill=1, num_decode=2), trace, profile, KVAwarePolicy())
    swept = sweep(SimConfig(), trace[:60], np.int64(3), np.array([512]))
    return json.loads(json.dumps({"result": result, "sweep": swept}, sort_keys=True))


def _env(cache: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != compiled.ENV_OFF}
    return {**env, "SPLITSERVE_CACHE_DIR": str(cache), "PYTHONPATH": str(ROOT), **extra}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_compiled_simulator_equals_the_interpreted_one_and_is_built_once(tmp_path):
    script = tmp_path / "compiled_run.py"
    script.write_text(COMPILED_RUN)
    cache = tmp_path / "cache"

    def start() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(script)], cwd=ROOT, env=_env(cache),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    first = start()
    assert first.stderr is not None
    compiling = first.stderr.readline()
    assert compiling.startswith("compiling the simulator"), compiling
    runs = [first, start()]  # the second asks while the first compiles: it must wait
    results = [run.communicate(timeout=800) for run in runs]
    for run, (_, err) in zip(runs, results, strict=True):
        assert run.returncode == 0, err[-3000:]
    assert results[0][1] == "" and results[1][1].startswith("waiting for another process")
    assert "compiling" not in results[1][1], results[1][1]
    builds = [p for p in (cache / "compiled").iterdir() if p.is_dir()]
    assert [p.name for p in builds] == [compiled.build_key()]

    cli = subprocess.run(  # and the CLI finds that build and runs compiled
        [str(Path(sys.executable).with_name("splitserve")), "simulate", "--synthetic", "--rate",
         "5", "--duration", "5", "--prefill", "1", "--decode", "1"], cwd=tmp_path,
        env=_env(cache), capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0 and cli.stderr == "", cli.stderr
    assert re.search(r"^simulated \d+ s in [\d.]+ s \(compiled with mypyc\)$", cli.stdout, re.M)

    assert sys.modules["cluster.simulator.loop"].__file__.endswith(".py")  # this process's
    interpreted = outcomes()
    sweep = split_sweep(jobs=1)
    for out, _ in results:
        got = json.loads(out)
        assert got["here"] == list(compiled.MODULES)
        assert got["children"] == [list(compiled.MODULES)] * 2  # a sweep's use the build too
        assert got["sweep"] == sweep
        assert got["outcomes"]["direct"] == interpreted["direct"]
        assert got["outcomes"]["odd_inputs"] == interpreted["odd_inputs"]
        assert interpreted["odd_inputs"]["result"]["finished"] > 100
        for name in SIMS:
            mine, theirs = got["outcomes"]["sims"][name], interpreted["sims"][name]
            assert mine["first_token"] == theirs["first_token"], name
            assert mine["finish"] == theirs["finish"], name
            assert mine["result"] == theirs["result"], name
    # and the direct workloads are the scanning code's decisions (the recorded fixture)
    recorded = json.loads(Path(ROOT, "tests/cluster/test_sim_placement_fixture.json").read_text())
    for name in DIRECT:
        assert interpreted["direct"][name] == recorded["direct"][f"{name}/0"]


def _copy_sources(dest: Path) -> Path:
    for package in ("cluster", "engine"):
        shutil.copytree(ROOT / package, dest / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def test_the_typed_imports_are_what_the_compiled_modules_import():
    """A project module the compiled ones import is either typed (in the build's key) or
    deliberately untyped: one added to the compiled modules without a decision fails here."""
    imported = set()
    for module in compiled.MODULES:
        tree = ast.parse(ROOT.joinpath(*module.split(".")).with_suffix(".py").read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
                     if isinstance(node, ast.ImportFrom) and node.module else [])
            imported |= {n for n in names
                         if ROOT.joinpath(*n.split(".")).with_suffix(".py").is_file()}
    assert imported - set(compiled.MODULES) == (
        set(compiled.TYPED_IMPORTS) | set(compiled.UNTYPED_IMPORTS))


def test_a_build_is_keyed_by_its_sources(tmp_path):
    root = _copy_sources(tmp_path)
    assert compiled.build_key(root) == compiled.build_key()
    keys = {compiled.build_key()}
    for edited in ("placement.py", "simulator/profiles.py"):  # compiled; typed import
        source = root / "cluster" / edited
        source.write_text(source.read_text() + "\n# edited\n")
        keys.add(compiled.build_key(root))
    assert len(keys) == 3
    untyped = root / "cluster" / "simulator" / "trace.py"
    untyped.write_text(untyped.read_text() + "\n# edited\n")
    assert compiled.build_key(root) in keys  # its types are not compiled in


@pytest.mark.slow
def test_a_failed_compile_says_where(tmp_path):
    root = _copy_sources(tmp_path)
    placement = root / "cluster" / "placement.py"
    placement.write_text(placement.read_text() + '\n\nBROKEN: int = "not an int"\n')
    with pytest.raises(compiled.BuildError) as e:
        compiled.build(root, cache=tmp_path / "cache")
    assert "placement.py" in str(e.value) and "error" in str(e.value)
    assert str(e.value).count("\n") < 5  # the errors, not the whole log
    key = compiled.build_key(root)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [f"{key}.lock", f"{key}.log"]
    again = r"placement.py:\d+: error: .*\(it failed before; whole log: .*delete it to try again"
    with pytest.raises(compiled.BuildError, match=again):
        compiled.build(root, cache=tmp_path / "cache")  # not compiled again on every run


@pytest.mark.slow
def test_simulate_runs_interpreted_when_the_compiler_fails(tmp_path):
    cli = Path(sys.executable).with_name("splitserve")
    done = subprocess.run(
        [str(cli), "simulate", "--synthetic", "--rate", "5", "--duration", "5", "--prefill", "1",
         "--decode", "1"], cwd=tmp_path, env=_env(tmp_path / "cache", CC="false"),
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert ("the simulator runs interpreted (about 2x slower): the compile failed: "
            "the C compiler (false) failed (whole log: ") in done.stderr
    assert "Traceback" not in done.stderr
    assert re.search(r"^simulated \d+ s in [\d.]+ s \(interpreted\)$", done.stdout, re.M)


def _fake_build(path: Path) -> Path:
    """A build directory with every file a whole one has, all empty."""
    for file in compiled._files(path).values():
        Path(file).parent.mkdir(parents=True, exist_ok=True)
        Path(file).write_bytes(b"")
    return path


def test_a_sweep_process_uses_only_a_whole_build_of_these_sources(tmp_path):
    """``use_build`` (a sweep process's start, before the simulator is imported) refuses a
    build of other sources, an incomplete one, and any when ``SPLITSERVE_INTERPRETED`` is set;
    its acceptance of a good one is the equivalence test's. Each refused build here is whole
    but for the one thing it is refused for (its modules are empty files: loading one would
    fail the process)."""
    other = _fake_build(tmp_path / "other" / "0123456789abcdef0123")
    keyed = _fake_build(tmp_path / "keyed" / compiled.build_key())
    partial = _fake_build(tmp_path / "partial" / compiled.build_key())
    Path(compiled._files(partial)["cluster.simulator.loop"]).unlink()
    check = ("import sys; from pathlib import Path; from cluster import compiled; "
             "print(compiled.use_build(Path(sys.argv[1])), compiled.active_build()); "
             "import cluster.simulator.loop as loop; print(loop.__file__.endswith('.py'))")
    for build, extra in ((other, {}), (partial, {}), (keyed, {compiled.ENV_OFF: "1"})):
        done = subprocess.run([sys.executable, "-c", check, str(build)], cwd=ROOT, text=True,
                              env=_env(tmp_path, **extra), capture_output=True)
        assert done.stdout.split() == ["False", "None", "True"], (build, extra, done.stderr)


def test_a_build_missing_files_is_built_again(tmp_path, monkeypatch):
    """A build directory without all its modules (deleted by hand, or half pruned) is not
    used: the next build replaces it (the compile itself is stubbed: what is checked is the
    decision to compile)."""
    cache = tmp_path / "cache"
    partial = cache / compiled.build_key()
    (partial / "cluster").mkdir(parents=True)
    compiles: list[Path] = []

    def fake_compile(sources: dict, cache: Path, final: Path) -> None:
        compiles.append(final)
        _fake_build(final)

    monkeypatch.setattr(compiled, "_compile", fake_compile)
    assert compiled.build(cache=cache) == partial
    assert compiles == [partial]
    assert compiled.build(cache=cache) == partial  # whole now: not again
    assert compiles == [partial]


def test_without_mypy_the_build_says_how_to_get_it(monkeypatch, tmp_path):
    real = compiled.importlib.util.find_spec
    monkeypatch.setattr(compiled.importlib.util, "find_spec",
                        lambda name, *a: None if name == "mypyc" else real(name, *a))
    with pytest.raises(compiled.BuildError, match=r"pip install 'splitserve\[sim\]'"):
        compiled.build(cache=tmp_path)


def test_activate_refuses_once_the_modules_are_imported_interpreted(monkeypatch):
    import cluster.simulator.loop as loop

    assert loop.__file__.endswith(".py")
    monkeypatch.setenv(compiled.ENV_OFF, "1")
    assert compiled.activate() == f"{compiled.ENV_OFF} is set"
    monkeypatch.delenv(compiled.ENV_OFF)
    why = compiled.activate()  # refused before any build is looked for
    assert why is not None and "already imported" in why
    assert compiled.active_build() is None
    assert not loop.__file__.endswith(sysconfig.get_config_var("EXT_SUFFIX"))


def test_old_builds_are_pruned_to_the_most_recently_used(tmp_path):
    """Each source change makes a new build: beside the new one, the three most recently
    used stay (other checkouts, other versions) and the rest go, with their lock and log."""
    cache = tmp_path
    for i, name in enumerate("abcde"):
        build = cache / (name * 20)
        (build / "cluster").mkdir(parents=True)
        (cache / f"{build.name}.lock").touch()
        (cache / f"{build.name}.log").touch()
        os.utime(build, (1000 + i, 1000 + i))  # e most recent, a least
    (cache / ("a" * 20 + ".tmpcompile")).mkdir()  # a compile in progress: not a build
    compiled._prune(cache, keep=cache / ("a" * 20))
    dirs = sorted(p.name for p in cache.iterdir() if p.is_dir())
    assert dirs == ["a" * 20, "a" * 20 + ".tmpcompile", "c" * 20, "d" * 20, "e" * 20]
    assert not (cache / ("b" * 20 + ".lock")).exists()
    assert not (cache / ("b" * 20 + ".log")).exists()
    assert (cache / ("c" * 20 + ".lock")).exists()
