"""The simulator compiled with mypyc (``cluster.compiled``) decides and measures exactly what the
interpreted one does, is built once however many processes ask, is never used for sources it
was not built from, and falls back to the interpreted modules when the compile fails.

Compiling takes ~25 s on 2 cores: the equivalence test builds once into its own cache (two
processes at once, to test the lock); the other tests do not compile.
"""

from __future__ import annotations

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

# Run in a fresh process: activate, check that MODULES load compiled (here and in a spawned
# process, as a sweep's would), run the placement-equivalence workloads, print the outcomes.
COMPILED_RUN = textwrap.dedent("""
    import json, sys, sysconfig
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing
    from cluster import compiled

    def loaded_compiled():
        import cluster.simulator.loop  # noqa: F401 (imports every module of the build)
        suffix = sysconfig.get_config_var("EXT_SUFFIX")
        return [m for m in compiled.MODULES if sys.modules[m].__file__.endswith(suffix)]

    if __name__ == "__main__":
        why = compiled.activate(log=lambda line: print(line, file=sys.stderr))
        assert why is None, why
        here = loaded_compiled()
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            child = pool.submit(loaded_compiled).result()
        from tests.cluster.test_sim_compiled import outcomes
        print(json.dumps({"here": here, "child": child, "outcomes": outcomes()}))
""")


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
    # JSON text: exact floats (repr round-trips), and NaN (unfinished) equal to NaN
    return json.loads(json.dumps(out, sort_keys=True))


def _env(cache: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in (compiled.ENV_BUILD, compiled.ENV_OFF)}
    return {**env, "SPLITSERVE_CACHE_DIR": str(cache), "PYTHONPATH": str(ROOT), **extra}


@pytest.mark.slow
def test_compiled_simulator_equals_the_interpreted_one_and_is_built_once(tmp_path):
    script = tmp_path / "compiled_run.py"
    script.write_text(COMPILED_RUN)
    cache = tmp_path / "cache"
    runs = [subprocess.Popen([sys.executable, str(script)], cwd=ROOT, env=_env(cache),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]  # at once: the second waits on the first's build
    results = [run.communicate(timeout=600) for run in runs]
    for run, (_, err) in zip(runs, results, strict=True):
        assert run.returncode == 0, err[-3000:]
    logs = "".join(err for _, err in results)
    assert logs.count("compiling the simulator") == 1, logs
    assert logs.count("waiting for another process") == 1, logs
    builds = [p for p in (cache / "compiled").iterdir() if p.is_dir()]
    assert [p.name for p in builds] == [compiled.build_key()]

    interpreted = outcomes()
    for out, _ in results:
        got = json.loads(out)
        assert got["here"] == list(compiled.MODULES)
        assert got["child"] == list(compiled.MODULES)  # a spawned process inherits the build
        assert got["outcomes"]["direct"] == interpreted["direct"]
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
    shutil.copytree(ROOT / "cluster", dest / "cluster",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def test_a_build_is_keyed_by_its_sources(tmp_path):
    root = _copy_sources(tmp_path)
    assert compiled.build_key(root) == compiled.build_key()
    placement = root / "cluster" / "placement.py"
    placement.write_text(placement.read_text() + "\n# edited\n")
    assert compiled.build_key(root) != compiled.build_key()


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
    with pytest.raises(compiled.BuildError, match="it failed before .*delete it to try again"):
        compiled.build(root, cache=tmp_path / "cache")  # not compiled again on every run


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
    assert re.search(r"^simulated \d+ s in [\d.]+ s$", done.stdout, re.M), done.stdout


def test_a_build_of_other_sources_is_not_inherited(tmp_path):
    stale = tmp_path / "0123456789abcdef0123"  # a build dir whose key is not these sources'
    stale.mkdir()
    check = ("from cluster import compiled; import cluster.simulator.loop as loop; "
             "print(compiled.active_build(), loop.__file__.endswith('.py'))")
    for extra in ({compiled.ENV_BUILD: str(stale)},
                  {compiled.ENV_BUILD: str(_empty_build(tmp_path)), compiled.ENV_OFF: "1"}):
        done = subprocess.run([sys.executable, "-c", check], cwd=ROOT, text=True,
                              env=_env(tmp_path, **extra), capture_output=True, check=True)
        assert done.stdout.split() == ["None", "True"], extra


def _empty_build(tmp_path: Path) -> Path:
    """A directory named as these sources' build (empty: a process that used it would fail
    to import the simulator)."""
    path = tmp_path / "keyed" / compiled.build_key()
    path.mkdir(parents=True)
    return path


def test_activate_refuses_once_the_modules_are_imported_interpreted(monkeypatch):
    import cluster.simulator.loop as loop

    assert loop.__file__.endswith(".py")
    monkeypatch.setenv(compiled.ENV_OFF, "1")
    assert compiled.activate(compile_missing=False) == f"{compiled.ENV_OFF} is set"
    monkeypatch.delenv(compiled.ENV_OFF)
    why = compiled.activate(compile_missing=False)
    assert why is not None and "already imported" in why
    assert compiled.active_build() is None
    assert not loop.__file__.endswith(sysconfig.get_config_var("EXT_SUFFIX"))
