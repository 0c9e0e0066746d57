"""MLflow wiring for the jobs: the backend's artifact folder (its URI is
`comfusion.registry.tracking_uri`), one experiment per job, one run per (subject, method), the
callbacks through which a training worker logs into its run, and the writing side of the subject
registry (`comfusion.registry` holds its names and rules).

Everything a training worker sends to MLflow goes through `PatientClient`: a call that fails
because MLflow is unreachable (or answers 5xx / 429) is retried with backoff until the outage
has lasted `job.mlflow_outage_s`, so a blip never spends one of Ray Train's `max_failures`.
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import requests
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException

from comfusion import registry
from comfusion.checkpoint import verify_checkpoint
from comfusion.config import JobConfig, JobSection, flatten
from comfusion.metrics import slug

LOSS_KEYS = ("instance", "class_scene", "fusion_instance", "fusion_scene", "total")
# MLflow's experiment-kind tag (read by its UI): a training experiment opens in the classic
# runs / metrics view rather than the GenAI traces view.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def artifact_root(storage: str | os.PathLike, uri: str) -> str | None:
    """A local artifact folder beside the sqlite backend; a server (`uri` over HTTP) manages its own."""
    if uri.startswith(("http://", "https://")):
        return None
    return (Path(storage).resolve() / "mlartifacts").as_uri()


def experiment_id(client: MlflowClient, name: str, storage: str | os.PathLike) -> str:
    """The job's experiment (created when missing), tagged as a model-training experiment."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_root(storage, client.tracking_uri),
                                            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException:  # created by a concurrent job meanwhile
            exp = client.get_experiment_by_name(name)
    if EXPERIMENT_KIND_TAG not in exp.tags:  # made before the tag existed, or by hand
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id


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


# ---------------------------------------------------------------------------------------
# riding out MLflow outages


class MlflowOutage(RuntimeError):
    """MLflow stayed unreachable for longer than the configured limit."""


def is_transient(e: BaseException) -> bool:
    """A failure that a later retry may not see: the server is down, overloaded or timed out."""
    if isinstance(e, MlflowException):
        return e.get_http_status_code() >= 500 or e.get_http_status_code() == 429
    return isinstance(e, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError))


class PatientClient:
    """An `MlflowClient` whose calls are retried through an outage of up to `outage_s` seconds.

    Any client method can be called on it (`client.log_batch(...)`); a call that fails for a
    transient reason is retried with backoff (0.5 s doubling to 10 s). `on_retry` (of `call`)
    runs before each retry, so a caller can drop what already reached the server.
    """

    def __init__(self, client: MlflowClient, outage_s: float = JobSection.mlflow_outage_s, *,
                 sleep=time.sleep, clock=time.monotonic):
        self.client, self.outage_s, self._sleep, self._clock = client, outage_s, sleep, clock
        self.retries = 0  # how many retries this client made (for logs and tests)

    def __getattr__(self, name: str):
        if name.startswith("__") or name == "client":  # not while (un)pickling or half-built
            raise AttributeError(name)
        attr = getattr(self.client, name)
        if not callable(attr):
            return attr
        return lambda *args, **kwargs: self.call(attr, *args, **kwargs)

    def call(self, fn, *args, on_retry=None, **kwargs):
        deadline, delay = None, 0.5
        while True:
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001  (only transient failures are retried)
                if not is_transient(e):
                    raise
                now = self._clock()
                deadline = deadline if deadline is not None else now + self.outage_s
                if now >= deadline:
                    raise MlflowOutage(f"MLflow unreachable for more than {self.outage_s:g} s "
                                       f"({getattr(fn, '__name__', fn)}): {str(e)[:300]}") from e
                if self.retries == 0 or delay >= 10:
                    print(f"[mlflow] {getattr(fn, '__name__', 'call')} failed ({type(e).__name__}); "
                          f"retrying for up to {deadline - now:.0f} s", flush=True)
                self._sleep(min(delay, deadline - now))
                delay, self.retries = min(2 * delay, 10.0), self.retries + 1
                if on_retry is not None:
                    self.call(on_retry)


# ---------------------------------------------------------------------------------------
# the training worker's callbacks


