"""A job that is submitted again, a driver that dies, a failure that would repeat.

Real local Ray, real MLflow (sqlite + folder), the tiny preset on the CPU; nothing is mocked.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
from mlflow import MlflowClient

from comfusion.config import load_config
from comfusion.data import validate_subjects
from jobs import train_many
from jobs.demo_subjects import write_demo_subjects

pytestmark = pytest.mark.ray
REPO = Path(__file__).parents[1]
DEMO = REPO / "configs" / "demo.yaml"
ONE = "[{id: yellow-ball, class_noun: ball, images: [yellow-ball/00.png]}]"


def _args(tmp: Path, *extra: str) -> list[str]:
    return ["--config", str(DEMO), "--set", f"data.root={tmp / 'subjects'}", "--set", f"job.storage={tmp / 'storage'}",
            "--set", "model.base=tiny", "--set", "model.dino=tiny", "--set", "model.clip=tiny",
            "--set", f"data.subjects={ONE}", "--set", "train.num_instance_images=1",
            "--set", "priors.count=4", "--set", "sampler.steps=2", "--set", "train.validate_every=0",
            "--set", "job.methods=[comfusion]", "--set", "job.cpus_per_trainer=1.0", *extra]


def _client(tmp: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{tmp / 'storage' / 'mlflow.db'}")


def _runs(tmp: Path, name: str) -> list:
    client = _client(tmp)
    return client.search_runs([client.get_experiment_by_name(name).experiment_id])


@pytest.fixture(scope="module")
def cluster():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_the_same_job_again_reuses_its_finished_runs(cluster, tmp_path, capsys):
    write_demo_subjects(tmp_path / "subjects")
    args = _args(tmp_path, "--set", "train.steps=4", "--set", "train.checkpoint_every=2", "--set", "job.name=again")
    assert train_many.main(args) == 0
    first = _runs(tmp_path, "again")
    capsys.readouterr()
    assert train_many.main(args) == 0
    out = capsys.readouterr().out
    assert "0 to train, 1 done before" in out
    assert any(ln.startswith("yellow-ball ") and " reused " in ln for ln in out.splitlines())
    assert [r.info.run_id for r in _runs(tmp_path, "again")] == [r.info.run_id for r in first]
    assert len(_client(tmp_path).search_model_versions("name = 'yellow-ball'")) == 1
    # a changed config is a new training, not a reuse
    assert train_many.main(args[:-2] + ["--set", "job.name=again", "--set", "train.steps=5"]) == 0
    assert len(_runs(tmp_path, "again")) == 2


def test_a_failure_that_would_repeat_is_not_retried(cluster, tmp_path, capsys):
    write_demo_subjects(tmp_path / "subjects")
    ns = train_many.parse_args(_args(tmp_path, "--set", "train.steps=4", "--set", "job.name=broken",
                                     "--set", "job.max_failures=3"))
    cfg = load_config(ns.config, ns.set)
    storage = Path(cfg.job.storage)
    subjects, errors = validate_subjects(cfg.data.subjects, cfg.data, cfg.model.resolution, load_pixels=False)
    assert not errors
    priors = train_many.make_all_priors(cfg, subjects, storage)
    runs, _ = train_many.plan_runs(cfg, subjects, priors, storage, use_gpu=False)
    # the photo breaks after the driver checked it: the worker's own check fails, every time it would run
    photo = Path(subjects[0].image_paths[0])
    photo.write_bytes(photo.read_bytes()[:60])
    rows = train_many.train_all(cfg, runs, storage, use_gpu=False)
    assert [r["status"] for r in rows] == ["failed"]
    assert rows[0]["error"].startswith("SubjectError") and "00.png" in rows[0]["error"]
    run = _client(tmp_path).get_run(runs[0].run_id)
    assert run.info.status == "FAILED" and run.data.tags["error"] == rows[0]["error"]
    assert "resumed_from_step" not in run.data.tags  # the tag says the worker ended it, not Ray's retries


def test_a_killed_driver_resubmitted_resumes_its_runs(tmp_path):
    """The driver (and the local cluster it started) is killed mid-training; the same job
    submitted again resumes the run from its last checkpoint, logging into the same MLflow run."""
    write_demo_subjects(tmp_path / "subjects")
    args = _args(tmp_path, "--set", "train.steps=40", "--set", "train.checkpoint_every=2", "--set", "job.name=crash")
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": "local"}
    driver = subprocess.Popen([sys.executable, str(REPO / "jobs" / "train_many.py"), *args], cwd=REPO, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert _wait_for_a_checkpoint(tmp_path / "storage", timeout=600), "no checkpoint was registered"
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    time.sleep(3)
    (killed,) = _runs(tmp_path, "crash")
    assert killed.info.status == "RUNNING"  # the driver died: nobody ended it

    again = subprocess.run([sys.executable, str(REPO / "jobs" / "train_many.py"), *args], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming run" in again.stdout
    (run,) = _runs(tmp_path, "crash")  # no second run
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    assert int(run.data.tags["resumed_from_step"]) >= 2
    steps = [m.step for m in _client(tmp_path).get_metric_history(run.info.run_id, "loss/total")]
    assert steps == list(range(1, 41))  # every step once
    assert len(_client(tmp_path).search_model_versions("name = 'yellow-ball'")) == 1


def _wait_for_a_checkpoint(storage: Path, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if list((storage / "resume").glob("*/*/state.json")):  # renamed into place complete
            return True
        time.sleep(0.5)
    return False
