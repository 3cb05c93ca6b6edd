"""The simulator's hot path compiled to C with mypyc: the same modules, about twice as fast.

A simulation at 1,000 GPUs is millions of events, each a pass through the simulator's loop,
a simulated worker and the real global scheduler's placement (``MODULES``). Interpreted,
that costs ~80 us per request on a slow host. mypyc (part of mypy) compiles those modules,
from the type annotations they already carry, into C extension modules: their classes become
native (attributes are struct fields) and calls between them C calls. The source stays the one
implementation; nothing is written twice.

Opt-in, per process: ``activate()`` before any of ``MODULES`` is imported. ``splitserve
simulate`` and the simulator benchmarks call it; library users and the test suite run the
interpreted modules unless they do. It builds once per source change, into a cache keyed by
the sources and the Python and mypy versions (so an edited module is never shadowed by an
old build), then puts an import finder first on ``sys.meta_path`` that loads ``MODULES``
from that build. Processes started afterwards (a sweep's) inherit it through the environment
(``inherit_compiled_build``, run when ``cluster`` is imported). If anything fails (no C
compiler, a type error in an edited module), ``activate`` says why and the modules stay
interpreted: same results, slower.
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

ENV_BUILD = "SPLITSERVE_COMPILED_BUILD"
"""Set by ``activate`` to the build in use, so that processes started later use it too."""
ENV_OFF = "SPLITSERVE_INTERPRETED"
"""Set (to anything but empty or 0): ``activate`` does nothing and the modules run interpreted."""

_ROOT = Path(__file__).resolve().parent.parent  # holds the package ``cluster``
_GROUP = "splitserve_compiled"  # mypyc's shared library: <group>__mypyc
_KEEP = 4  # builds kept per cache (other checkouts, other versions), most recently used
# The compile, run in a fresh interpreter. Installed packages are not type-checked
# (--no-site-packages: their types read as Any): checking torch or pydantic takes minutes,
# and nothing of theirs is compiled.
_BUILD = """
import sys
from mypyc.build import mypycify
from setuptools import setup
out, work, jobs, group, *files = sys.argv[1:]
flags = ["--follow-imports=silent", "--ignore-missing-imports", "--no-site-packages",
         "--cache-dir", work + "/mypy"]
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


def build_key(root: Path = _ROOT) -> str:
    """What a build depends on: the compiled sources, the build script, this interpreter's
    extension ABI and the mypy version (its C runtime is compiled in)."""
    h = hashlib.sha256()
    try:
        mypy_version = importlib.metadata.version("mypy")
    except importlib.metadata.PackageNotFoundError:
        mypy_version = "none"
    for part in (sys.implementation.cache_tag, sysconfig.get_config_var("EXT_SUFFIX"),
                 mypy_version, _BUILD):
        h.update(str(part).encode() + b"\0")
    for module in MODULES:
        h.update(module.encode() + b"\0" + _source(root, module).read_bytes() + b"\0")
    return h.hexdigest()[:20]


def build(root: Path = _ROOT, cache: Path | None = None,
          log: Callable[[str], None] | None = None) -> Path:
    """The build of ``root``'s sources in ``cache``, compiled now if it is not there (once:
    concurrent callers wait on a lock and share the result; ``log`` hears of a compile or a
    wait). Raises ``BuildError``, also when these sources failed to compile before (their
    log is kept: deleting it lets the next call try again)."""
    cache = cache or cache_root()
    cache.mkdir(parents=True, exist_ok=True)
    key = build_key(root)
    final = cache / key
    if final.is_dir():  # complete: it appears by an atomic rename
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
            raise BuildError(f"it failed before (whole log: {failed}; delete it to try again)")
        if not final.is_dir():
            if log is not None:
                log("compiling the simulator with mypyc (once per source change, about 30 s)")
            _compile(root, cache, final)
            _prune(cache, keep=final)
    os.utime(final)  # most recently used
    return final


