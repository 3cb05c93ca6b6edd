"""Sweeps on several processes: the same rows as a serial sweep, errors raised where the
sweep was called, and no process left behind when one fails or is killed."""

from __future__ import annotations

import multiprocessing
import multiprocessing.resource_tracker
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from app.cli import main as cli_main
from cluster.policy_config import SLOConfig
from cluster.simulator import SimConfig, synthetic
from cluster.simulator.parallel import SimulationProcessDied, default_jobs, map_in_processes
from cluster.simulator.sweep import sweep, sweep_tp


def _pid_and_sum(context: int, a: int, b: int) -> tuple[int, int]:
    return os.getpid(), context + a + b


def _fail_on_three(context: None, x: int) -> int:
    """3: fails at once; 0: a simulation that would run for a minute."""
    if x == 3:
        raise ValueError(f"bad input {x}")
    if x == 0:
        time.sleep(60)  # the minute-long simulation's work
    return x


def _killed_on_two(context: signal.Signals, x: int) -> int:
    if x == 2:
        os.kill(os.getpid(), context)
    if x == 0:
        time.sleep(60)  # the minute-long simulation's work
    return x


def _say_started_then_run(context: None, x: int) -> int:
    """A minute-long simulation that first says, on stdout, that it has started."""
    print(f"started {os.getpid()}", flush=True)
    time.sleep(60)  # the simulation's work (not a wait: nothing here is waited for)
    return x


class _DiesWhenLoaded:
    """A shared input whose loading kills the process loading it (as the OOM killer would
    while a process reads its copy of the trace)."""

    def __reduce__(self):
        return os._exit, (3,)


def _sweep_processes(parent: psutil.Process) -> list[psutil.Process]:
    """``parent``'s sweep processes (not its resource tracker)."""
    return [p for p in parent.children() if "spawn_main" in " ".join(p.cmdline())]


def _bad_input() -> None:
    raise ValueError("this input cannot be loaded")


class _FailsWhenLoaded:
    def __reduce__(self):
        return _bad_input, ()


def _children() -> set[int]:
    # multiprocessing's resource tracker lives as long as this process, by design: started
    # first, so that it counts as being here before
    multiprocessing.resource_tracker.ensure_running()
    return {p.pid for p in psutil.Process().children()}


def _assert_none_left(before: set[int]) -> None:
    """Every process started since ``before`` has exited within 5 s."""
    _assert_gone([p for p in psutil.Process().children() if p.pid not in before], 5)


def _assert_gone(procs: list[psutil.Process], timeout: float) -> None:
    """Each of ``procs`` exits within ``timeout`` s: waited on through a pidfd, which
    becomes readable when the process exits (without reaping it, which multiprocessing
    does for its own children; and not only for children of this process)."""
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            fd = os.pidfd_open(proc.pid)
        except ProcessLookupError:  # already gone
            continue
        try:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        finally:
            os.close(fd)
        assert ready, f"process {proc.pid} still runs"


def test_tasks_run_in_other_processes_and_come_back_in_input_order():
    progress = []
    out = map_in_processes(_pid_and_sum, [(i, 10 * i) for i in range(6)], 100, jobs=2,
                           progress=lambda done, n, r: progress.append((done, n)))
    assert [s for _, s in out] == [100 + 11 * i for i in range(6)]
    pids = {pid for pid, _ in out}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2
    assert progress == [(i, 6) for i in range(1, 7)]
    # jobs=1 stays in this process (no pool to start for a single core)
    assert {pid for pid, _ in map_in_processes(_pid_and_sum, [(1, 2)] * 3, 0)} == {os.getpid()}


def test_a_tasks_error_is_raised_at_once_and_stops_the_other_simulations():
    before, t0 = _children(), time.monotonic()
    with pytest.raises(ValueError, match="bad input 3"):  # one process fails on 3 while
        map_in_processes(_fail_on_three, [(0,), (3,), (1,), (2,)], None, jobs=2)  # one runs 0
    assert time.monotonic() - t0 < 20  # not after the minute-long one
    _assert_none_left(before)


def test_a_failed_sweep_ends_its_own_processes_only():
    # a process of someone else's that runs on (60 s: it cannot outlive a failed test long)
    other = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(60,))
    other.start()
    try:
        with pytest.raises(ValueError, match="bad input 3"):
            map_in_processes(_fail_on_three, [(0,), (3,)], None, jobs=2)
        assert other.is_alive()
    finally:
        other.terminate()
        other.join(5)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_process_ends_the_sweep_with_a_clear_error_not_a_hang(sig):
    """Its exit code is named, SIGTERM too (the sweep ends the others with SIGTERM)."""
    before, t0 = _children(), time.monotonic()
    with pytest.raises(SimulationProcessDied, match=rf"exit code -{int(sig)};.*fewer jobs"):
        map_in_processes(_killed_on_two, [(0,), (2,), (1,), (4,)], sig, jobs=2)
    assert time.monotonic() - t0 < 20
    _assert_none_left(before)


def test_a_process_that_dies_while_starting_ends_the_sweep_with_its_exit_code():
    before, t0 = _children(), time.monotonic()
    dies = (_DiesWhenLoaded(), bytes(1 << 20))  # more than a pipe holds
    with pytest.raises(SimulationProcessDied, match="exit code 3"):
        map_in_processes(_pid_and_sum, [(i, i) for i in range(4)], dies, jobs=2)
    assert time.monotonic() - t0 < 20
    _assert_none_left(before)


