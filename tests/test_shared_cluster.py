"""A job shares its cluster with a Serve app (as after `make demo`): pools and trainer slots are
sized from what the cluster can schedule, and a job that can get nothing stops with a message
naming what it asked for, what is free and what holds it.

Real local Ray (2 CPUs) with a real Serve deployment holding CPUs, real MLflow (sqlite), the
tiny preset; nothing is mocked.
"""
from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import ray
from mlflow import MlflowClient
from ray import serve

from cluster_helpers import start_serve
from jobs import train_many
from jobs.demo_subjects import write_demo_subjects

pytestmark = pytest.mark.ray
DEMO = Path(__file__).parents[1] / "configs" / "demo.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@serve.deployment
class Holder:
    """Stands for the demo's app: holds CPUs and does nothing."""

    def __call__(self, request) -> str:
        return "ok"


@pytest.fixture(scope="module")
def cluster():
    # the dashboard too: the "held by" part of the message comes from Ray's state API
    start_serve(include_dashboard=True, dashboard_port=_free_port())
    yield
    serve.shutdown()
    ray.shutdown()


def _hold(cpus: float) -> None:
    serve.run(Holder.options(ray_actor_options={"num_cpus": cpus}).bind(), name="holder", route_prefix="/holder")


def _args(tmp: Path, *extra: str) -> list[str]:
    subjects = "[{id: yellow-ball, class_noun: toaster, images: [yellow-ball/00.png]}]"  # a class with no priors yet
    return ["--config", str(DEMO), "--set", f"data.root={tmp / 'subjects'}", "--set", f"job.storage={tmp / 'storage'}",
            "--set", "model.base=tiny", "--set", "model.dino=tiny", "--set", "model.clip=tiny",
            "--set", f"data.subjects={subjects}", "--set", "train.num_instance_images=1",
            "--set", "priors.count=4", "--set", "sampler.steps=2", "--set", "train.steps=4",
            "--set", "train.checkpoint_every=2", "--set", "train.validate_every=0",
            "--set", "job.methods=[comfusion, dreambooth]", "--set", "job.cpus_per_trainer=0.5", *extra]


def test_nothing_fits_stops_with_what_holds_the_cluster(cluster, tmp_path, capsys):
    write_demo_subjects(tmp_path / "subjects")
    _hold(2.0)
    t0 = time.monotonic()
    code = train_many.main(_args(tmp_path, "--set", "job.schedule_timeout_s=3", "--set", "job.name=blocked"))
    err = capsys.readouterr().err
    assert code == 1
    assert time.monotonic() - t0 < 120  # stopped, did not wait forever
    assert "needs 0.5 CPU" in err and "job.schedule_timeout_s" in err
    assert "free now: CPU 0 of 2" in err
    assert "held by:" in err and "Holder" in err


def test_a_job_completes_beside_an_app_holding_cpus(cluster, tmp_path, capsys):
    write_demo_subjects(tmp_path / "subjects")
    _hold(1.25)  # what the demo's app holds: 1.25 of the 2 CPUs
    code = train_many.main(_args(tmp_path, "--set", "job.name=beside"))
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    assert "on 1 trainer slot(s)" in out  # 0.75 CPU free: one 0.5-CPU slot, its runs one after another
    client = MlflowClient(f"sqlite:///{tmp_path / 'storage' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("beside").experiment_id])
    assert sorted(r.data.tags["method"] for r in runs) == ["comfusion", "dreambooth"]
    assert all(r.info.status == "FINISHED" and r.data.metrics["final/step"] == 4 for r in runs)
    # the summary table: one format per column
    rows = [ln.split() for ln in out.splitlines() if ln.startswith("yellow-ball ")]
    assert len(rows) == 2
    for row in rows:
        assert row[2] == "ok" and row[3] == "4"
        wall = row[4]
        assert wall.count(".") == 1 and len(wall.split(".")[1]) == 1  # wall_s with one decimal
        assert len(row[5].split(".")[1]) == 4  # final_loss with four