class RunLogger:
    """Training callbacks that log into one MLflow run from inside a worker.

    Per-step losses are buffered and written just before a checkpoint is reported, and, with
    `live_every_s` > 0, by a background thread every `live_every_s` seconds, so the run's curves
    grow while it trains. A worker that dies and resumes from its last checkpoint recomputes the
    same steps (resume is exact), and steps already in the run are not logged again, so no step
    appears twice. MLflow calls go through `PatientClient`: an outage shorter than `outage_s` only
    delays the flush; the training loop never waits on the live flush (only on a checkpoint's).
    """

    def __init__(self, uri: str, run_id: str, outage_s: float = JobSection.mlflow_outage_s,
                 live_every_s: float = 0.0):
        self.client, self.run_id = PatientClient(MlflowClient(uri), outage_s), run_id
        self.pending: list[Metric] = []
        self.logged_until = self._last_logged_step()
        self._lock = threading.Lock()  # guards `pending` and `logged_until` (the step loop appends)
        self._sending = threading.Lock()  # one flush at a time: the live thread's or a checkpoint's
        self._stop = threading.Event()
        self._live = None
        if live_every_s > 0:
            self._live = threading.Thread(target=self._flush_every, args=(live_every_s,), daemon=True,
                                          name=f"mlflow-live-{run_id[:8]}")
            self._live.start()

    def _last_logged_step(self) -> int:
        history = self.client.get_metric_history(self.run_id, "loss/total")
        return max((m.step for m in history), default=0)

    def on_step(self, step: int, terms: dict[str, float], lr: float) -> None:
        with self._lock:
            if step <= self.logged_until:
                return
            ts = int(time.time() * 1000)
            self.pending += [Metric(f"loss/{k}", float(terms.get(k, 0.0)), ts, step) for k in LOSS_KEYS]
            self.pending.append(Metric("lr", float(lr), ts, step))

    def on_grad_norms(self, step: int, norms: dict[str, float]) -> None:
        """Per-term gradient norms (`train.grad_norm_every`), buffered like the losses."""
        with self._lock:
            if step > self.logged_until:
                ts = int(time.time() * 1000)
                self.pending += [Metric(f"grad_norm/{k}", float(v), ts, step) for k, v in norms.items()]

    def on_validation(self, step: int, images: dict[str, np.ndarray]) -> None:
        for scene, image in images.items():
            self.client.log_image(self.run_id, image, key=f"samples/{slug(scene)}", step=step)

    def flush(self) -> None:
        """Write the buffered steps; through an outage this waits (up to `outage_s`) and retries.

        Before a retry the run's last logged step is read again and the steps already there are
        dropped: a batch whose answer was lost is not written twice.
        """
        with self._sending:
            while self.pending:
                self.client.call(self._send_batch, on_retry=self._drop_logged)

    def _flush_every(self, every_s: float) -> None:
        """The live thread: flush every `every_s` seconds until `close()`; an outage longer than
        `outage_s` is left to the next checkpoint's flush, which fails the run if it persists."""
        while not self._stop.wait(every_s):
            try:
                self.flush()
            except Exception as e:  # noqa: BLE001 - the checkpoint flush reports what persists
                print(f"[mlflow] live metrics of run {self.run_id[:8]} not sent ({type(e).__name__}); "
                      "kept for the next flush", flush=True)

    def close(self) -> None:
        """Stop the live thread (buffered steps stay for `flush` / `finish`)."""
        self._stop.set()
        if self._live is not None:
            self._live.join(timeout=60)

    def _send_batch(self) -> None:
        """Send whole steps, at most 900 metrics (MLflow's batch limit is 1000)."""
        with self._lock:
            if not self.pending:  # a retry found every step already logged
                return
            steps = sorted({m.step for m in self.pending})
            n = sum(1 for m in self.pending if m.step == steps[0])
            for step in steps[1:]:
                more = sum(1 for m in self.pending if m.step == step)
                if n + more > 900:
                    break
                n += more
            batch = self.pending[:n]
        self.client.client.log_batch(self.run_id, metrics=batch)
        with self._lock:  # the step loop only appends, so the batch is still the first n
            self.pending = self.pending[n:]
            self.logged_until = max(self.logged_until, max(m.step for m in batch))

    def _drop_logged(self) -> None:
        last = self._last_logged_step()
        with self._lock:
            self.logged_until = max(self.logged_until, last)
            self.pending = [m for m in self.pending if m.step > self.logged_until]

    def finish(self, checkpoint: Path, subject_id: str, method: str, metrics: dict[str, float]) -> int:
        """Log the final metrics, then log and register the subject checkpoint; returns the model version.

        Safe to call again after a crash at any point: one version per run, aliases completed.
        """
        self.flush()
        logged = self.client.get_run(self.run_id).data.metrics
        for k, v in metrics.items():
            if logged.get(k) != float(v):
                self.client.log_metric(self.run_id, k, float(v))
        return register_checkpoint(self.client, self.run_id, checkpoint, subject_id, method)


