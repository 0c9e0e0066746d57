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


# ---------------------------------------------------------------------------------------
# locked down: Ray token auth, no exposed dashboard, MLflow behind basic auth on Postgres

KUBERAY = sorted((REPO / "cluster" / "kuberay").glob("*.yaml"))
SECRET_NAMES = re.compile(r"(^|_)(PASSWORD|TOKEN|SECRET)(_|$)")


def _kube_docs():
    return [(p.name, d) for p in KUBERAY for d in _docs(p)]


def _ray_cluster_specs():
    """(file, RayClusterSpec) of every RayCluster, RayJob and RayService."""
    where = {"RayCluster": (), "RayJob": ("rayClusterSpec",), "RayService": ("rayClusterConfig",)}
    out = []
    for name, doc in _kube_docs():
        if doc["kind"] in where:
            spec = doc["spec"]
            for key in where[doc["kind"]]:
                spec = spec[key]
            out.append((f"{name}:{doc['kind']}", spec))
    return out


def _groups(spec):
    return [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]


def _env(container) -> dict:
    return {e["name"]: e for e in container.get("env", [])}


def _from_secret(entry, key=None) -> bool:
    ref = (entry or {}).get("valueFrom", {}).get("secretKeyRef", {})
    return bool(ref.get("name")) and (key is None or ref.get("key") == key) and "value" not in entry


def test_every_ray_cluster_has_token_auth_from_a_secret():
    specs = _ray_cluster_specs()
    assert {s.split(":")[1] for s, _ in specs} == {"RayCluster", "RayJob", "RayService"}
    for where, spec in specs:
        assert spec["authOptions"]["mode"] == "token", where
        secret = spec["authOptions"]["secretName"]
        for group in _groups(spec):
            for c in group["template"]["spec"]["containers"]:
                env = _env(c)
                assert env["RAY_AUTH_MODE"]["value"] == "token", (where, c["name"])
                assert _from_secret(env["RAY_AUTH_TOKEN"], "auth_token"), (where, c["name"])
                assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == secret


