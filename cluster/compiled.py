"""The simulator's hot path compiled to C with mypyc: the same modules, about twice as fast.

A simulation at 1,000 GPUs is millions of events, each a pass through the simulator's loop,
a simulated worker and the real global scheduler's placement (``MODULES``). Interpreted,
that costs ~80 us per request on a slow host. mypyc (part of mypy) compiles those modules,
from the type annotations they already carry, into C extension modules: their classes become
native (attributes are struct fields) and calls between them C calls. The source stays the one
implementation; nothing is written twice.

Opt-in, per process: ``activate()`` before any of ``MODULES`` is imported. ``splitserve
simulate`` and the simulator benchmarks call it; library users, the live router and the test
suite run the interpreted modules unless they do. It builds once per source change, into a
cache keyed by the sources and the Python and mypy versions, then puts an import finder
first on ``sys.meta_path`` that loads ``MODULES`` from that build. A sweep's processes load
the same build (``use_build``, from ``cluster.simulator.parallel``). If anything fails (mypy
not installed, no C compiler, a type error in an edited module), ``activate`` says why and
the modules stay interpreted: same results, slower.

A build reads the types of the five modules and of the project modules they import
(``TYPED_IMPORTS``, part of its key: a type compiled in is never stale); every other module
reads as ``Any`` (a change there cannot matter, and does not force a compile). Compiled code
checks the values it receives against those types, where Python would not: what comes
from outside is converted where it enters (a trace's numbers in ``Simulation._arrive``, a
profile's in ``CostProfile.__post_init__``). Compiled classes cannot be subclassed by
interpreted ones (``cpu_profile.LiveSemanticsSimulation``, tests' fakes), nor their methods
replaced on an instance: such code runs in processes that do not activate.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

MODULES = (
    "cluster.placement_index",
    "cluster.placement",
    "cluster.global_scheduler",
    "cluster.simulator.worker",
    "cluster.simulator.loop",
)
"""Compiled together (calls between them are native). A module imported by these but not
listed stays interpreted and is called as any Python object."""

TYPED_IMPORTS = (
    "cluster.autoscaler",
    "cluster.policy_config",
    "cluster.simulator.config",
    "cluster.simulator.metrics",
    "cluster.simulator.profiles",
    "cluster.simulator.scaling",
    "engine.errors",
    "engine.prefix_hash",
    "engine.worker_stats",
)
"""The project modules that ``MODULES`` import: their types are read, so that values taken
from them are unboxed (floats, ints: ~12 % faster than reading them as ``Any``), and so
their sources are part of a build's key. Every other import reads as ``Any``. A test keeps
this list and ``UNTYPED_IMPORTS`` equal to what ``MODULES`` import."""

UNTYPED_IMPORTS = {
    "cluster.simulator.trace": "a trace's numbers may be numpy's: read as Any, and converted "
    "where the loop takes them (Simulation._arrive)",
}
"""Project modules that ``MODULES`` import but whose types the build must not trust."""

ENV_OFF = "SPLITSERVE_INTERPRETED"
"""Set (to anything but empty or 0): ``activate`` does nothing and the modules run interpreted."""

_ROOT = Path(__file__).resolve().parent.parent  # holds the package ``cluster``
_GROUP = "splitserve_compiled"  # mypyc's shared library: <group>__mypyc
_KEEP = 4  # builds kept per cache (other checkouts, other versions), most recently used
_TIMEOUT_S = 900  # a compile that takes longer is stuck: the lock must not wait on it forever
# mypy's configuration for the compile (no other file is read: not ~/.config/mypy, ...): the
# types of MODULES and TYPED_IMPORTS, every other import as Any, installed packages unread
_MYPY_INI = """[mypy]
follow_imports = skip
ignore_missing_imports = True
no_site_packages = True

[mypy-{typed}]
follow_imports = silent
""".format(typed=",".join(TYPED_IMPORTS))
# The compile, run in a fresh interpreter.
_BUILD = """
import sys
from mypyc.build import mypycify
from setuptools import setup
out, work, jobs, group, *files = sys.argv[1:]
flags = ["--config-file", work + "/mypy.ini", "--cache-dir", work + "/mypy"]
setup(name="splitserve-compiled",
      script_args=["build_ext", "--build-lib", out, "--build-temp", work, "--parallel", jobs],
      ext_modules=mypycify([*flags, *files], opt_level="3", target_dir=work + "/c",
                           group_name=group))
