"""Self-service training end to end: a token-protected local Ray head and MLflow server
(cluster/start_local.sh on free ports, an empty HOME), the Serve app deployed there with
`serve deploy`, and real HTTP: toy-world photos uploaded, the Ray job followed to done, the new
subject rendered; bad uploads refused with nothing stored; a duplicate; a cancelled job; a second
user's key that cannot see the first user's job.

The test process never joins the cluster (only HTTP and the CLIs), so it shares nothing with the
in-process clusters of other test modules.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml
from browser_helpers import click, make_browser, open_tab, shot, sign_in, skip_reason, wait_for
from cluster_helpers import free_port, kill_matching, stop_local

from jobs.demo_subjects import write_demo_subjects
from serve.auth import create_key

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STEPS = 6  # training steps of the uploaded subject: the job stays short


_free_port, _kill_matching = free_port, kill_matching


def _train_config(folder: Path) -> Path:
    """The demo's job config with a few priors and quick sampling, so one job takes about a minute."""
    cfg = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    cfg["priors"]["count"] = 4
    cfg["sampler"]["steps"] = 2
    cfg["train"].update(validation_scenes=1)
    cfg["job"].update(metrics_every_s=1.0, progress_every_s=2.0)
    path = folder / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _start_head(home: Path, storage: Path) -> dict:
    """cluster/start_local.sh on free ports with Ray's session files in a folder of its own; on
    this shared 2-core box a raylet can miss Ray's fixed 30 s start window, so up to 3 tries."""
    for attempt in range(3):
        temp_dir = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # short: Ray's socket paths have a length limit
        ports = dict(RAY_PORT=_free_port(), DASHBOARD_PORT=_free_port(), AGENT_PORT=_free_port(),
                     MLFLOW_PORT=_free_port(), SERVE_PORT=_free_port())
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
        env.update(HOME=str(home), PYTHON=sys.executable, PATH=f"{BIN}:{env.get('PATH', '')}", RAY_TEMP_DIR=temp_dir,
                   PYTHONPATH=str(REPO), RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token",
                   MLFLOW_START_TIMEOUT="600", **{k: str(v) for k, v in ports.items()})
        start = subprocess.run(["bash", "cluster/start_local.sh", str(storage)], cwd=REPO, env=env,
                               capture_output=True, text=True, timeout=900)
        if start.returncode == 0:
            return dict(env=env, temp_dir=temp_dir, **ports)
        _kill_matching(temp_dir)
        assert attempt < 2, start.stdout[-3000:] + start.stderr[-3000:]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    storage = tmp_path_factory.mktemp("storage")
    started = {}
    try:
        started = _start_head(home, storage)
        yield dict(home=home, storage=storage, **started)
    finally:
        stop_local(started["temp_dir"] if started else None, storage)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """alice, bob and carol (user keys; carol trains from the studio) and root (an admin key), each as
    request headers."""
    path = tmp_path_factory.mktemp("keys") / "api_keys.json"
    made = {name: create_key(path, name, admin=name == "root", rate_per_s=1e6, burst=10**6)
            for name in ("alice", "bob", "carol", "root")}
    return str(path), {name: {"Authorization": f"Bearer {key}"} for name, key in made.items()}


