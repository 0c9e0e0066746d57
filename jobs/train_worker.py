"""Subjects' finetunes on Ray Train: the training slot's worker loop and the queue that feeds it.

A job runs one Ray Train trainer per training slot (a GPU, or `job.cpus_per_trainer` CPUs); its worker
takes the job's (subject, method) runs from a `RunQueue` one after another, so the process starts
(Train controller, worker, imports) are paid once per slot, not once per subject. Each run keeps
its own resumable state (`SubjectRun.resume_dir`, saved every `train.checkpoint_every` steps): a
restarted worker is handed the run it held and resumes it there, and so does a job submitted
again after its driver died. The worker only wires things: device, the subject and its priors,
MLflow logging through the trainer's callbacks. The algorithm is `comfusion.train`.
"""
from __future__ import annotations

import gc
import logging
import os
import shutil
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import ray
import ray.train
from ray.train import FailureConfig, RunConfig, ScalingConfig

from comfusion.config import JobConfig, SubjectSpec

# Light at import: the driver and the Train controller load this module only to find the
# functions below; the algorithm (torch, diffusers) and MLflow are imported where they run, so
# those processes start in a fraction of the time.


@dataclass(frozen=True)
class SubjectRun:
    """Everything one (subject, method) training needs; crosses the Ray boundary whole."""

    cfg: JobConfig  # with `method` set (the subject's scenes: `check_subject` of `spec`)
    spec: SubjectSpec
    run_id: str  # the MLflow run, made by the driver so a restarted worker logs into it
    tracking_uri: str
    priors_dir: str
    checkpoint_dir: str  # where the subject checkpoint is published
    resume_dir: str  # the run's latest resumable state (removed once the run is published)
    use_gpu: bool

    @property
    def name(self) -> str:
        return f"{self.spec.id}-{self.cfg.method}-{self.run_id[:8]}"


@ray.remote(num_cpus=0)
class RunQueue:
    """Hands a job's runs (by index) to its training slots and keeps what became of each.

    A slot asking again while it holds a run (its worker was restarted) gets that run back, one
    attempt more; after `max_failures` restarts on one run the run is given up and the slot gets
    the next. Wall time of a run counts from its first claim.
    """

    def __init__(self, n_runs: int, max_failures: int):
        self.pending, self.max_failures = deque(range(n_runs)), max_failures
        self.held: dict[int, int] = {}  # slot -> run index
        self.restarts: dict[int, int] = {}
        self.started: dict[int, float] = {}
        self.outcomes: dict[int, dict] = {}

    def claim(self, slot: int) -> int | None:
        if slot in self.held:
            i = self.held[slot]
            self.restarts[i] = self.restarts.get(i, 0) + 1
            if self.restarts[i] <= self.max_failures:
                return i
            self.give_up(slot, f"its worker was lost {self.restarts[i]} times (job.max_failures "
                               f"{self.max_failures})")
        if not self.pending:
            return None
        i = self.pending.popleft()
        self.held[slot], self.started[i] = i, time.time()
        return i

    def finish(self, slot: int, i: int, outcome: dict) -> None:
        self.outcomes[i] = {**outcome, "wall_s": round(time.time() - self.started[i], 1)}
        self.held.pop(slot, None)

    def give_up(self, slot: int, reason: str) -> int | None:
        """The slot's run failed for good (`reason`); returns its index, or None if it held none."""
        i = self.held.get(slot)
        if i is not None:
            self.finish(slot, i, {"status": "failed", "error": reason})
        return i

    def results(self) -> dict[int, dict]:
        return dict(self.outcomes)


class _Saver:
    """Saves the run's resumable state every `train.checkpoint_every` steps."""

    def __init__(self, logger, folder: str):
        self.logger, self.folder = logger, folder

    def on_checkpoint(self, step: int, trainer) -> None:
        self.logger.flush()  # metrics up to this step are final now
        trainer.save_state(self.folder)  # written aside and renamed into place


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


def slot_loop_per_worker(config: dict) -> None:
    """Ray Train worker of one training slot: train the runs the queue hands out, one after
    another, until none is left."""
    runs, queue, slot = config["runs"], config["queue"], config["slot"]
    _quiet_ray_train()
    while (i := ray.get(queue.claim.remote(slot))) is not None:
        run = runs[i]
        say(f"[{run.name}] training on slot {slot} (run {i + 1} of {len(runs)})")
        ray.get(queue.finish.remote(slot, i, train_one(run)))
        gc.collect()  # the finished run's model, before the next one loads
        _empty_gpu_cache(run)


