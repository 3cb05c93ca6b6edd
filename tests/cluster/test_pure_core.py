"""The pure core imports with torch, ray and grpc made unimportable (STYLE.md practice 1)."""

from __future__ import annotations

import subprocess
import sys

PURE_MODULES = (
    "engine.prefix_hash",
    "engine.worker_stats",
    "cluster.policy_config",
    "cluster.placement",
    "cluster.placement_index",
    "cluster.global_scheduler",
    "cluster.autoscaler",
    "cluster.simulator",
)

SCRIPT = """
import sys
for name in ("torch", "ray", "grpc"):
    sys.modules[name] = None  # any `import torch` now raises ImportError
import importlib
for module in {modules!r}:
    importlib.import_module(module)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "ray", "grpc")
                and sys.modules[m] is not None)
print("OK", loaded)
"""


def test_pure_core_imports_without_torch_ray_grpc():
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(modules=PURE_MODULES)],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "OK []"


def test_the_guard_really_blocks_torch():
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(modules=("torch",))],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode != 0 and "import of torch halted" in proc.stderr