"""


class BuildError(RuntimeError):
    """The compile failed; the message says where (mypy's or the compiler's last lines)."""


def cache_root() -> Path:
    """``$SPLITSERVE_CACHE_DIR/compiled`` if set, else ``~/.cache/splitserve/compiled``."""
    base = os.environ.get("SPLITSERVE_CACHE_DIR")
    return (Path(base) if base else Path.home() / ".cache" / "splitserve") / "compiled"


def _source(root: Path, module: str) -> Path:
    return root.joinpath(*module.split(".")).with_suffix(".py")


def _sources(root: Path) -> dict[str, bytes]:
    """The sources a build is made from (``MODULES`` and ``TYPED_IMPORTS``), read once: the
    build compiles these bytes, and its key hashes them."""
    return {m: _source(root, m).read_bytes() for m in (*MODULES, *TYPED_IMPORTS)}


def build_key(root: Path = _ROOT, sources: dict[str, bytes] | None = None) -> str:
    """What a build depends on: the compiled sources and those whose types they read, the
    build script, this interpreter's extension ABI and the mypy version (its C runtime is
    compiled in)."""
    h = hashlib.sha256()
    try:
        mypy_version = importlib.metadata.version("mypy")
    except importlib.metadata.PackageNotFoundError:
        mypy_version = "none"
    for part in (sys.implementation.cache_tag, sysconfig.get_config_var("EXT_SUFFIX"),
                 mypy_version, _BUILD, _MYPY_INI):
        h.update(str(part).encode() + b"\0")
    for module, text in (sources if sources is not None else _sources(root)).items():
        h.update(module.encode() + b"\0" + text + b"\0")
    return h.hexdigest()[:20]


def build(root: Path = _ROOT, cache: Path | None = None,
          log: Callable[[str], None] | None = None) -> Path:
    """The build of ``root``'s sources in ``cache``, compiled now if it is not there (once:
    concurrent callers wait on a lock and share the result; ``log`` hears of a compile or a
    wait). Raises ``BuildError``, also when these sources failed to compile before (the
    failure's log is kept: deleting it lets the next call try again)."""
    if importlib.util.find_spec("mypyc") is None:
        raise BuildError("mypy is not installed: pip install 'splitserve[sim]' (or mypy)")
    cache = cache or cache_root()
    cache.mkdir(parents=True, exist_ok=True)
    sources = _sources(root)
    key = build_key(sources=sources)
    final = cache / key
    if _complete(final):  # it appears whole, by an atomic rename
        os.utime(final)  # most recently used
        return final
    with open(cache / f"{key}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if log is not None:
                log("waiting for another process that compiles the simulator")
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when that process ends, however
        failed = cache / f"{key}.log"
        if failed.exists():
            first = failed.read_text().partition("\n")[0]
            raise BuildError(f"{first} (it failed before; whole log: {failed}; delete it to "
                             "try again)")
        if not _complete(final):
            for left in cache.glob(f"{key}.*/"):  # a dead compile's (we hold its lock)
                shutil.rmtree(left, ignore_errors=True)
            if final.exists():
                _remove(final)
            if log is not None:
                log("compiling the simulator with mypyc (once per source change, about 30 s)")
            _compile(sources, cache, final)
            _prune(cache, keep=final)
    os.utime(final)
    return final


def _compile(sources: dict[str, bytes], cache: Path, final: Path) -> None:
    """Compile ``sources`` (copied into a tree of their own: an edit made meanwhile, or a
    module found on MYPYPATH, cannot slip into a build keyed by them) into ``final``."""
    with tempfile.TemporaryDirectory(prefix=f"{final.name}.", dir=cache) as tmp:
        src, out, work = Path(tmp) / "src", Path(tmp) / "out", Path(tmp) / "work"
        for module, text in sources.items():
            path = _source(src, module)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(text)
            for package in path.relative_to(src).parents:  # packages: their modules' names
                (src / package / "__init__.py").touch()
        (src / "__init__.py").unlink()  # src itself is not a package
        work.mkdir()
        (work / "mypy.ini").write_text(_MYPY_INI)
        files = [str(_source(src, m)) for m in MODULES]
        cmd = [sys.executable, "-c", _BUILD, str(out), str(work), str(os.cpu_count() or 1),
               _GROUP, *files]
        env = {k: v for k, v in os.environ.items() if k != "MYPYPATH"}
        try:
            done = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True,
                                  timeout=_TIMEOUT_S, check=False)
            output, failed = done.stdout + done.stderr, done.returncode != 0
        except subprocess.TimeoutExpired:
            output, failed = f"error: the compile took more than {_TIMEOUT_S} s", True
        except OSError as e:
            raise BuildError(f"could not run {sys.executable}: {e}") from None
        if failed:
            log = cache / f"{final.name}.log"
            log.write_text(f"{_first_error(output)}\n\n{output}")
            raise BuildError(f"{_first_error(output)} (whole log: {log})")
        out.rename(final)  # whole or absent: the rename is atomic


def _first_error(output: str) -> str:
    """What failed, in a line: the first of mypy's or the C compiler's errors, else the
    build's last error (a compiler that fails without a word: name it)."""
    lines = output.strip().splitlines()
    errors = [ln for ln in lines if re.search(r": (fatal )?error:", ln)]
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        return errors[0] + more
    failed = [ln for ln in lines if ln.startswith("error:")] or lines[-1:] or ["no output"]
    command = re.match(r"error: command '\[?'?([^',\]]+)", failed[-1], re.I)
    if command:
        return f"the C compiler ({command.group(1)}) failed"
    return failed[-1][:300]


def _remove(build_dir: Path) -> None:
    """Delete a build: renamed first, so that no one finds it half deleted."""
    doomed = build_dir.with_name(f"{build_dir.name}.deleted.{os.getpid()}")
    build_dir.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)  # a process using it keeps its mapped files