@pytest.fixture(scope="module")
def app(head, keys, tmp_path_factory):
    """The app on the head, with `serve deploy`: its URL."""
    folder = tmp_path_factory.mktemp("app")
    args = dict(base="toy", tracking_uri=f"http://127.0.0.1:{head['MLFLOW_PORT']}", cache_dir=str(folder / "cache"),
                api_keys_file=keys[0], default_steps=2, device="cpu", job_storage=str(head["storage"]),
                ray_address=f"http://127.0.0.1:{head['DASHBOARD_PORT']}",
                ray_token_file=str(head["home"] / ".ray" / "auth_token"), train_config=str(_train_config(folder)),
                max_upload_bytes=200_000, max_trainings_per_key=1, lookup_wait_s=10.0,
                registry_timeout_s=10)  # MLflow's 2 s default: under load on the shared box calls timed out (500s)
    one = dict(num_replicas=1, ray_actor_options={"num_cpus": 0.25})
    config = {"http_options": {"host": "127.0.0.1", "port": head["SERVE_PORT"]}, "applications": [{
        "name": "comfusion", "route_prefix": "/", "import_path": "serve.app:build_app", "args": args,
        "runtime_env": {"env_vars": {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}},
        "deployments": [{"name": "Ingress", **one}, {"name": "Generator", **one}]}]}
    path = folder / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    out = subprocess.run([str(BIN / "serve"), "deploy", str(path), "--address", args["ray_address"]], cwd=REPO,
                         env=head["env"], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    url = f"http://127.0.0.1:{head['SERVE_PORT']}"
    _wait(lambda: httpx.get(f"{url}/healthz", timeout=5).status_code == 200, 900, "the app did not come up")
    return url


def _wait(ok, timeout: float, what: str, every: float = 2.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            result = ok()
            if result:
                return result
        except httpx.HTTPError:
            pass
        time.sleep(every)
    raise AssertionError(what)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Toy-world photos of two objects the model never saw: {subject: [(name, bytes)]}."""
    written = write_demo_subjects(tmp_path_factory.mktemp("photos"))
    return {sid: [(p.name, p.read_bytes()) for p in paths] for sid, paths in written.items()}


def upload(url, headers, items, **fields):
    files = [("photos", (name, data, "image/png")) for name, data in items]
    return httpx.post(f"{url}/v1/subjects", headers=headers, files=files, data=fields, timeout=120)


def stored(head) -> list[Path]:
    return sorted(p for p in (head["storage"] / "uploads").rglob("*") if p.is_file()) \
        if (head["storage"] / "uploads").exists() else []


# ---------------------------------------------------------------------------------------


def test_bad_uploads_are_refused_and_nothing_is_stored(app, head, keys, photos):
    alice = keys[1]["alice"]
    good = photos["yellow-ball"]
    before, jobs_before = stored(head), httpx.get(f"{app}/v1/jobs", headers=keys[1]["root"], timeout=60).json()["jobs"]
    cases = {
        "not an image": (upload(app, alice, [("notes.png", b"just some text")], class_noun="ball"), 422, "notes.png"),
        "truncated": (upload(app, alice, [("cut.png", good[0][1][:-40])], class_noun="ball"), 422, "cut.png"),
        "too large": (upload(app, alice, [("huge.png", good[0][1] + b"\0" * 250_000)], class_noun="ball"), 413, ""),
        "too many": (upload(app, alice, good * 2, class_noun="ball"), 422, "6 photos"),
        "long class noun": (upload(app, alice, good, class_noun="x" * 8000), 422, "class_noun"),
        "bad steps": (upload(app, alice, good, class_noun="ball", steps="99999"), 422, "steps"),
        "no key": (upload(app, {}, good, class_noun="ball"), 401, ""),
    }
    for name, (r, status, said) in cases.items():
        assert r.status_code == status, (name, r.status_code, r.text[:300])
        assert said in r.text, (name, r.text[:300])
    assert "truncated" in cases["truncated"][0].json()["message"]
    assert stored(head) == before
    assert httpx.get(f"{app}/v1/jobs", headers=keys[1]["root"], timeout=60).json()["jobs"] == jobs_before


def test_upload_trains_and_the_new_subject_is_served(app, head, keys, photos):
    alice, bob, root = (keys[1][k] for k in ("alice", "bob", "root"))
    r = upload(app, alice, photos["yellow-ball"], class_noun="ball", id="my-ball", steps=str(STEPS))
    assert r.status_code == 202, r.text
    job_id, location = r.json()["job_id"], r.headers["location"]
    assert location == f"/v1/jobs/{job_id}" and r.json()["subject"] == "my-ball"
    hashes = {hashlib.sha256(data).hexdigest() for _, data in photos["yellow-ball"]}
    assert hashes <= {p.stem for p in stored(head)}  # the photos, under their hashes
    assert all(len(p.stem) == 64 for p in stored(head))

    again = upload(app, alice, photos["yellow-ball"], class_noun="ball", id="my-ball", steps=str(STEPS))
    assert again.status_code == 200 and again.json()["job_id"] == job_id and again.json()["duplicate"]
    busy = upload(app, alice, photos["blue-box"], class_noun="box", steps=str(STEPS))
    assert busy.status_code == 429 and "Retry-After" in busy.headers
    taken = upload(app, bob, photos["blue-box"], class_noun="box", id="my-ball")
    assert taken.status_code == 409, taken.text

    assert httpx.get(f"{app}{location}", headers=bob, timeout=60).status_code == 404
    assert httpx.get(f"{app}/v1/jobs", headers=bob, timeout=60).json()["jobs"] == []
    assert httpx.delete(f"{app}{location}", headers=bob, timeout=60).status_code == 404
    assert job_id in [j["id"] for j in httpx.get(f"{app}/v1/jobs", headers=root, timeout=60).json()["jobs"]]

    states = []

    def done():
        view = httpx.get(f"{app}{location}", headers=alice, timeout=60).json()
        states.append(view["state"])
        assert view["state"] not in ("failed", "cancelled"), view
        return view if view["state"] == "done" else None

    view = _wait(done, 1500, f"job {job_id} did not finish", every=1.0)
    method = view["methods"]["comfusion"]
    assert (method["step"], method["total"], method["state"]) == (STEPS, STEPS, "done"), view
    assert set(method["losses"]) >= {"total", "instance", "class_scene"} and view["error"] is None
    assert states[0] in ("queued", "preparing priors", "training"), states

    # servable with no further step
    gen = httpx.post(f"{app}/v1/generate", headers={**alice, "Accept": "image/png"}, timeout=120,
                     json={"subject": "my-ball", "scene": "in the snow", "seed": 1})
    assert gen.status_code == 200 and gen.content[:8] == b"\x89PNG\r\n\x1a\n", gen.text[:300]

    # the run and the subject carry the owner; the run has per-step and system metrics
    from mlflow import MlflowClient

    client = MlflowClient(f"http://127.0.0.1:{head['MLFLOW_PORT']}")
    run = client.get_run(method["run_id"])
    assert run.data.tags["comfusion.owner"] == "alice" and run.data.tags["comfusion.job"] == job_id
    assert client.get_registered_model("my-ball").tags["comfusion.owner"] == "alice"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss/total")) == list(range(1, STEPS + 1))
    assert any(k.startswith("system/") for k in run.data.metrics), sorted(run.data.metrics)

    # the same upload once it is done: the finished job, not a second training
    again = upload(app, alice, photos["yellow-ball"], class_noun="ball", id="my-ball", steps=str(STEPS))
    assert again.status_code == 200 and again.json()["job_id"] == job_id and again.json()["state"] == "done"


def test_a_job_is_cancelled(app, keys, photos):
    alice = keys[1]["alice"]
    r = upload(app, alice, photos["blue-box"], class_noun="box", steps="2000")
    assert r.status_code == 202, r.text
    location = r.headers["location"]
    stop = httpx.delete(f"{app}{location}", headers=alice, timeout=60)
    assert stop.status_code == 202, stop.text
    view = _wait(lambda: (v := httpx.get(f"{app}{location}", headers=alice, timeout=60).json())["state"] == "cancelled"
                 and v, 300, "the job was not cancelled")
    assert view["ray_status"] == "STOPPED"
    assert httpx.delete(f"{app}{location}", headers=alice, timeout=60).status_code == 409


def test_studio_train_page_trains_a_subject_and_opens_it_in_generate(app, keys, photos, tmp_path):
    """The studio's Train page in headless Chromium, as carol (a key with no training of its own, so the
    app's one-training-per-key limit leaves the other tests alone): photos through the file input, the
    job followed to done on the page, then Generate with the new subject chosen renders it."""
    if (reason := skip_reason()) is not None:
        pytest.skip(reason)
    paths = []
    for name, data in photos["yellow-ball"]:
        (tmp_path / name).write_bytes(data)
        paths.append(str(tmp_path / name))
    _wait(lambda: httpx.get(f"{app}/studio/", timeout=30).status_code == 200, 600, "the studio did not start")
    driver = make_browser(1280, 1300)
    try:
        sign_in(driver, app, keys[1]["carol"]["Authorization"].removeprefix("Bearer "))
        open_tab(driver, "Train")
        wait_for(driver, "#train-jobs", text="No trainings yet")
        files = driver.find_element("css selector", "#train-photos input[type=file]")
        driver.execute_script("arguments[0].style.display = 'block';", files)  # Gradio hides its file input
        files.send_keys("\n".join(paths))
        _wait(lambda: driver.find_element("css selector", "#train-photos").text.count(".png") == len(paths), 120,
              "the photos did not upload", every=0.3)  # Gradio lists each as name, then extension
        wait_for(driver, "#train-class textarea, #train-class input").send_keys("ball")
        wait_for(driver, "#train-id textarea, #train-id input").send_keys("studio-ball")
        wait_for(driver, "#train-steps textarea, #train-steps input").send_keys(str(STEPS))
        click(driver, "#train-start")
        status = _wait(lambda: driver.find_element("css selector", "#train-status").text.strip(), 300,
                       "Start training got no answer", every=0.5)
        assert "Training submitted" in status, status
        wait_for(driver, "#train-state", timeout=1500, text="done")
        assert f"{STEPS}/{STEPS}" in driver.find_element("css selector", "#train-progress").text
        shot(driver, "train")

        click(driver, "#train-use")
        wait_for(driver, "#gen-go")
        _wait(lambda: driver.find_element("css selector", "#gen-subject input").get_attribute("value") == "studio-ball",
              60, "Generate did not open with the new subject chosen", every=0.3)
        click(driver, "#gen-go")
        wait_for(driver, "#generated img")
        assert "studio-ball (version 1)" in wait_for(driver, "#gen-status", text="studio-ball").text
        assert driver.find_element("css selector", "#generated img").get_attribute("src").startswith("data:image/png")
    finally:
        driver.save_screenshot(str(tmp_path / "train-last-page.png"))  # what the page showed last, for a failure
        print(f"last page: {tmp_path / 'train-last-page.png'}")
        driver.quit()


def test_run_logger_sends_steps_live_without_a_checkpoint(tmp_path):
    """The live thread writes buffered steps every `live_every_s`; a checkpoint flush afterwards
    adds only the steps not sent yet, so no step is logged twice."""
    from mlflow import MlflowClient

    from jobs.tracking import RunLogger

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("live", artifact_location=str(tmp_path / "a"))).info.run_id
    logger = RunLogger(uri, run_id, live_every_s=0.2)
    try:
        for step in range(1, 4):
            logger.on_step(step, {"total": 1.0 / step}, 1e-4)
        _wait(lambda: len(client.get_metric_history(run_id, "loss/total")) == 3, 60, "steps not sent live", every=0.1)
        logger.on_step(4, {"total": 0.25}, 1e-4)
        logger.flush()
    finally:
        logger.close()
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss/total")) == [1, 2, 3, 4]
    assert not logger._live.is_alive()
