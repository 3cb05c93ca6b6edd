"""`make demo` starts with `pip install -e .`: building the package warns about nothing (it
warned three times that engine.csrc "would be ignored")."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(120)
def test_an_editable_build_prints_no_setuptools_warning(tmp_path):
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout (the build reads git's file list)")
    tree = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if name.startswith("results/") or not (ROOT / name).is_file():
            continue  # results are data; a file deleted in the working tree is not built
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, tree / name)
    out = tmp_path / "wheel"
    out.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", "import sys; from setuptools import build_meta; "
         "print(build_meta.build_editable(sys.argv[1]))", str(out)],
        cwd=tree, capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, done.stderr[-2000:]
    log = done.stdout + done.stderr
    assert "absent from the `packages` configuration" not in log
    assert "Warning" not in log, log[-3000:]
    assert list(out.glob("splitserve-*.whl"))
