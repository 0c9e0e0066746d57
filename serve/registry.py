"""The subject registry: trained subject checkpoints in the MLflow Model Registry.

Writing side (the training job): log the checkpoint folder to the run with
`mlflow.log_artifacts(folder, "checkpoint")`, then `register_subject(...)` creates a model
version named after the subject id and points the `serving` alias at it.

Reading side (the Serve app): `SubjectRegistry` lists servable subjects, resolves a subject id
to the version its alias names (None for an unknown id), and fetches that version's checkpoint
into a local cache folder, verified. Lookups are cached for a few seconds only, so a subject
registered (or re-registered) after the app started is served without a redeploy.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from comfusion.checkpoint import META_FILE, SubjectMeta, verify_checkpoint
from comfusion.data import is_valid_subject_id

SERVING_ALIAS = "serving"
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

    def public(self) -> dict:
        """The fields an API client may see (no artifact locations)."""
        return dict(id=self.id, version=self.version, identifier=self.identifier, class_noun=self.class_noun,
                    method=self.method, created=self.created, metrics=dict(self.metrics))


# ---------------------------------------------------------------------------------------
# writing


def _client(client_or_uri: MlflowClient | str | None) -> MlflowClient:
    if isinstance(client_or_uri, MlflowClient):
        return client_or_uri
    return MlflowClient(tracking_uri=client_or_uri)


def _read_logged_meta(client: MlflowClient, run_id: str, artifact_path: str) -> SubjectMeta:
    """The `subject.json` logged under `artifact_path` in the run."""
    with tempfile.TemporaryDirectory() as tmp:
        local = client.download_artifacts(run_id, f"{artifact_path}/{META_FILE}", tmp)
        return SubjectMeta.from_json(Path(local).read_text())


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    """Create the registered model unless it exists (another job may create it concurrently)."""
    try:
        client.get_registered_model(name)
        return
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    try:
        client.create_registered_model(name, description="ComFusion subject checkpoint")
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def register_subject(client_or_uri: MlflowClient | str | None, run_id: str, subject_id: str,
                     artifact_path: str = "checkpoint", alias: str = SERVING_ALIAS) -> int:
    """Register the checkpoint logged under `artifact_path` in `run_id` as a new version of
    model `subject_id`, point `alias` at it, and return the version number.

    `client_or_uri` is an `MlflowClient` or a tracking URI (None: MLflow's default). The folder
    must already be logged (`mlflow.log_artifacts(folder, artifact_path)`); its `subject.json`
    must name `subject_id`. The version is tagged with identifier, class_noun and method.
    """
    if not is_valid_subject_id(subject_id):
        raise ValueError(f"invalid subject id {subject_id!r}: must match ^[a-z0-9][a-z0-9_-]{{0,63}}$")
    client = _client(client_or_uri)
    meta = _read_logged_meta(client, run_id, artifact_path)
    if meta.id != subject_id:
        raise ValueError(f"the checkpoint logged in run {run_id} is subject {meta.id!r}, not {subject_id!r}")
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path.strip('/')}"
    _ensure_registered_model(client, subject_id)
    tags = dict(identifier=meta.identifier, class_noun=meta.class_noun, method=meta.method, created=meta.created)
    version = client.create_model_version(name=subject_id, source=source, run_id=run_id, tags=tags)
    client.set_registered_model_alias(subject_id, alias, version.version)
    return int(version.version)


# ---------------------------------------------------------------------------------------
# reading


def _iso_from_ms(ms: int | None) -> str | None:
    if not ms:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(ms / 1000))


class SubjectRegistry:
    """Read-only view of the registry for serving, with a short lookup cache.

    `cache_dir` receives fetched checkpoints as `<cache_dir>/<subject_id>/v<version>/`.
    """

    def __init__(self, tracking_uri: str | None, cache_dir: str | Path, *, alias: str = SERVING_ALIAS,
                 ttl_s: float = 2.0):
        self.tracking_uri = tracking_uri
        self.cache_dir = Path(cache_dir).expanduser().resolve()
        self.alias = alias
        self.ttl_s = ttl_s
        self._client = MlflowClient(tracking_uri=tracking_uri)
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, SubjectRecord | None]] = {}

    # --- lookups

    def resolve(self, subject_id: str) -> SubjectRecord | None:
        """The record the serving alias names, or None for an unknown (or invalid) id."""
        if not is_valid_subject_id(subject_id):
            return None
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(subject_id)
        if hit is not None and now - hit[0] < self.ttl_s:
            return hit[1]
        record = self._lookup(subject_id)
        with self._lock:
            self._cache[subject_id] = (now, record)
        return record

    def _lookup(self, subject_id: str) -> SubjectRecord | None:
        try:
            mv = self._client.get_model_version_by_alias(subject_id, self.alias)
        except MlflowException as e:
            if e.error_code in _NOT_FOUND_CODES:
                return None
            raise
        return self._record(subject_id, mv)

    def _record(self, subject_id: str, mv) -> SubjectRecord:
        tags = dict(mv.tags or {})
        return SubjectRecord(id=subject_id, version=int(mv.version), identifier=tags.get("identifier", "sks"),
                             class_noun=tags.get("class_noun", ""), method=tags.get("method", ""),
                             source=mv.source, run_id=mv.run_id,
                             created=tags.get("created") or _iso_from_ms(mv.creation_timestamp),
                             metrics=self._metrics(subject_id, int(mv.version), mv.run_id))

    def _metrics(self, subject_id: str, version: int, run_id: str | None) -> dict:
        """subject.json's metrics when the checkpoint is cached here, else the run's latest metrics."""
        meta_file = self.cache_dir / subject_id / f"v{version}" / META_FILE
        if meta_file.is_file():
            metrics = json.loads(meta_file.read_text()).get("metrics") or {}
            if metrics:
                return metrics
        if not run_id:
            return {}
        try:
            return dict(self._client.get_run(run_id).data.metrics)
        except MlflowException:
            return {}  # the run was deleted: the version is still servable

    def list_subjects(self) -> list[SubjectRecord]:
        """Every registered model with the serving alias, sorted by id."""
        records, token = [], None
        while True:
            page = self._client.search_registered_models(max_results=100, page_token=token)
            for model in page:
                version = (model.aliases or {}).get(self.alias)
                if version is not None and is_valid_subject_id(model.name):
                    mv = self._client.get_model_version(model.name, str(version))
                    records.append(self._record(model.name, mv))
            token = page.token
            if not token:
                return sorted(records, key=lambda r: r.id)

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
        """The local, verified checkpoint folder of the subject's serving version (or `version`).

        Downloads once into a temporary sibling, verifies every file's sha256 and that
        `subject.json` names this subject, then renames it into place; later calls return the
        published folder. UnknownSubjectError when the subject (or version) is not registered.
        """
        record = self.resolve(subject_id) if version is None else self._version_record(subject_id, version)
        if record is None:
            raise UnknownSubjectError(subject_id)
        folder = self._version_dir(subject_id, record.version)
        if (folder / META_FILE).is_file():
            return folder  # verified when it was published
        return self._download(record, folder)

    def _version_record(self, subject_id: str, version: int) -> SubjectRecord | None:
        if not is_valid_subject_id(subject_id):
            return None
        try:
            mv = self._client.get_model_version(subject_id, str(int(version)))
        except MlflowException as e:
            if e.error_code in _NOT_FOUND_CODES:
                return None
            raise
        return self._record(subject_id, mv)

    def _download(self, record: SubjectRecord, folder: Path) -> Path:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = folder.with_name(f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=record.source, dst_path=str(tmp),
                                                             tracking_uri=self.tracking_uri))
            meta = verify_checkpoint(local)
            if meta.id != record.id:
                raise ValueError(f"registered version {record.version} of {record.id!r} holds subject {meta.id!r}")
            try:
                local.rename(folder)
            except OSError:
                if not (folder / META_FILE).is_file():  # not just another replica winning the race
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return folder
