"""The model volume (deploy/kuberay/models.yaml): the claim every pod mounts, and the Job
that downloads the checkpoint into it.

- one claim name everywhere (plain manifests, RayService, Helm values), and the Job writes
  to the pool config's model.path;
- the Job's script, run for real with a stand-in ``huggingface_hub`` (no network): it passes
  the documented arguments, says "ready" for a complete checkpoint and fails, saying what is
  missing, for an incomplete one.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.config import ClusterConfig
from tests.test_deploy import CHART, POOL_GPU, RAYCLUSTER, _load, _load_all
from tests.test_deploy_rayservice import RAYSERVICE

MODELS = Path(__file__).resolve().parents[1] / "deploy" / "kuberay" / "models.yaml"


def _docs() -> dict[str, dict]:
    return {doc["kind"]: doc for doc in _load_all(MODELS)}


def _container() -> dict:
    return _docs()["Job"]["spec"]["template"]["spec"]["containers"][0]


def _env() -> dict[str, str]:
    return {e["name"]: e.get("value") for e in _container()["env"]}


def _claims(pod_spec: dict) -> set[str]:
    return {v["persistentVolumeClaim"]["claimName"] for v in pod_spec["volumes"]
            if "persistentVolumeClaim" in v}


def test_one_claim_everywhere_and_the_job_fills_model_path():
    docs = _docs()
    claim = docs["PersistentVolumeClaim"]["metadata"]["name"]
    assert "ReadWriteMany" in docs["PersistentVolumeClaim"]["spec"]["accessModes"]
    assert _claims(docs["Job"]["spec"]["template"]["spec"]) == {claim}
    (raycluster,) = _load_all(RAYCLUSTER)
    (rayservice,) = _load_all(RAYSERVICE)
    for spec in (raycluster["spec"], rayservice["spec"]["rayClusterConfig"]):
        pods = [spec["headGroupSpec"]] + spec["workerGroupSpecs"]
        for group in pods:
            assert _claims(group["template"]["spec"]) == {claim}
    assert _load(CHART / "values.yaml")["models"]["existingClaim"] == claim
    assert _env()["MODEL_DIR"] == ClusterConfig.from_yaml(POOL_GPU).model.path
    mounts = {m["mountPath"] for m in _container()["volumeMounts"]}
    assert any(_env()["MODEL_DIR"].startswith(m + "/") for m in mounts)


_STUB = '''
import json, os
def snapshot_download(repo_id, local_dir, allow_patterns):
    with open(os.environ["STUB_LOG"], "w") as log:
        json.dump({"repo_id": repo_id, "local_dir": local_dir,
                   "allow_patterns": allow_patterns}, log)
    os.makedirs(local_dir, exist_ok=True)
    for name in os.environ["STUB_FILES"].split(","):
        if name:
            open(os.path.join(local_dir, name), "w").close()
'''


def _run_job_script(tmp_path: Path, files: str) -> subprocess.CompletedProcess:
    (tmp_path / "stub").mkdir()
    (tmp_path / "stub" / "huggingface_hub.py").write_text(_STUB)
    env = {"PYTHONPATH": str(tmp_path / "stub"), "MODEL_REPO": _env()["MODEL_REPO"],
           "MODEL_DIR": str(tmp_path / "models" / "m"), "STUB_LOG": str(tmp_path / "log.json"),
           "STUB_FILES": files}
    script = _container()["args"][0]
    assert _container()["command"][-1] == "-c"
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=30)


def test_job_script_downloads_and_checks_the_checkpoint(tmp_path):
    result = _run_job_script(tmp_path, "config.json,tokenizer.json,model.safetensors")
    assert result.returncode == 0, result.stderr
    assert "ready:" in result.stdout
    call = json.loads((tmp_path / "log.json").read_text())
    assert call["repo_id"] == "meta-llama/Llama-3.1-8B-Instruct"
    assert "*.safetensors" in call["allow_patterns"] and "*.json" in call["allow_patterns"]


@pytest.mark.parametrize("files, missing", [
    ("config.json,tokenizer.json", "weights"),
    ("model.safetensors,tokenizer.json", "config.json"),
])
def test_job_script_fails_on_an_incomplete_checkpoint(tmp_path, files, missing):
    result = _run_job_script(tmp_path, files)
    assert result.returncode == 1
    assert "incomplete checkpoint" in result.stderr and missing in result.stderr