def test_an_input_that_cannot_be_loaded_is_the_tasks_error():
    before = _children()
    with pytest.raises(ValueError, match="cannot be loaded"):
        map_in_processes(_pid_and_sum, [(1, 2), (3, 4)], _FailsWhenLoaded(), jobs=2)
    _assert_none_left(before)


_SWEEP_THEN_WAIT = """
from cluster.simulator.parallel import map_in_processes
from tests.cluster.test_sim_parallel import _say_started_then_run
if __name__ == "__main__":
    map_in_processes(_say_started_then_run, [(0,), (1,)], None, jobs=2)
"""


def test_processes_exit_when_the_sweep_process_is_killed():
    """kill -9 of the process running a sweep: its processes, busy with minute-long
    simulations, exit instead of running on (each holds a copy of the trace), and remove
    the trace's file, which the killed process could not."""
    inputs = Path(tempfile.gettempdir())
    before = set(inputs.glob("splitserve-sweep-*"))
    sweeper = subprocess.Popen([sys.executable, "-c", _SWEEP_THEN_WAIT], cwd=os.getcwd(),
                               stdout=subprocess.PIPE, text=True)
    try:
        assert sweeper.stdout is not None
        started = [sweeper.stdout.readline() for _ in range(2)]  # both inside their task
        workers = [psutil.Process(int(line.split()[1])) for line in started]
        sweeper.kill()
        sweeper.wait(10)
        _assert_gone(workers, 10)
        assert set(inputs.glob("splitserve-sweep-*")) == before
    finally:
        if sweeper.poll() is None:
            sweeper.kill()
        for left in set(inputs.glob("splitserve-sweep-*")) - before:  # when the test failed
            shutil.rmtree(left)


def test_the_ctrl_c_handler_and_signal_mask_are_as_they_were_after_a_sweep():
    handler = signal.getsignal(signal.SIGINT)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, set())
    map_in_processes(_pid_and_sum, [(1, 2), (3, 4)], 0, jobs=2)
    with pytest.raises(ValueError):
        map_in_processes(_fail_on_three, [(3,), (1,)], None, jobs=2)
    assert signal.getsignal(signal.SIGINT) is handler
    assert signal.pthread_sigmask(signal.SIG_BLOCK, set()) == mask


def test_a_tp_sweep_on_two_processes_gives_the_serial_rows():
    trace = synthetic(4, 25, seed=5)
    base = SimConfig(model="llama-3-8b", slo=SLOConfig(ttft_s=0.3, itl_s=0.03))
    serial = sweep_tp(base, trace, 4, (1, 2), jobs=1)
    parallel = sweep_tp(base, trace, 4, (1, 2), jobs=2)
    assert len(serial["rows"]) == 7
    assert parallel == serial


def test_a_split_sweep_on_two_processes_gives_the_serial_rows():
    trace = synthetic(10, 15, seed=7)
    serial = sweep(SimConfig(), trace, total_gpus=4, chunk_sizes=[512, 2048], jobs=1)
    assert sweep(SimConfig(), trace, total_gpus=4, chunk_sizes=[512, 2048], jobs=2) == serial


def test_cli_sweep_refuses_zero_jobs_and_a_budget_too_small():
    common = ["simulate", "--synthetic", "--rate", "2", "--duration", "5", "--sweep"]
    with pytest.raises(SystemExit, match="--jobs must be at least 1"):
        cli_main([*common, "--jobs", "0"])
    with pytest.raises(SystemExit, match="cannot hold two pools"):
        cli_main([*common, "--gpus", "1", "--chunks", "512"])


def test_ctrl_c_ends_a_cli_sweep_and_its_processes_at_once_without_a_traceback():
    """SIGINT to the CLI's process group, as a terminal's Ctrl-C sends it, while two
    processes simulate (the first of 28 choices has been reported): the CLI exits 130 at
    once, says so, and leaves no process."""
    cli = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "simulate", "--synthetic", "--rate", "10",
         "--duration", "240", "--model", "llama-3-70b", "--sweep", "--gpus", "16",
         "--tp-choices", "2,4,8", "--jobs", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert cli.stderr is not None
        first = cli.stderr.readline()
        assert first.startswith("[1/28]"), first
        workers = _sweep_processes(psutil.Process(cli.pid))
        assert len(workers) == 2
        os.killpg(cli.pid, signal.SIGINT)
        _, err = cli.communicate(timeout=20)
    finally:
        if cli.poll() is None:
            os.killpg(cli.pid, signal.SIGKILL)
    assert cli.returncode == 130
    assert "interrupted" in err and "Traceback" not in err, err[-2000:]
    _assert_gone(workers, 5)


def test_default_jobs_is_the_affinity_capped_by_a_cgroup_quota(tmp_path):
    cores = len(os.sched_getaffinity(0))
    cpu_max = tmp_path / "cpu.max"
    assert default_jobs(cpu_max) == cores  # no cgroup v2 file
    cpu_max.write_text("max 100000\n")
    assert default_jobs(cpu_max) == cores
    cpu_max.write_text("50000 100000\n")  # half a core: still one process
    assert default_jobs(cpu_max) == 1
    cpu_max.write_text(f"{100000 * cores + 1} 100000\n")  # more than the affinity allows
    assert default_jobs(cpu_max) == cores
