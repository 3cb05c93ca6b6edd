"""The engine's scheduling core (request, block pool, KV manager, scheduler, step contract)
imports with torch, ray and grpc made unimportable (STYLE.md practice 1)."""

from __future__ import annotations

import subprocess
import sys

MODULES = ("engine.sampling_params", "engine.request", "engine.block_pool",
           "engine.kv_cache_manager", "engine.scheduler", "engine.batch", "engine.outputs")

SCRIPT = """
import sys
for name in ("torch", "ray", "grpc"):
    sys.modules[name] = None  # any `import torch` now raises ImportError
import importlib
for module in {modules!r}:
    importlib.import_module(module)
print("OK")
"""


def test_engine_core_imports_without_torch():
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(modules=MODULES)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "OK"