def train_one(run: SubjectRun) -> dict:
    """Train, publish and register one run, resuming from its saved state; its summary row.

    A failure that would repeat on every try (a non-finite loss, a bad photo, a model or config
    that cannot load) ends the run at once as FAILED, naming the reason, instead of spending
    `job.max_failures` restarts on it; anything else (a lost worker) ends the process, and the
    restarted worker resumes the run from its last saved state.
    """
    from comfusion.models import ModelNotFoundError  # noqa: PLC0415

    summary = {"subject": run.spec.id, "method": run.cfg.method, "run_id": run.run_id}
    try:
        summary.update(status="ok", **_train_subject(run))
    except (ValueError, ModelNotFoundError) as e:  # NonFiniteLossError, ImageError, SubjectError, ConfigError, ...
        reason = one_line(e)
        say(f"[{run.name}] failed, not retried: {reason}")
        client = _mlflow(run)
        client.set_tag(run.run_id, "error", reason)
        client.set_terminated(run.run_id, status="FAILED")
        summary.update(status="failed", error=reason)
    return summary


def _train_subject(run: SubjectRun) -> dict:
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
        return _fit_and_publish(run, subject, priors, logger)
    finally:
        logger.close()
        if monitor is not None:
            monitor.finish()


def _fit_and_publish(run: SubjectRun, subject, priors, logger) -> dict:
    from comfusion.checkpoint import checkpoint_sizes  # noqa: PLC0415
    from comfusion.train import SubjectTrainer  # noqa: PLC0415

    cfg = run.cfg
    trainer = SubjectTrainer(cfg, subject, priors, device="cuda" if run.use_gpu else "cpu",
                             callbacks=[logger, _Saver(logger, run.resume_dir),
                                        _Progress(f"{run.spec.id} · {cfg.method}", cfg.train.steps,
                                                  cfg.job.progress_every_s)])
    if (Path(run.resume_dir) / "state.json").is_file():
        trainer.load_state(run.resume_dir)
        say(f"[{run.name}] resumed at step {trainer.step}")
        logger.client.set_tag(run.run_id, "resumed_from_step", str(trainer.step))
    trainer.run()
    folder = trainer.publish(run.checkpoint_dir)
    logger.client.set_tag(run.run_id, "adapter", cfg.train.adapter)  # the checkpoint kind: full or lora
    version = logger.finish(folder, subject.id, cfg.method, {"final/step": trainer.step, **checkpoint_sizes(folder)})
    logger.client.set_terminated(run.run_id, status="FINISHED")
    shutil.rmtree(run.resume_dir, ignore_errors=True)  # published: nothing left to resume
    return dict(steps=trainer.step, final_loss=trainer.last_terms.get("total"), checkpoint=str(folder),
                version=int(version) if version is not None else None)


def _empty_gpu_cache(run: SubjectRun) -> None:
    if run.use_gpu:
        import torch  # noqa: PLC0415

        torch.cuda.empty_cache()


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


def fit_slot(runs: list[SubjectRun], queue, slot: int, name: str, storage_path: str) -> str | None:
    """Fit one training slot's trainer (one worker, one GPU where there are GPUs) until the
    queue is empty; None when it ended normally, else why it stopped (its held run is given up).

    A plain `DataParallelTrainer`, not `TorchTrainer`: one worker trains alone, so there is no
    process group to set up, and the Train controller then never imports torch (about 3 s less
    per slot start on 2 cores). Ray gives the worker its GPU as CUDA_VISIBLE_DEVICES, so it is
    "cuda" (device 0) there."""
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer  # noqa: PLC0415

    cfg = runs[0].cfg
    resources = None if runs[0].use_gpu else {"CPU": cfg.job.cpus_per_trainer}
    # Ray Train restarts a lost worker; the queue limits restarts per run (job.max_failures), so
    # the slot itself may restart once more per run than that
    restarts = (cfg.job.max_failures + 1) * len(runs)
    trainer = DataParallelTrainer(
        slot_loop_per_worker, train_loop_config={"runs": runs, "queue": queue, "slot": slot},
        scaling_config=ScalingConfig(num_workers=1, use_gpu=runs[0].use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=storage_path,
                             failure_config=FailureConfig(max_failures=restarts)))
    try:
        trainer.fit()
        return None
    except Exception as e:  # noqa: BLE001  (the other slots go on with the queue)
        reason = one_line(e)
        ray.get(queue.give_up.remote(slot, reason))
        return reason


def end_run(run: SubjectRun, status: str) -> None:
    _mlflow(run).set_terminated(run.run_id, status=status)


def _mlflow(run: SubjectRun):
    """A client of the run's MLflow that rides out outages of up to `job.mlflow_outage_s`."""
    from mlflow import MlflowClient  # noqa: PLC0415

    from jobs.tracking import PatientClient  # noqa: PLC0415

    return PatientClient(MlflowClient(run.tracking_uri), run.cfg.job.mlflow_outage_s)
