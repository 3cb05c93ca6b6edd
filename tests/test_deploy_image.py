"""The image's build check imports what the wheel really installs.

deploy/docker/Dockerfile ends its build stage with ``python -c "import ..."``: a smoke test
that the installed packages import. It must name the packages pyproject.toml installs —
proto/ installs as ``splitserve_proto``, and a bare ``import proto`` finds proto-plus (pulled
in by ray[default]) instead, so such a check passes without testing anything of ours.
"""

from __future__ import annotations

import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"


def _build_check_imports() -> list[str]:
    """The modules of the build stage's ``python -c "import a, b.c; ..."``."""
    text = DOCKERFILE.read_text().replace("\\\n", "")  # Docker joins continued lines first
    match = re.search(r'python -c "import ([^;"]+);', text)
    assert match, "the build stage has no python -c \"import ...\" check"
    return [name.strip() for name in match.group(1).split(",")]


def _installed_packages() -> tuple[set[str], dict[str, str]]:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return set(setuptools["packages"]), setuptools.get("package-dir", {})


def _source_of(module: str, package_dir: dict[str, str]) -> Path:
    top, _, rest = module.partition(".")
    base = ROOT / package_dir.get(top, top)
    return base.joinpath(*rest.split(".")) if rest else base


def test_build_check_imports_our_packages_not_proto_plus():
    imports = _build_check_imports()
    packages, package_dir = _installed_packages()
    ours = [m for m in imports if m.split(".")[0] in packages]
    assert "proto" not in {m.split(".")[0] for m in imports}, (
        "`import proto` finds proto-plus; the generated code installs as splitserve_proto")
    assert any(m.startswith("splitserve_proto.") for m in imports), imports
    for module in ours:
        top = module.split(".")[0]
        assert top in packages, f"{module}: {top} is not a package pyproject.toml installs"
        source = _source_of(module, package_dir)
        assert source.is_dir() or source.with_suffix(".py").is_file(), (
            f"{module}: no such module in the repository ({source})")


def test_image_puts_the_rayservice_gate_on_the_python_path():
    """serveConfigV2 imports ``splitserve_gate`` (deploy/kuberay/rayservice.yaml): the
    runtime stage must have that file in a directory on PYTHONPATH (Ray's workers inherit
    the container's environment)."""
    text = DOCKERFILE.read_text().replace("\\\n", "")
    runtime = text.split("\nFROM ")[-1]  # the last stage is the image
    copied = re.search(r"^COPY deploy/kuberay/splitserve_gate\.py (\S+)/$", text, re.M)
    assert copied, "the build stage does not copy the gate"
    directory = copied.group(1)
    assert re.search(rf"^COPY --from=build {re.escape(directory)} {re.escape(directory)}$",
                     runtime, re.M), "the runtime stage does not take the gate over"
    pythonpath = re.search(r"\bPYTHONPATH=(\S+)", runtime)
    assert pythonpath and directory in pythonpath.group(1).split(":")
