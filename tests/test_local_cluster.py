"""A new user's machine: `cluster/start_local.sh` with an empty home directory starts a
token-protected Ray head (creating its token) and an MLflow server, and a job submitted through
Ray's job API runs there; a client without the token is refused.

Real processes on free ports, with Ray's session files in a folder of the test's own, so a demo
or another test cluster on this machine is neither joined nor stopped (no `ray stop`, which would
end every Ray process here).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from cluster_helpers import free_port, stop_local

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.ray


_free_port = free_port


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")  # a new user's empty home: no ~/.ray/auth_token
    storage = tmp_path_factory.mktemp("storage")
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths have a length limit
    ports = dict(RAY_PORT=_free_port(), DASHBOARD_PORT=_free_port(), AGENT_PORT=_free_port(), MLFLOW_PORT=_free_port())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env.update(HOME=str(home), PYTHON=sys.executable, PATH=f"{BIN}:{env.get('PATH', '')}", RAY_TEMP_DIR=temp_dir,
               RAY_USAGE_STATS_ENABLED="0", MLFLOW_START_TIMEOUT="600", **{k: str(v) for k, v in ports.items()})
    try:
        start = subprocess.run(["bash", "cluster/start_local.sh", str(storage)], cwd=REPO, env=env,
                               capture_output=True, text=True, timeout=900)
        assert start.returncode == 0, start.stdout + start.stderr
        yield dict(env=env, home=home, storage=storage, **ports)
    finally:
        stop_local(temp_dir, storage)


def test_start_creates_the_token_and_a_job_runs(head, tmp_path):
    token = head["home"] / ".ray" / "auth_token"
    assert token.is_file() and len(token.read_text().strip()) >= 16

    job = tmp_path / "job"
    job.mkdir()
    (job / "hello.py").write_text("import json, ray\nray.init()\n"
                                  "print('RESOURCES', json.dumps({'CPU': ray.cluster_resources().get('CPU', 0)}))\n")
    env = {**head["env"], "RAY_AUTH_MODE": "token"}
    out = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{head['DASHBOARD_PORT']}",
                          "--working-dir", str(job), "--", "python", "hello.py"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("RESOURCES"))
    assert json.loads(line.split(" ", 1)[1])["CPU"] >= 1

    # the MLflow server of the same script answers
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{head['MLFLOW_PORT']}/health", timeout=10) as r:
        assert r.status == 200


def test_a_client_without_the_token_is_refused(head, tmp_path):
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    env = {**head["env"], "HOME": str(stranger), "RAY_AUTH_MODE": "token"}
    out = subprocess.run([str(BIN / "ray"), "job", "list", "--address", f"http://127.0.0.1:{head['DASHBOARD_PORT']}"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "token" in (out.stdout + out.stderr).lower()


def test_a_second_start_reuses_the_running_head(head):
    again = subprocess.run(["bash", "cluster/start_local.sh", str(head["storage"])], cwd=REPO, env=head["env"],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "already running" in again.stdout
