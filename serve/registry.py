"""The subject registry: trained subject checkpoints in the MLflow Model Registry.

The registry contract (model name = subject id, alias names, version tags, which version
`serving` names) is `comfusion.registry`; the training job writes it (`jobs.tracking`).

This is the reading side (the Serve app): `SubjectRegistry` lists servable subjects, resolves a subject id
to the version its alias names (None for an unknown id), and fetches that version's checkpoint
into a local cache folder, verified. Records are refreshed every few seconds, so a subject
registered (or re-registered) after the app started is served without a redeploy, and the last
good ones keep serving while MLflow is down.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from comfusion.checkpoint import META_FILE, CheckpointError, verify_checkpoint
from comfusion.data import is_valid_subject_id
from comfusion.fsutil import publish_dir, scratch_dir, temp_sibling
from comfusion.registry import SERVING_ALIAS, TAG_OWNER, version_kind

log = logging.getLogger("ray.serve")
# What `get_model_version_by_alias` raises for an unknown model / an unknown alias.
_NOT_FOUND_CODES = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


class UnknownSubjectError(LookupError):
    """The subject id has no version under the serving alias."""

    def __init__(self, subject_id: str):
        self.subject_id = subject_id
        super().__init__(f"unknown subject {subject_id!r}")

    def __reduce__(self):  # crosses process boundaries (Ray) intact
        return type(self), (self.subject_id,)


@dataclass(frozen=True)
class SubjectRecord:
    """One servable subject: the registered model version its alias names."""

    id: str
    version: int
    identifier: str
    class_noun: str
    method: str
    source: str  # artifact URI of the checkpoint folder
    run_id: str | None = None
    created: str | None = None  # when it was trained (subject.json), else when it was registered
    metrics: dict = field(default_factory=dict)
    kind: str = "full"  # "full" or "lora" (the version's kind tag)
    owner: str | None = None  # the API key that created it (self-service), else None: everyone's

    def public(self) -> dict:
        """The fields an API client may see (no artifact locations)."""
        return dict(id=self.id, version=self.version, identifier=self.identifier, class_noun=self.class_noun,
                    method=self.method, created=self.created, metrics=dict(self.metrics), kind=self.kind)


# ---------------------------------------------------------------------------------------
# reading


class RegistryUnavailable(RuntimeError):
    """MLflow did not answer in time (or at all); nothing is known about the subject asked for."""

    def __init__(self, what: str = "the subject registry is unavailable"):
        super().__init__(what)


def configure_mlflow_http(timeout_s: int, retries: int) -> None:
    """Short MLflow HTTP timeouts and few retries for this process (a Serve replica).

    MLflow's defaults (120 s per call, 7 retries with exponential back-off) put minutes of
    waiting on a request path when the server is down. MLflow reads these at every call.
    """
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(int(timeout_s))
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(int(retries))
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_JITTER"] = "0"


def _iso_from_ms(ms: int | None) -> str | None:
    if not ms:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(ms / 1000))


def _not_found(e: Exception) -> bool:
    return isinstance(e, MlflowException) and e.error_code in _NOT_FOUND_CODES


class SubjectRegistry:
    """Read-only view of the registry for serving that keeps answering while MLflow is down.

    - Subjects seen before are answered from their last good record, never with an MLflow call
      on the request's path; once `ttl_s` has passed, one background refresh (a single listing
      of the registry) brings new subjects and moved aliases in.
    - A subject not seen before costs one lookup, waited on for at most `lookup_wait_s`; when
      MLflow does not answer, or failed within the last `ttl_s`, `RegistryUnavailable` is raised.
      Unknown ids are remembered for `ttl_s` in a cache of at most `max_lookups` entries.
    - `cache_dir` receives checkpoints as `<cache_dir>/<subject_id>/v<version>/`, verified on
      download; `quarantine` moves a damaged one aside, and the cache stays under
      `cache_max_bytes` by dropping the least recently used versions.
    """

    def __init__(self, tracking_uri: str | None, cache_dir: str | Path, *, alias: str = SERVING_ALIAS,
                 ttl_s: float = 2.0, lookup_wait_s: float = 1.5, max_lookups: int = 1024,
                 cache_max_bytes: int | None = None):
        self.tracking_uri = tracking_uri
        self.cache_dir = Path(cache_dir).expanduser().resolve()
        self.alias = alias
        self.ttl_s, self.lookup_wait_s, self.max_lookups = ttl_s, lookup_wait_s, max_lookups
        self.cache_max_bytes = cache_max_bytes
        self._client = MlflowClient(tracking_uri=tracking_uri)
        self._lock = threading.Lock()
        self._records: dict[str, SubjectRecord] = {}  # last good record of every subject seen
        self._unknown: OrderedDict[str, float] = OrderedDict()  # id -> when MLflow said "no such subject"
        self._listed_at: float | None = None  # when the last listing succeeded
        self._tried_at = -math.inf  # when a listing was last started
        self._failed_at: float | None = None  # when an MLflow call last failed (None: it answers)
        self._pending: dict[str, Future] = {}  # one MLflow call in flight per key
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="registry")

    # --- lookups

    def resolve(self, subject_id: str) -> SubjectRecord | None:
        """The record the serving alias names, or None for an unknown (or invalid) id.

        Raises RegistryUnavailable only for a subject never seen while MLflow was up.
        """
        if not is_valid_subject_id(subject_id):
            return None
        self.refresh_soon()
        with self._lock:
            record = self._records.get(subject_id)
            checked = self._unknown.get(subject_id)
        if record is not None:
            return record
        if checked is not None and time.monotonic() - checked < self.ttl_s:
            return None
        return self._wait(f"lookup:{subject_id}", lambda: self._lookup(subject_id))

    def list_subjects(self) -> list[SubjectRecord]:
        """Every subject with the serving alias, sorted by id, from the last good listing (refreshed
        in the background every `ttl_s`). Only before the first listing is MLflow waited on, for at
        most `lookup_wait_s` (RegistryUnavailable when it does not answer)."""
        if self._listed_at is None:
            self._wait("list", self._refresh)
        self.refresh_soon()
        with self._lock:
            return sorted(self._records.values(), key=lambda r: r.id)

    def healthy(self) -> bool:
        """False while the last MLflow call failed."""
        return self._failed_at is None

    def _failed_lately(self) -> bool:
        return self._failed_at is not None and time.monotonic() - self._failed_at < self.ttl_s

    def _call(self, key: str, call):
        """`call()` here, unless MLflow failed moments ago (then RegistryUnavailable at once)."""
        if self._failed_lately():
            raise RegistryUnavailable()
        return self._guarded(key, call)

    def _wait(self, key: str, call):
        """Run `call` (one at a time per key) in the background and wait at most `lookup_wait_s`."""
        if self._failed_lately():
            raise RegistryUnavailable()  # failed moments ago: answer now instead of waiting again
        with self._lock:
            future = self._pending.get(key)
            if future is None:
                future = self._pending[key] = self._pool.submit(self._guarded, key, call)
        try:
            return future.result(timeout=self.lookup_wait_s)
        except FutureTimeout:
            raise RegistryUnavailable("the subject registry did not answer in time") from None

    def _guarded(self, key: str, call):
        """`call()`, recording MLflow's health; any failure becomes RegistryUnavailable."""
        try:
            result = call()
        except Exception as e:  # noqa: BLE001 - connection refused, timeouts, 5xx: all "unavailable"
            self._failed_at = time.monotonic()
            log.warning("registry call %s failed: %s: %s", key, type(e).__name__, str(e).splitlines()[0][:200])
            raise RegistryUnavailable() from None
        finally:
            with self._lock:
                self._pending.pop(key, None)
        self._failed_at = None
        return result

    def refresh_soon(self) -> None:
        """Start a background listing when the last one is older than `ttl_s` (never waited on).

        Called on every lookup, and once when a replica starts (so its first requests find the list)."""
        now = time.monotonic()
        with self._lock:
            if now - self._tried_at < self.ttl_s or "list" in self._pending:
                return
            self._tried_at = now
            self._pending["list"] = self._pool.submit(self._guarded, "list", self._refresh)

    def _refresh(self) -> None:
        """Replace the records with one listing of the registry; unchanged versions are reused."""
        with self._lock:
            self._tried_at = time.monotonic()
            old = dict(self._records)
        records = {}
        for name, version, owner in self._aliased_models():
            kept = old.get(name)
            record = kept if kept is not None and kept.version == version else self._version_record(name, version)
            records[name] = None if record is None else dataclasses.replace(record, owner=owner)
        with self._lock:
            self._records = {k: v for k, v in records.items() if v is not None}
            self._listed_at = time.monotonic()
            self._unknown.clear()

    def _aliased_models(self) -> list[tuple[str, int]]:
        """(subject id, serving version, owner) of every registered model with the alias."""
        found, token = [], None
        while True:
            page = self._client.search_registered_models(max_results=100, page_token=token)
            for model in page:
                version = (model.aliases or {}).get(self.alias)
                if version is not None and is_valid_subject_id(model.name):
                    found.append((model.name, int(version), (model.tags or {}).get(TAG_OWNER)))
            token = page.token
            if not token:
                return found

    def _lookup(self, subject_id: str) -> SubjectRecord | None:
        try:
            mv = self._client.get_model_version_by_alias(subject_id, self.alias)
        except MlflowException as e:
            if not _not_found(e):
                raise
            mv = None
        record = None
        if mv is not None:
            owner = (self._client.get_registered_model(subject_id).tags or {}).get(TAG_OWNER)
            record = dataclasses.replace(self._record(subject_id, mv), owner=owner)
        with self._lock:
            if record is None:
                self._unknown[subject_id] = time.monotonic()
                self._unknown.move_to_end(subject_id)
                while len(self._unknown) > self.max_lookups:
                    self._unknown.popitem(last=False)
            else:
                self._records[subject_id] = record
        return record

    def _version_record(self, subject_id: str, version: int) -> SubjectRecord | None:
        try:
            mv = self._client.get_model_version(subject_id, str(int(version)))
        except MlflowException as e:
            if _not_found(e):
                return None
            raise
        return self._record(subject_id, mv)

    def _record(self, subject_id: str, mv) -> SubjectRecord:
        tags = dict(mv.tags or {})
        return SubjectRecord(id=subject_id, version=int(mv.version), identifier=tags.get("identifier", "sks"),
                             class_noun=tags.get("class_noun", ""), method=tags.get("method", ""),
                             source=mv.source, run_id=mv.run_id,
                             created=tags.get("created") or _iso_from_ms(mv.creation_timestamp),
                             metrics=self._metrics(subject_id, int(mv.version), mv.run_id),
                             kind=version_kind(tags))

    def _metrics(self, subject_id: str, version: int, run_id: str | None) -> dict:
        """subject.json's metrics when the checkpoint is cached here, else the run's latest metrics."""
        meta_file = self.cache_dir / subject_id / f"v{version}" / META_FILE
        try:
            metrics = json.loads(meta_file.read_text()).get("metrics") or {}
        except (OSError, ValueError):
            metrics = {}
        if metrics or not run_id:
            return metrics
        try:
            return dict(self._client.get_run(run_id).data.metrics)
        except MlflowException:
            return {}  # the run was deleted: the version is still servable

    # --- checkpoints

    def _version_dir(self, subject_id: str, version: int) -> Path:
        """`<cache_dir>/<subject_id>/v<version>`; only valid ids become path components."""
        if not is_valid_subject_id(subject_id):
            raise ValueError(f"invalid subject id {subject_id!r}")
        folder = (self.cache_dir / subject_id / f"v{int(version)}").resolve()
        if not folder.is_relative_to(self.cache_dir) or folder == self.cache_dir:
            raise ValueError(f"subject folder {folder} is outside the cache {self.cache_dir}")
        return folder

    def fetch(self, subject_id: str, version: int | None = None) -> Path:
        """The local checkpoint folder of the subject's serving version (or `version`).

        A folder already in the cache is returned without asking MLflow (it was verified when
        it was published; readers verify again and `quarantine` it when damaged). Otherwise it is
        downloaded into a temporary sibling, verified (every file's sha256, and `subject.json`
        names this subject) and renamed into place. UnknownSubjectError when the subject (or
        version) is not registered; RegistryUnavailable when MLflow does not answer.
        """
        if version is not None and (self._version_dir(subject_id, version) / META_FILE).is_file():
            return self._touch(self._version_dir(subject_id, version))
        if version is None:
            record = self.resolve(subject_id)
        else:  # a load, not a lookup: it may wait for MLflow's own (short) timeout
            record = self._call(f"version:{subject_id}@{version}", lambda: self._version_record(subject_id, version))
        if record is None:
            raise UnknownSubjectError(subject_id)
        folder = self._version_dir(subject_id, record.version)
        if (folder / META_FILE).is_file():
            return self._touch(folder)
        try:
            self._download(record, folder)
        except (CheckpointError, ValueError):
            raise
        except Exception as e:  # noqa: BLE001 - the artifact store did not answer
            self._failed_at = time.monotonic()
            raise RegistryUnavailable(f"the checkpoint of {subject_id!r} v{record.version} could not be "
                                      f"downloaded ({type(e).__name__})") from None
        self._evict(keep=folder)
        return folder

    @staticmethod
    def _touch(folder: Path) -> Path:
        """Mark the folder as used now (the eviction order)."""
        try:
            os.utime(folder)
        except OSError:
            pass
        return folder

    def quarantine(self, subject_id: str, version: int) -> None:
        """Move a damaged cached version aside and delete it, so the next `fetch` downloads it again."""
        _remove(self._version_dir(subject_id, version))

    def cached_versions(self) -> list[tuple[Path, float, int]]:
        """(folder, last use, bytes) of every published version in the cache."""
        found = []
        for meta in self.cache_dir.glob(f"*/v*/{META_FILE}"):
            folder = meta.parent
            try:
                size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
                found.append((folder, folder.stat().st_mtime, size))
            except OSError:
                continue  # removed meanwhile
        return found

    def _evict(self, keep: Path) -> None:
        """Drop the versions of `keep`'s subject older than `keep`, then the least recently used
        versions while the cache is over `cache_max_bytes`. `keep` always stays."""
        versions = sorted(self.cached_versions(), key=lambda v: v[1])  # least recently used first
        for folder, _, _ in versions:
            if folder.parent == keep.parent and _version_number(folder) < _version_number(keep):
                _remove(folder)
        versions = [v for v in versions if v[0].exists()]
        total = sum(v[2] for v in versions)
        for folder, _, size in versions:
            if self.cache_max_bytes is None or total <= self.cache_max_bytes:
                return
            if folder != keep:
                _remove(folder)
                total -= size

    def _download(self, record: SubjectRecord, folder: Path) -> Path:
        """Download into a temporary sibling, verify, publish in one step: a complete copy that
        another replica published meanwhile is kept, an incomplete one replaced."""
        with scratch_dir(folder) as tmp:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=record.source, dst_path=str(tmp),
                                                             tracking_uri=self.tracking_uri))
            meta = verify_checkpoint(local)
            if meta.id != record.id:
                raise ValueError(f"registered version {record.version} of {record.id!r} holds subject {meta.id!r}")
            publish_dir(local, folder, replace=not (folder / META_FILE).is_file())
        return folder


def _version_number(folder: Path) -> int:
    """`.../v12` -> 12."""
    return int(folder.name.removeprefix("v"))


def _remove(folder: Path) -> None:
    """Rename the folder aside (readers see it gone at once), then delete it; a process killed in
    between leaves a temporary entry that the next download beside it cleans (`clean_stale`)."""
    aside = temp_sibling(folder)
    try:
        os.rename(folder, aside)
    except OSError:
        return  # already gone
    shutil.rmtree(aside, ignore_errors=True)