def _prune(cache: Path, keep: Path) -> None:
    builds = sorted((p for p in cache.iterdir() if p.is_dir() and p != keep and "." not in p.name),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    for old in builds[_KEEP - 1:]:
        _remove(old)
        for leftover in (f"{old.name}.lock", f"{old.name}.log"):
            (cache / leftover).unlink(missing_ok=True)


def _files(build_dir: Path) -> dict[str, str]:
    """Module name -> its file in a build (``MODULES`` and mypyc's shared library)."""
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    files = {m: str(build_dir.joinpath(*m.split(".")).with_suffix("")) + suffix
             for m in MODULES}
    files[f"{_GROUP}__mypyc"] = str(build_dir / f"{_GROUP}__mypyc{suffix}")
    return files


def _complete(build_dir: Path) -> bool:
    return build_dir.is_dir() and all(os.path.isfile(f) for f in _files(build_dir).values())


class _Finder(importlib.abc.MetaPathFinder):
    """Loads ``MODULES`` (and mypyc's shared library) from one build."""

    def __init__(self, build_dir: Path) -> None:
        self.build_dir = build_dir
        self.files = _files(build_dir)

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: object = None) -> importlib.machinery.ModuleSpec | None:
        file = self.files.get(fullname)
        if file is None:
            return None
        loader = importlib.machinery.ExtensionFileLoader(fullname, file)
        return importlib.util.spec_from_file_location(fullname, file, loader=loader)


def active_build() -> Path | None:
    """The build this process loads ``MODULES`` from, if any."""
    for finder in sys.meta_path:
        if isinstance(finder, _Finder):
            return finder.build_dir
    return None


def _imported() -> list[str]:
    return [m for m in MODULES if m in sys.modules]


def turned_off() -> bool:
    """``ENV_OFF`` asks for the interpreted modules."""
    return os.environ.get(ENV_OFF, "") not in ("", "0")


def activate(log: Callable[[str], None] | None = None) -> str | None:
    """Load ``MODULES`` compiled from now on, building them first if needed (about 30 s,
    once per source change; ``log`` hears of it). Returns None when they will load
    compiled, else why not (they stay interpreted: same results, slower)."""
    if turned_off():
        return f"{ENV_OFF} is set"
    if active_build() is not None:
        return None
    if _imported():
        return f"{', '.join(_imported())} already imported (activate first)"
    try:
        build_dir = build(cache=cache_root(), log=log)
    except (BuildError, OSError, RuntimeError) as e:  # RuntimeError: no home directory
        return f"the compile failed: {e}"
    sys.meta_path.insert(0, _Finder(build_dir))
    return None


def use_unless_interpreted(interpreted: bool, log: Callable[[str], None]) -> None:
    """What the simulator's entry points do: ``activate`` unless the interpreted modules are
    asked for (their ``--interpreted``, or ``ENV_OFF``), and say when it cannot."""
    if interpreted or turned_off():
        return
    why = activate(log=log)
    if why is not None:
        log(f"the simulator runs interpreted (about 2x slower): {why}")


def use_build(build_dir: Path | None) -> bool:
    """In a process started by one that activated (a sweep's): load ``MODULES`` from the
    same build, if it is whole, built from these sources, and none of them is imported yet."""
    if (build_dir is None or turned_off() or active_build() is not None or _imported()
            or build_dir.name != build_key() or not _complete(build_dir)):
        return False
    sys.meta_path.insert(0, _Finder(build_dir))
    return True
