"""One subject's finetune on Ray Train: the per-worker loop, and the Tune trial that fits it.

The worker only wires things: device, the subject and its priors, resume from
`ray.train.get_checkpoint()`, checkpoints reported every `train.checkpoint_every` steps, and
MLflow logging through the trainer's callbacks. The algorithm is `comfusion.train`.
"""
from __future__ import annotations

import logging
import os
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import ray.train
import ray.tune
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

from comfusion.checkpoint import checkpoint_sizes
from comfusion.config import JobConfig, SubjectSpec

# Light at import: the Tune trial and the Train controller load this module only to find the
# functions below; the algorithm (torch, diffusers) and MLflow are imported where they run, so
# those two processes start in a fraction of the time.


class RunFailed(RuntimeError):
    """The worker ended the run as FAILED (a failure that would repeat); the message is its reason."""


@dataclass(frozen=True)
class SubjectRun:
    """Everything one (subject, method) training needs; crosses the Ray boundary whole."""

    cfg: JobConfig  # with `method` set (the subject's scenes: `check_subject` of `spec`)
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

    def __init__(self, logger):
        self.logger = logger

    def on_checkpoint(self, step: int, trainer) -> None:
        self.logger.flush()  # metrics up to this step are final now
        with tempfile.TemporaryDirectory() as tmp:
            state = trainer.save_state(Path(tmp) / "state")
            metrics = {"step": step, **{f"loss_{k}": v for k, v in trainer.last_terms.items()}}
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(state)))


def say(line: str) -> None:
    """One line to the job's log, once. Ray Train turns a worker's print into a log record, and
    prints it a second time when a library has wrapped sys.stdout (MLflow does); the process's
    own stdout is written once either way."""
    print(line, file=sys.__stdout__, flush=True)


class _Progress:
    """One line per run at most every `job.progress_every_s`: step, total, loss, speed, time left."""

    def __init__(self, name: str, total: int, every_s: float):
        self.name, self.total, self.every_s = name, total, every_s
        self.t0 = self.last = time.monotonic()
        self.first_step: int | None = None

    def on_step(self, step: int, terms: dict[str, float], lr: float) -> None:
        now = time.monotonic()
        if self.first_step is None:
            self.first_step, self.t0 = step - 1, now
        if now - self.last < self.every_s and step not in (self.first_step + 1, self.total):
            return
        self.last = now
        done = step - self.first_step
        loss = f"[{self.name}] step {step}/{self.total}  loss {terms.get('total', float('nan')):.4f}"
        if done <= 1:  # one step says nothing about the speed yet
            say(f"{loss}  starting")
            return
        rate = done / max(now - self.t0, 1e-9)
        say(f"{loss}  {rate:.1f} steps/s  {(self.total - step) / rate:.0f} s left")


def _quiet_ray_train() -> None:
    """Ray Train's INFO lines in a worker (one or two per checkpoint, each repeating the metrics)
    would drown the progress lines; some of its loggers are named by file path, not module."""
    package = os.path.dirname(ray.train.__file__)
    for name in ["ray.train", *logging.root.manager.loggerDict]:
        if name == "ray.train" or name.startswith(("ray.train.", package)):
            logging.getLogger(name).setLevel(logging.WARNING)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker: train one subject, resuming from the latest reported checkpoint.

    A failure that would repeat on every try (a non-finite loss, a bad photo, a model or config
    that cannot load) ends the run at once as FAILED, naming the reason, instead of spending
    `job.max_failures` restarts on it; anything else (a lost worker, a network blip) is raised
    and retried from the last checkpoint.
    """
    from comfusion.models import ModelNotFoundError  # noqa: PLC0415

    run: SubjectRun = config["run"]
    _quiet_ray_train()
    try:
        _train_subject(run)
    except (ValueError, ModelNotFoundError) as e:  # NonFiniteLossError, ImageError, SubjectError, ConfigError, ...
        reason = one_line(e)
        say(f"[{run.name}] failed, not retried: {reason}")
        client = _mlflow(run)
        client.set_tag(run.run_id, "error", reason)
        client.set_terminated(run.run_id, status="FAILED")
        ray.train.report({"failed": reason})


def _train_subject(run: SubjectRun) -> None:
    import torch  # noqa: PLC0415

    from comfusion.data import check_subject  # noqa: PLC0415
    from comfusion.priors import read_priors  # noqa: PLC0415
    from jobs.tracking import RunLogger  # noqa: PLC0415

    cfg = run.cfg
    if not run.use_gpu:  # one torch thread per CPU slot the worker holds
        torch.set_num_threads(max(1, int(cfg.job.cpus_per_trainer)))
    subject = check_subject(run.spec, cfg.data, cfg.model.resolution)
    priors = read_priors(run.priors_dir)
    logger = RunLogger(run.tracking_uri, run.run_id, outage_s=cfg.job.mlflow_outage_s,
                       live_every_s=cfg.job.metrics_every_s)
    # which process trains this run, for operators (and the fault test)
    logger.client.set_tag(run.run_id, "worker", f"{socket.gethostname()}:{os.getpid()}")
    monitor = _system_metrics(run)
    try:
        _fit_and_publish(run, subject, priors, logger)
    finally:
        logger.close()
        if monitor is not None:
            monitor.finish()


def _fit_and_publish(run: SubjectRun, subject, priors, logger) -> None:
    import ray.train.torch  # noqa: PLC0415

    from comfusion.train import SubjectTrainer  # noqa: PLC0415

    cfg = run.cfg
    trainer = SubjectTrainer(cfg, subject, priors, device=ray.train.torch.get_device(),
                             callbacks=[logger, _Reporter(logger),
                                        _Progress(f"{run.spec.id} · {cfg.method}", cfg.train.steps,
                                                  cfg.job.progress_every_s)])
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            trainer.load_state(folder)
        say(f"[{run.name}] resumed at step {trainer.step}")
        logger.client.set_tag(run.run_id, "resumed_from_step", str(trainer.step))
    trainer.run()
    folder = trainer.publish(run.checkpoint_dir)
    final = {f"loss/{k}": v for k, v in trainer.last_terms.items()}
    logger.client.set_tag(run.run_id, "adapter", cfg.train.adapter)  # the checkpoint kind: full or lora
    version = logger.finish(folder, subject.id, cfg.method, {"final/step": trainer.step, **checkpoint_sizes(folder)})
    logger.client.set_terminated(run.run_id, status="FINISHED")
    ray.train.report({"step": trainer.step, "final_loss": final.get("loss/total", float("nan")),
                      "checkpoint_dir": str(folder), "model_version": version})


def _system_metrics(run: SubjectRun):
    """MLflow's system metrics (CPU, memory, disk, network, GPU) sampled into the run while it
    trains (`job.system_metrics`); None when off or when MLflow cannot start the monitor."""
    if not run.cfg.job.system_metrics:
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor  # noqa: PLC0415

    every = run.cfg.job.metrics_every_s or 10.0
    try:
        monitor = SystemMetricsMonitor(run.run_id, sampling_interval=every, resume_logging=True,
                                       tracking_uri=run.tracking_uri)
        monitor.start()
        return monitor
    except Exception as e:  # noqa: BLE001 - system metrics are a convenience; training goes on
        say(f"[{run.name}] no system metrics ({type(e).__name__}: {e})")
        return None


def one_line(e: BaseException) -> str:
    """An error as one line for a summary table or an MLflow tag: its type and its message with the
    line breaks folded (a subject's problems come one per line), at most 300 characters. An error
    that carries a worker's traceback (Ray's) is shown as the traceback's last line, its cause."""
    text = str(e)
    if "Traceback (most recent call last)" in text:
        return " ".join(next(ln for ln in reversed(text.splitlines()) if ln.strip()).split())[:300]
    text = " ".join(text.split())
    return f"{type(e).__name__}: {text if len(text) <= 300 else text[:297] + '...'}"