# ---------------------------------------------------------------------------------------
# the registry, writing side (names and rules: comfusion.registry)


def _ensure_registered_model(client, name: str) -> None:
    """Create the registered model unless it exists (another job may create it concurrently)."""
    try:
        client.create_registered_model(name, description=registry.MODEL_DESCRIPTION)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def run_version(client, subject_id: str, run_id: str) -> int | None:
    """The version registered from `run_id`, or None. If two attempts raced and both created
    one, the lowest stays and the others are deleted, so a run has at most one version."""
    name = registry.model_name(subject_id)
    found = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    versions = sorted(int(v.version) for v in found)
    for extra in versions[1:]:
        try:
            client.delete_model_version(name, str(extra))
        except MlflowException as e:
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":  # the other attempt deleted it first
                raise
    return versions[0] if versions else None


def create_version(client, run_id: str, subject_id: str, tags: dict,
                   artifact_path: str = registry.CHECKPOINT_ARTIFACT) -> int:
    """The run's model version of `subject_id`: the existing one, else a new one from the logged checkpoint."""
    name = registry.model_name(subject_id)
    existing = run_version(client, name, run_id)
    if existing is not None:
        return existing
    _ensure_registered_model(client, name)
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path.strip('/')}"
    client.create_model_version(name=name, source=source, run_id=run_id, tags=tags)
    return run_version(client, name, run_id)


def _version_infos(client, name: str) -> dict[int, registry.VersionInfo]:
    return {int(v.version): registry.version_info(v.version, v.tags)
            for v in client.search_model_versions(f"name = '{name}'")}


def _alias_version(client, name: str, alias: str) -> int | None:
    return (client.get_registered_model(name).aliases or {}).get(alias)


def point_aliases(client, subject_id: str, aliases: tuple[str, ...], rounds: int = 5) -> None:
    """Point each alias at the best eligible version (`registry.choose_alias_target`).

    No compare-and-set exists for aliases, so after setting, the versions are listed again: if
    one appeared meanwhile (a concurrent registration), the choice is made again. Every writer
    ends by setting the best of all versions it saw last, so concurrent writers agree.
    """
    name = registry.model_name(subject_id)
    for _ in range(rounds):
        infos = _version_infos(client, name)
        raced = False
        for alias in aliases:
            current = _alias_version(client, name, alias)
            target = registry.choose_alias_target(name, alias, infos.get(current), infos.values())
            if target is not None and target.version != current:
                raced |= not _set_alias(client, name, alias, target.version)
        if not raced and _version_infos(client, name).keys() == infos.keys():
            return
    raise RuntimeError(f"aliases {aliases} of {name!r} kept changing under {rounds} rounds of registration")


def _set_alias(client, name: str, alias: str, version: int) -> bool:
    """Set an alias; False when a concurrent writer set it at the same moment (the SQL store
    then refuses the second insert), so the caller decides again."""
    try:
        client.set_registered_model_alias(name, alias, str(version))
        return True
    except MlflowException as e:  # the SQL store reports the clash as BAD_REQUEST (an IntegrityError)
        clash = e.error_code in ("BAD_REQUEST", "RESOURCE_ALREADY_EXISTS")
        if not clash or _alias_version(client, name, alias) is None:
            raise
        return False


def register_checkpoint(client, run_id: str, checkpoint: str | os.PathLike, subject_id: str, method: str, *,
                        force_serving: bool = False) -> int:
    """Log the checkpoint folder to the run, create its model version and point its aliases; idempotent.

    A retry after a crash anywhere in here finds the run's version (no second one) and finishes
    the aliases. `serving` moves only to a better version (`comfusion.registry`), unless
    `force_serving`, which points it at this version whatever it named.
    """
    name = registry.model_name(subject_id)
    meta = verify_checkpoint(checkpoint)
    if meta.id != subject_id:
        raise ValueError(f"checkpoint {checkpoint} is subject {meta.id!r}, not {subject_id!r}")
    version = run_version(client, name, run_id)
    if version is None:
        client.log_artifacts(run_id, str(checkpoint), registry.CHECKPOINT_ARTIFACT)
        tags = registry.version_tags(name, meta.identifier, meta.class_noun, method, meta.created, meta.kind)
        version = create_version(client, run_id, name, tags)
    if force_serving:
        client.set_registered_model_alias(name, registry.SERVING_ALIAS, str(version))
    point_aliases(client, name, (registry.method_alias(method),) if force_serving else
                  (registry.method_alias(method), registry.SERVING_ALIAS))
    return version
