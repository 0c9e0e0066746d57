"""One subject's finetune on Ray Train: the per-worker loop, and the Tune trial that fits it.

The worker only wires things: device, the subject and its priors, resume from
`ray.train.get_checkpoint()`, checkpoints reported every `train.checkpoint_every` steps, and
MLflow logging through the trainer's callbacks. The algorithm is `comfusion.train`.
"""
from __future__ import annotations

import os
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import ray.train
import ray.train.torch
import ray.tune
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from comfusion.checkpoint import verify_checkpoint
from comfusion.config import JobConfig, SubjectSpec
from comfusion.data import check_subject
from comfusion.priors import read_priors
from comfusion.train import SubjectTrainer
from jobs.tracking import RunLogger


@dataclass(frozen=True)
class SubjectRun:
    """Everything one (subject, method) training needs; crosses the Ray boundary whole."""

    cfg: JobConfig  # with `method` set and `data.scenes` the subject's scenes
    spec: SubjectSpec
    run_id: str  # the MLflow run, made by the driver so a restarted worker logs into it
    tracking_uri: str
    priors_dir: str
    checkpoint_dir: str  # where the subject checkpoint is published
    ray_storage: str  # Ray Train's storage_path
    use_gpu: bool

    @property
    def name(self) -> str:
        return f"{self.spec.id}-{self.cfg.method}-{self.run_id[:8]}"


class _Reporter:
    """Reports a resumable checkpoint to Ray Train every `train.checkpoint_every` steps."""

    def __init__(self, logger: RunLogger):
        self.logger = logger

    def on_checkpoint(self, step: int, trainer: SubjectTrainer) -> None:
        self.logger.flush()  # metrics up to this step are final now
        with tempfile.TemporaryDirectory() as tmp:
            state = trainer.save_state(Path(tmp) / "state")
            metrics = {"step": step, **{f"loss_{k}": v for k, v in trainer.last_terms.items()}}
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(state)))


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker: train one subject, resuming from the latest reported checkpoint."""
    run: SubjectRun = config["run"]
    cfg = run.cfg
    if not run.use_gpu:  # one torch thread per CPU slot the worker holds
        torch.set_num_threads(max(1, int(cfg.job.cpus_per_trainer)))
    subject = check_subject(run.spec, cfg.data, cfg.model.resolution)
    priors = read_priors(run.priors_dir)
    logger = RunLogger(run.tracking_uri, run.run_id)
    # which process trains this run, for operators (and the fault test)
    logger.client.set_tag(run.run_id, "worker", f"{socket.gethostname()}:{os.getpid()}")
    trainer = SubjectTrainer(cfg, subject, priors, device=ray.train.torch.get_device(),
                             callbacks=[logger, _Reporter(logger)])
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            trainer.load_state(folder)
        print(f"[{run.name}] resumed at step {trainer.step}", flush=True)
        logger.client.set_tag(run.run_id, "resumed_from_step", str(trainer.step))
    trainer.run()
    folder = trainer.publish(run.checkpoint_dir)
    final = {f"loss/{k}": v for k, v in trainer.last_terms.items()}
    version = logger.finish(folder, subject.id, cfg.method, {"final/step": trainer.step})
    ray.train.report({"step": trainer.step, "final_loss": final.get("loss/total", float("nan")),
                      "checkpoint_dir": str(folder), "model_version": version})


def fit_subject(run: SubjectRun) -> dict:
    """Fit one TorchTrainer (one worker, one GPU where there are GPUs) and summarise it."""
    cfg, t0 = run.cfg, time.time()
    resources = None if run.use_gpu else {"CPU": cfg.job.cpus_per_trainer}
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config={"run": run},
        scaling_config=ScalingConfig(num_workers=1, use_gpu=run.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=run.name, storage_path=run.ray_storage,
                             failure_config=FailureConfig(max_failures=cfg.job.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)))
    summary = {"subject": run.spec.id, "method": cfg.method, "run_id": run.run_id}
    try:
        trainer.fit()
        summary.update(status="ok", **_published(run))
        _end_run(run, "FINISHED")
    except Exception as e:  # noqa: BLE001  (a subject that fails for good is reported; the others go on)
        summary.update(status="failed", error=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
        _end_run(run, "FAILED")
    summary["wall_s"] = round(time.time() - t0, 1)
    return summary


def _published(run: SubjectRun) -> dict:
    """What the finished run left: the verified checkpoint, its final loss, the model version."""
    from mlflow import MlflowClient  # noqa: PLC0415

    meta = verify_checkpoint(run.checkpoint_dir)
    client = MlflowClient(run.tracking_uri)
    versions = client.search_model_versions(f"run_id = '{run.run_id}'")
    step = client.get_run(run.run_id).data.metrics.get("final/step")
    return dict(steps=int(step) if step is not None else None, final_loss=meta.metrics.get("loss/total"),
                checkpoint=run.checkpoint_dir, version=int(versions[0].version) if versions else None)


def _end_run(run: SubjectRun, status: str) -> None:
    from mlflow import MlflowClient  # noqa: PLC0415

    MlflowClient(run.tracking_uri).set_terminated(run.run_id, status=status)


def tune_trial(config: dict, runs: list[SubjectRun]) -> None:
    """A Tune trial: one (subject, method) — Tune runs as many at once as there is room for."""
    ray.tune.report(fit_subject(runs[config["index"]]))
