"""jobs/train_many.py on a real local Ray cluster and a real MLflow backend (sqlite + folder).

Tiny preset on the CPU; nothing is mocked.
"""
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import ray
from mlflow import MlflowClient

from comfusion.checkpoint import verify_checkpoint
from jobs import train_many
from jobs.demo_subjects import write_demo_subjects

pytestmark = pytest.mark.ray
DEMO = Path(__file__).parents[1] / "configs" / "demo.yaml"


@pytest.fixture(scope="module")
def cluster():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _args(tmp, *extra):
    # the tiny model, not the demo's toy: these tests check the Ray path, not the pictures
    return ["--config", str(DEMO), "--set", f"data.root={tmp / 'subjects'}", "--set", f"job.storage={tmp / 'storage'}",
            "--set", "model.base=tiny", "--set", "model.dino=tiny", "--set", "model.clip=tiny",
            "--set", "train.num_instance_images=1", "--set", "priors.count=4", "--set", "sampler.steps=2",
            "--set", "job.methods=[comfusion]",
            "--set", "job.cpus_per_trainer=1.0", *extra]


def _client(tmp):
    return MlflowClient(f"sqlite:///{tmp / 'storage' / 'mlflow.db'}")


def test_two_subjects_and_a_bad_one(cluster, tmp_path, capsys):
    write_demo_subjects(tmp_path / "subjects")
    (tmp_path / "subjects" / "broken.png").write_text("not an image")
    bad = ("[{id: yellow-ball, class_noun: ball, images: [yellow-ball/00.png]},"
           " {id: blue-box, class_noun: box, identifier: zwx, images: [blue-box/00.png]},"
           " {id: broken, class_noun: ball, images: [broken.png]}]")
    code = train_many.main(_args(tmp_path, "--set", f"data.subjects={bad}", "--set", "train.steps=4",
                                 "--set", "train.checkpoint_every=2", "--set", "train.validate_every=2"))
    out = capsys.readouterr()
    assert code == 1  # the bad subject counts as a failure ...
    assert "broken" in out.err and "broken.png" in out.err
    client = _client(tmp_path)
    exp = client.get_experiment_by_name("demo")
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.data.tags["subject"] for r in runs) == ["blue-box", "yellow-ball"]  # ... the good ones train
    for r in runs:
        assert r.info.status == "FINISHED" and r.data.tags["method"] == "comfusion"
        assert r.data.params["train.steps"] == "4" and r.data.params["method"] == "comfusion"
        for key in ("loss/instance", "loss/class_scene", "loss/fusion_instance", "loss/fusion_scene", "loss/total"):
            assert [m.step for m in client.get_metric_history(r.info.run_id, key)] == [1, 2, 3, 4]
        assert any(m.value != 0 for m in client.get_metric_history(r.info.run_id, "loss/fusion_scene"))
        artifacts = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert "checkpoint" in artifacts and "images" in artifacts  # validation sample images
        subject = r.data.tags["subject"]
        mv = client.get_model_version_by_alias(subject, "serving")
        assert mv.run_id == r.info.run_id and mv.tags["class_noun"] == r.data.tags["class_noun"]
    for line in ("yellow-ball", "blue-box"):
        assert any(line in row and " ok " in row for row in out.out.splitlines())