def _compile(root: Path, cache: Path, final: Path) -> None:
    files = [str(_source(root, m)) for m in MODULES]
    with tempfile.TemporaryDirectory(prefix=f"{final.name}.", dir=cache) as tmp:
        out, work = Path(tmp) / "out", Path(tmp) / "work"
        try:
            done = subprocess.run(
                [sys.executable, "-c", _BUILD, str(out), str(work), str(os.cpu_count() or 1),
                 _GROUP, *files], cwd=tmp, capture_output=True, text=True, check=False)
        except OSError as e:
            raise BuildError(f"could not run {sys.executable}: {e}") from None
        if done.returncode != 0:
            log_file = cache / f"{final.name}.log"
            log_file.write_text(done.stdout + done.stderr)
            raise BuildError(f"{_first_error(done.stdout + done.stderr)} (whole log: {log_file})")
        out.rename(final)  # complete or absent: the rename is atomic


def _first_error(output: str) -> str:
    """What failed, in a line or a few: mypy's or the C compiler's errors, else the build's
    last error (a compiler that fails without a word: name it)."""
    lines = output.strip().splitlines()
    errors = [ln for ln in lines if re.search(r": (fatal )?error:", ln)]
    if errors:
        return "\n".join(errors[:5])
    failed = [ln for ln in lines if ln.startswith("error:")] or lines[-1:] or ["no output"]
    command = re.match(r"error: command '\[?'?([^',\]]+)", failed[-1], re.I)
    if command:
        return f"the C compiler ({command.group(1)}) failed"
    return failed[-1][:300]


def _prune(cache: Path, keep: Path) -> None:
    builds = sorted((p for p in cache.iterdir() if p.is_dir() and p != keep and "." not in p.name),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    for old in builds[_KEEP - 1:]:
        shutil.rmtree(old, ignore_errors=True)  # a process using it keeps its mapped files
        (cache / f"{old.name}.lock").unlink(missing_ok=True)


class _Finder(importlib.abc.MetaPathFinder):
    """Loads ``MODULES`` (and mypyc's shared library) from one build."""

    def __init__(self, build_dir: Path) -> None:
        self.build_dir = build_dir
        suffix = sysconfig.get_config_var("EXT_SUFFIX")
        self.files = {m: str(build_dir.joinpath(*m.split(".")).with_suffix("")) + suffix
                      for m in MODULES}
        self.files[f"{_GROUP}__mypyc"] = str(build_dir / f"{_GROUP}__mypyc{suffix}")

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


def _install(build_dir: Path) -> None:
    sys.meta_path.insert(0, _Finder(build_dir))
    os.environ[ENV_BUILD] = str(build_dir)


def _imported() -> list[str]:
    return [m for m in MODULES if m in sys.modules]


def turned_off() -> bool:
    """``ENV_OFF`` asks for the interpreted modules."""
    return os.environ.get(ENV_OFF, "") not in ("", "0")


def activate(compile_missing: bool = True,
             log: Callable[[str], None] | None = None) -> str | None:
    """Load ``MODULES`` compiled from now on, building them first if needed (about 30 s,
    once per source change; ``log`` gets a line before). Returns None when they will load
    compiled, else why not (they stay interpreted: same results, slower)."""
    if turned_off():
        return f"{ENV_OFF} is set"
    if active_build() is not None:
        return None
    if _imported():
        return f"{', '.join(_imported())} already imported (activate first)"
    cache = cache_root()
    if not compile_missing and not (cache / build_key()).is_dir():
        return "not built yet"
    try:
        build_dir = build(cache=cache, log=log)
    except (BuildError, OSError) as e:
        return f"the compile failed: {e}"
    _install(build_dir)
    return None


def inherit_compiled_build() -> None:
    """In a process started by one that called ``activate`` (a sweep's): use the same build,
    if it still matches these sources and no module of it is imported yet."""
    path = os.environ.get(ENV_BUILD)
    if not path or turned_off() or active_build() is not None or _imported():
        return
    build_dir = Path(path)
    if build_dir.name == build_key() and build_dir.is_dir():
        _install(build_dir)