def test_dashboard_is_not_exposed_beyond_the_cluster():
    for where, spec in _ray_cluster_specs():
        head = spec["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP", where
        assert head.get("enableIngress", False) is False, where
    kinds = [d["kind"] for _, d in _kube_docs()]
    assert "Ingress" not in kinds
    for name, doc in _kube_docs():
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", name
    policies = {d["metadata"]["name"]: d for _, d in _kube_docs() if d["kind"] == "NetworkPolicy"}
    head = next(p for p in policies.values() if p["spec"]["podSelector"]["matchLabels"] == {"ray.io/node-type": "head"})
    for rule in head["spec"]["ingress"]:  # only this namespace and the operator reach the dashboard
        outside = [f for f in rule["from"] if "namespaceSelector" in f]
        operator = [f for f in outside if f["namespaceSelector"]["matchLabels"].get("kubernetes.io/metadata.name")
                    == "kuberay-system"]
        if len(outside) > len(operator):
            assert [p["port"] for p in rule["ports"]] == [8000], rule


def test_ray_pods_log_to_mlflow_with_credentials_from_a_secret():
    for where, spec in _ray_cluster_specs():
        for group in _groups(spec):
            for c in group["template"]["spec"]["containers"]:
                env = _env(c)
                assert env["MLFLOW_TRACKING_URI"]["value"].startswith("http://mlflow."), where
                assert _from_secret(env["MLFLOW_TRACKING_USERNAME"]) and _from_secret(env["MLFLOW_TRACKING_PASSWORD"])


def test_no_secret_is_written_in_any_config():
    for name, doc in _kube_docs():
        for node in _walk_dicts(doc):
            if isinstance(node.get("name"), str) and SECRET_NAMES.search(node["name"]) and "value" in node:
                assert "$(" in node["value"], f"{name}: {node['name']} has a literal value"
    env_vars = _docs(REPO / "cluster" / "runtime_env.yaml")[0].get("env_vars", {})
    assert not [k for k in env_vars if SECRET_NAMES.search(k)]


def _walk_dicts(node):
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _walk_dicts(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk_dicts(v)


def test_kubernetes_mlflow_uses_basic_auth_and_postgres():
    docs = [d for p in KUBERAY if p.name == "mlflow.yaml" for d in _docs(p)]
    deploy = next(d for d in docs if d["kind"] == "Deployment")
    (c,) = deploy["spec"]["template"]["spec"]["containers"]
    script = " ".join(c["command"] + c["args"])
    assert "--app-name basic-auth" in script and "NO_PERMISSIONS" in script and "mlflow[auth]" in script
    env = _env(c)
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"].startswith("postgresql://$(PGUSER):$(PGPASSWORD)@")
    assert env["MLFLOW_AUTH_DATABASE_URI"]["value"].startswith("postgresql://")
    assert env["MLFLOW_AUTH_DATABASE_URI"]["value"] != env["MLFLOW_BACKEND_STORE_URI"]["value"]
    for key in ("PGPASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert _from_secret(env[key]), key
    assert next(d for d in docs if d["kind"] == "Service")["spec"]["type"] == "ClusterIP"


def test_launcher_nodes_use_token_auth_and_a_private_dashboard():
    cfg = _docs(REPO / "cluster" / "gpu-cluster.yaml")[0]
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    starts = [c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2
    for cmd in starts:
        assert re.search(r"RAY_AUTH_MODE=token\b.*ray start", cmd), cmd
        assert "MLFLOW_TRACKING_URI=http://" in cmd and "cluster.env" in cmd  # the jobs' MLflow login
    head = next(c for c in starts if "--head" in c)
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    mlflow = next(c for c in cfg["head_start_ray_commands"] if "mlflow" in c and "ray start" not in c)
    assert "mlflow_server.sh" in mlflow and "MLFLOW_HOST=0.0.0.0" in mlflow  # so the script's cluster rules apply
    assert "psycopg2" in " ".join(cfg["setup_commands"]) and "mlflow[auth]" in " ".join(cfg["setup_commands"])


def _mlflow_script(env: dict) -> subprocess.CompletedProcess:
    base = {k: v for k, v in __import__("os").environ.items() if not k.startswith("MLFLOW_")}
    return subprocess.run(["bash", str(REPO / "cluster" / "mlflow_server.sh"), "--check"], env={**base, **env},
                          capture_output=True, text=True, timeout=60)


CLUSTER_ENV = {"MLFLOW_HOST": "0.0.0.0", "MLFLOW_AUTH_ADMIN_PASSWORD": "pw-123", "MLFLOW_FLASK_SERVER_SECRET_KEY": "k",
               "MLFLOW_BACKEND_STORE_URI": "postgresql://mlflow:db-secret@db:5432/mlflow",
               "MLFLOW_AUTH_DATABASE_URI": "postgresql://mlflow:db-secret@db:5432/mlflow_auth"}


def test_mlflow_script_local_default_is_sqlite_on_loopback():
    out = _mlflow_script({})
    assert out.returncode == 0, out.stderr
    assert "--host 127.0.0.1" in out.stdout and "--backend-store-uri sqlite:///" in out.stdout


@pytest.mark.parametrize("change,message", [
    ({"MLFLOW_BACKEND_STORE_URI": "sqlite:////mnt/shared/mlflow.db"}, "must be postgresql"),
    ({"MLFLOW_AUTH_ADMIN_PASSWORD": ""}, "MLFLOW_AUTH_ADMIN_PASSWORD"),
    ({"MLFLOW_FLASK_SERVER_SECRET_KEY": ""}, "MLFLOW_FLASK_SERVER_SECRET_KEY"),
    ({"MLFLOW_AUTH_DATABASE_URI": "postgresql://mlflow:db-secret@db:5432/mlflow"}, "another database"),
])
def test_mlflow_script_refuses_an_open_or_sqlite_cluster_server(change, message):
    out = _mlflow_script({**CLUSTER_ENV, **change})
    assert out.returncode != 0 and message in out.stderr


def test_mlflow_script_cluster_server_has_basic_auth_on_postgres():
    out = _mlflow_script(CLUSTER_ENV)
    assert out.returncode == 0, out.stderr
    assert "--app-name basic-auth" in out.stdout and "--backend-store-uri postgresql://mlflow:***@db" in out.stdout
    assert "db-secret" not in out.stdout and "pw-123" not in out.stdout


def test_mlflow_script_really_serves_only_with_an_account(tmp_path):
    """The script's basic-auth server, started for real on a free loopback port (SQLite: local)."""
    pytest.importorskip("flask_wtf", reason="MLflow's basic-auth app needs mlflow[auth] (Flask-WTF)")
    import os
    import signal
    import socket
    import sys
    import time

    import requests

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    password = "a-long-admin-password-0123456789"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "MLFLOW_PORT": str(port),
           "COMFUSION_MLFLOW_STATE": str(tmp_path), "MLFLOW_AUTH_ADMIN_PASSWORD": password,
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen(["bash", str(REPO / "cluster" / "mlflow_server.sh")], env=env, stdout=log, stderr=log,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search"
    try:
        deadline = time.monotonic() + 600  # minutes on 2 cores shared by a busy team
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the MLflow server did not start"
            try:
                anonymous = requests.get(url, params={"max_results": 1}, timeout=5)
                break
            except requests.RequestException:
                time.sleep(1)
        assert anonymous.status_code == 401
        assert requests.get(url, params={"max_results": 1}, auth=("admin", "wrong"), timeout=30).status_code == 401
        assert requests.get(url, params={"max_results": 1}, auth=("admin", password), timeout=30).status_code == 200
        create = requests.post(f"http://127.0.0.1:{port}/api/2.0/mlflow/registered-models/create",
                               json={"name": "dog"}, timeout=30)
        assert create.status_code == 401  # nobody without an account registers (or moves an alias)
        ini = (tmp_path / "basic_auth.ini").read_text()
        assert "default_permission = NO_PERMISSIONS" in ini and password not in ini
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the server we started, and its workers
            proc.wait(60)


def test_served_apps_read_api_keys_from_a_mounted_secret():
    services = [(n, d) for n, d in _kube_docs() if d["kind"] == "RayService"]
    assert services
    for name, doc in services:
        (app,) = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"]
        keys = Path(app["args"]["api_keys_file"])
        for group in _groups(doc["spec"]["rayClusterConfig"]):
            pod = group["template"]["spec"]
            volumes = {v["name"]: v for v in pod["volumes"]}
            for c in pod["containers"]:
                mount = next(m for m in c["volumeMounts"] if keys.is_relative_to(m["mountPath"]))
                assert mount.get("readOnly") is True, (name, c["name"])
                assert volumes[mount["name"]]["secret"]["secretName"] == "comfusion-api-keys", name