def test_worker_killed_after_a_checkpoint_resumes(cluster, tmp_path):
    write_demo_subjects(tmp_path / "subjects")
    one = "[{id: yellow-ball, class_noun: ball, images: [yellow-ball/00.png]}]"
    args = _args(tmp_path, "--set", f"data.subjects={one}", "--set", "train.steps=40",
                 "--set", "train.checkpoint_every=2", "--set", "train.validate_every=0",
                 "--set", "job.max_failures=2", "--set", "job.name=fault")
    result = []
    job = threading.Thread(target=lambda: result.append(train_many.main(args)))
    job.start()
    killed = _kill_worker_after_first_checkpoint(tmp_path / "storage", timeout=300)
    job.join(timeout=600)
    assert killed and result == [0]
    client = _client(tmp_path)
    runs = client.search_runs([client.get_experiment_by_name("fault").experiment_id])
    assert len(runs) == 1  # the restarted worker logged into the same run
    run = runs[0]
    assert 2 <= int(run.data.tags["resumed_from_step"]) < 40  # killed mid-run, resumed from a checkpoint
    assert run.data.metrics["final/step"] == 40
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss/total")]
    assert steps == list(range(1, 41))  # every step once, none twice
    mv = client.get_model_version_by_alias("yellow-ball", "serving")
    assert mv.run_id == run.info.run_id
    assert len(client.search_model_versions("name = 'yellow-ball'")) == 1
    ckpt = tmp_path / "storage" / "checkpoints" / "fault" / "yellow-ball" / "comfusion" / run.info.run_id
    assert verify_checkpoint(ckpt).id == "yellow-ball"
    assert not (tmp_path / "storage" / "resume" / "fault" / run.info.run_id).exists()  # published: state removed


def test_one_slot_trains_the_runs_one_after_another_in_one_worker(cluster, tmp_path, capsys):
    """The process starts are paid once per slot: with one slot, both subjects (and both methods)
    train in the same worker process, each in its own MLflow run and registered."""
    write_demo_subjects(tmp_path / "subjects")
    code = train_many.main(_args(tmp_path, "--set", "train.steps=2", "--set", "train.checkpoint_every=1",
                                 "--set", "train.validate_every=0", "--set", "job.max_concurrent=1",
                                 "--set", "job.methods=[comfusion, dreambooth]", "--set", "job.name=queue"))
    out = capsys.readouterr().out
    assert code == 0 and "on 1 trainer slot(s)" in out
    client = _client(tmp_path)
    runs = client.search_runs([client.get_experiment_by_name("queue").experiment_id])
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    assert len({r.data.tags["worker"] for r in runs}) == 1  # one worker process trained all four
    assert sorted(r.data.tags["method"] for r in runs) == ["comfusion", "comfusion", "dreambooth", "dreambooth"]
    for r in runs:
        assert client.get_model_version_by_alias(r.data.tags["subject"], r.data.tags["method"]).run_id == r.info.run_id
    assert not list((tmp_path / "storage" / "resume" / "queue").glob("*/state.json"))


def test_run_queue_hands_a_restarted_slot_its_run_and_gives_up_after_max_failures(cluster):
    from jobs.train_worker import RunQueue

    q = RunQueue.remote(3, 1)
    assert ray.get(q.claim.remote(0)) == 0 and ray.get(q.claim.remote(1)) == 1
    assert ray.get(q.claim.remote(0)) == 0  # slot 0's worker restarted: the same run, one restart
    assert ray.get(q.claim.remote(0)) == 2  # a second restart on run 0 is one too many: the next run
    ray.get(q.finish.remote(1, 1, {"status": "ok"}))
    assert ray.get(q.claim.remote(1)) is None  # nothing left
    assert ray.get(q.give_up.remote(0, "slot 0 stopped")) == 2
    results = ray.get(q.results.remote())
    assert results[0]["status"] == "failed" and "lost 2 times" in results[0]["error"]
    assert results[1]["status"] == "ok" and results[1]["wall_s"] >= 0
    assert results[2] == {"status": "failed", "error": "slot 0 stopped", "wall_s": results[2]["wall_s"]}


def _kill_worker_after_first_checkpoint(storage: Path, timeout: float) -> bool:
    """SIGKILL the Ray Train worker process once the run's resumable state has been saved (the
    folder appears complete, renamed into place). The worker names its process in the run's
    `worker` tag."""
    deadline = time.time() + timeout
    client = MlflowClient(f"sqlite:///{storage / 'mlflow.db'}")
    while time.time() < deadline:
        if list((storage / "resume" / "fault").glob("*/state.json")):
            runs = client.search_runs([client.get_experiment_by_name("fault").experiment_id])
            worker = runs[0].data.tags.get("worker") if runs else None
            if worker:
                os.kill(int(worker.rsplit(":", 1)[1]), signal.SIGKILL)
                return True
        time.sleep(0.2)
    return False
