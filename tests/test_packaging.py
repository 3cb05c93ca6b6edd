"""pyproject.toml lists every package directory (the list is explicit because proto/ is
renamed to splitserve_proto on install)."""

from __future__ import annotations

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_directory_is_installed():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(tool["packages"])
    renames = {v: k for k, v in tool["package-dir"].items()}  # folder -> package name
    found = set()
    for init in ROOT.glob("*/**/__init__.py"):
        rel = init.parent.relative_to(ROOT)
        if rel.parts[0] in {"tests", "benchmarks", "deploy", "docs", ".venv", "build"}:
            continue
        top = renames.get(rel.parts[0], rel.parts[0])
        found.add(".".join((top, *rel.parts[1:])))
    assert found == listed


def test_generated_grpc_code_imports_the_installed_name():
    from splitserve_proto.splitserve.v1 import generate_pb2, generate_pb2_grpc

    alias = generate_pb2_grpc.proto_dot_splitserve_dot_v1_dot_generate__pb2  # protoc's name
    assert alias is generate_pb2
    assert generate_pb2.GenerateRequest.__module__ == "splitserve_proto.splitserve.v1.generate_pb2"
