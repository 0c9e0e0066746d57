"""MLflow wiring for the jobs: the backend, one experiment per job, one run per (subject, method),
and the callbacks through which a training worker logs into its run."""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from comfusion.config import JobConfig, flatten

LOSS_KEYS = ("instance", "class_scene", "fusion_instance", "fusion_scene", "total")


def tracking_uri(storage: str | os.PathLike) -> str:
    """`MLFLOW_TRACKING_URI` when set (a server), else a sqlite file in the job's storage."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(storage).resolve() / 'mlflow.db'}"


def artifact_root(storage: str | os.PathLike) -> str | None:
    """A local artifact folder beside the sqlite backend; a server manages its own."""
    if os.environ.get("MLFLOW_TRACKING_URI", "").startswith(("http://", "https://")):
        return None
    return (Path(storage).resolve() / "mlartifacts").as_uri()


def experiment_id(client: MlflowClient, name: str, storage: str | os.PathLike) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_root(storage))
    except mlflow.exceptions.MlflowException:  # created by a concurrent job meanwhile
        return client.get_experiment_by_name(name).experiment_id


def create_run(client: MlflowClient, exp_id: str, cfg: JobConfig, subject_id: str, class_noun: str,
               identifier: str) -> str:
    """A run named "<subject> · <method>", tagged for the UI, with the flattened config as params.

    Params and metric names are the same for every method, so the UI compares them side by side.
    """
    tags = {"subject": subject_id, "method": cfg.method, "class_noun": class_noun, "identifier": identifier,
            "job": cfg.job.name}
    run = client.create_run(exp_id, run_name=f"{subject_id} · {cfg.method}", tags=tags)
    params = [Param(k, _param_value(v)) for k, v in flatten(cfg).items()]
    for i in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[i:i + 100])
    return run.info.run_id


def _param_value(v) -> str:
    s = ", ".join(map(str, v)) if isinstance(v, list) else str(v)
    return s if len(s) <= 6000 else s[:5997] + "..."


def scene_slug(scene: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", scene.lower()).strip("_") or "class"


class RunLogger:
    """Training callbacks that log into one MLflow run from inside a worker.

    Per-step losses are buffered and written just before a checkpoint is reported. A worker
    that dies and resumes from its last checkpoint recomputes the same steps (resume is exact),
    and steps already in the run are not logged again, so no step appears twice.
    """

    def __init__(self, uri: str, run_id: str):
        self.client, self.run_id = MlflowClient(uri), run_id
        self.pending: list[Metric] = []
        history = self.client.get_metric_history(run_id, "loss/total")
        self.logged_until = max((m.step for m in history), default=0)

    def on_step(self, step: int, terms: dict[str, float], lr: float) -> None:
        if step <= self.logged_until:
            return
        ts = int(time.time() * 1000)
        self.pending += [Metric(f"loss/{k}", float(terms.get(k, 0.0)), ts, step) for k in LOSS_KEYS]
        self.pending.append(Metric("lr", float(lr), ts, step))

    def on_grad_norms(self, step: int, norms: dict[str, float]) -> None:
        """Per-term gradient norms (`train.grad_norm_every`), buffered like the losses."""
        if step > self.logged_until:
            ts = int(time.time() * 1000)
            self.pending += [Metric(f"grad_norm/{k}", float(v), ts, step) for k, v in norms.items()]

    def on_validation(self, step: int, images: dict[str, np.ndarray]) -> None:
        for scene, image in images.items():
            self.client.log_image(self.run_id, image, key=f"samples/{scene_slug(scene)}", step=step)

    def flush(self) -> None:
        for i in range(0, len(self.pending), 900):
            self.client.log_batch(self.run_id, metrics=self.pending[i:i + 900])
        self.pending = []

    def finish(self, checkpoint: Path, subject_id: str, method: str, metrics: dict[str, float]) -> int:
        """Log the subject checkpoint and register it; returns the model version."""
        from serve.registry import register_subject  # noqa: PLC0415  (the registry contract Serve reads)

        self.flush()
        for k, v in metrics.items():
            self.client.log_metric(self.run_id, k, float(v))
        existing = self.client.search_model_versions(f"run_id = '{self.run_id}'")
        if existing:  # a worker that died after registering: do not add a second version
            return int(existing[0].version)
        self.client.log_artifacts(self.run_id, str(checkpoint), "checkpoint")
        version = register_subject(self.client, self.run_id, subject_id, alias=method)
        if method == "comfusion" or not self.client.get_registered_model(subject_id).aliases.get("serving"):
            self.client.set_registered_model_alias(subject_id, "serving", version)
        return version