def fit_subject(run: SubjectRun) -> dict:
    """Fit one TorchTrainer (one worker, one GPU where there are GPUs) and summarise it."""
    from ray.train.torch import TorchTrainer  # noqa: PLC0415

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
    except Exception as e:  # noqa: BLE001  (a subject that fails for good is reported; the others go on)
        summary.update(status="failed", error=str(e) if isinstance(e, RunFailed) else one_line(e))
        _end_run(run, "FAILED")
    summary["wall_s"] = round(time.time() - t0, 1)
    return summary


def _published(run: SubjectRun) -> dict:
    """What the finished run left, as its MLflow run records it (the worker published, registered
    and finished it): steps, final loss, checkpoint folder, model version."""
    client = _mlflow(run)
    record = client.get_run(run.run_id)
    if record.info.status == "FAILED":  # a failure that would repeat: ended by the worker
        raise RunFailed(record.data.tags.get("error", "the run failed"))
    metrics = record.data.metrics
    versions = client.search_model_versions(f"run_id = '{run.run_id}'")
    step = metrics.get("final/step")
    return dict(steps=int(step) if step is not None else None, final_loss=metrics.get("loss/total"),
                checkpoint=run.checkpoint_dir, version=int(versions[0].version) if versions else None)


def _end_run(run: SubjectRun, status: str) -> None:
    _mlflow(run).set_terminated(run.run_id, status=status)


def _mlflow(run: SubjectRun):
    """A client of the run's MLflow that rides out outages of up to `job.mlflow_outage_s`."""
    from mlflow import MlflowClient  # noqa: PLC0415

    from jobs.tracking import PatientClient  # noqa: PLC0415

    return PatientClient(MlflowClient(run.tracking_uri), run.cfg.job.mlflow_outage_s)


def tune_trial(config: dict, runs: list[SubjectRun]) -> None:
    """A Tune trial: one (subject, method) — Tune runs as many at once as there is room for.

    While the TorchTrainer fits (in a thread), the trial reports the run's latest step and loss
    as MLflow has them every `job.metrics_every_s`, so Tune's progress table shows them live; the
    last report is the run's summary (`train_many.train_all` reads its `status`).
    """
    from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

    run = runs[config["index"]]
    every = run.cfg.job.metrics_every_s or run.cfg.job.progress_every_s
    with ThreadPoolExecutor(1, thread_name_prefix="fit") as pool:
        fitting = pool.submit(fit_subject, run)
        seen = None
        while not _done_within(fitting, every):
            live = _latest_step(run)
            if live is not None and live != seen:
                seen = live
                ray.tune.report({"step": live[0], "loss": live[1], "of": run.cfg.train.steps})
        summary = fitting.result()
    last = _latest_step(run) or (summary.get("steps") or 0, summary.get("final_loss"))
    ray.tune.report({"step": last[0], "loss": last[1], "of": run.cfg.train.steps, **summary})


def _done_within(future, seconds: float) -> bool:
    from concurrent.futures import TimeoutError as FutureTimeout  # noqa: PLC0415

    try:
        future.exception(timeout=seconds)
        return True
    except FutureTimeout:
        return False


def _latest_step(run: SubjectRun) -> tuple[int, float] | None:
    """(step, total loss) of the run's last logged step, or None (none yet, or MLflow not answering)."""
    try:
        history = _mlflow(run).client.get_metric_history(run.run_id, "loss/total")
    except Exception:  # noqa: BLE001 - a progress line is skipped, nothing else
        return None
    if not history:
        return None
    last = max(history, key=lambda m: m.step)
    return int(last.step), float(last.value)
