"""Every YAML under cluster/ and configs/ parses, and the entry points it names exist."""
import re
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).parents[1]
CLUSTER_YAMLS = sorted((REPO / "cluster").rglob("*.yaml"))


def _docs(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _strings(node):
    if isinstance(node, dict):
        for v in node.values():
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)
    elif isinstance(node, str):
        yield node


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: str(p.relative_to(REPO)))
def test_cluster_yaml_parses_and_names_existing_entry_points(path):
    docs = _docs(path)
    assert docs, f"{path} is empty"
    text = "\n".join(_strings(docs))
    for script in re.findall(r"\b((?:jobs|serve|benchmarks)/[\w/]+\.py)\b", text):
        assert (REPO / script).is_file(), f"{path.name} names {script}, which does not exist"
    for cfg in re.findall(r"\b(configs/[\w.-]+\.yaml)\b", text):
        assert (REPO / cfg).is_file(), f"{path.name} names {cfg}, which does not exist"
    for mod, attr in re.findall(r"import_path:\s*([\w.]+):(\w+)", text):
        src = REPO / (mod.replace(".", "/") + ".py")
        assert src.is_file() and re.search(rf"^(def|class) {attr}\b|^{attr} =", src.read_text(), re.M), \
            f"{path.name}: import_path {mod}:{attr} does not exist"


def test_kuberay_has_cluster_job_and_service():
    kinds = {d["kind"] for p in (REPO / "cluster" / "kuberay").glob("*.yaml") for d in _docs(p)}
    assert {"RayCluster", "RayJob", "RayService"} <= kinds
    job = next(d for d in _docs(REPO / "cluster" / "kuberay" / "rayjob.yaml") if d["kind"] == "RayJob")
    assert "jobs/train_many.py" in job["spec"]["entrypoint"]


def test_launcher_has_a_gpu_worker_group():
    cfg = _docs(REPO / "cluster" / "gpu-cluster.yaml")[0]
    assert cfg["head_node_type"] in cfg["available_node_types"]
    assert any("worker" in name for name in cfg["available_node_types"])


def test_upload_leaves_out_environments_caches_and_outputs():
    env = _docs(REPO / "cluster" / "runtime_env.yaml")[0]
    for path in (".venv/", ".cache/", "storage/", "mlruns/", "mlflow.db"):
        assert path in env["excludes"]
    ignored = (REPO / ".gitignore").read_text().split()
    assert {".venv/", "mlruns/", "mlflow.db", "storage/"} <= set(ignored)


@pytest.mark.parametrize("script", sorted((REPO / "cluster").glob("*.sh")), ids=lambda p: p.name)
def test_shell_scripts_are_valid_bash(script):
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
