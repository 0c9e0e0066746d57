"""Self-service training over HTTP: upload a subject's photos, train it, watch it, use it.

    POST   /v1/subjects     multipart: 1 to 5 `photos`, `class_noun`, optional `id`, `identifier`,
                            `methods` (comma-separated), `steps`  ->  202 {job_id}, Location: /v1/jobs/<id>
    GET    /v1/jobs         the caller's jobs (an admin key sees everyone's)
    GET    /v1/jobs/{id}    state, step and total per method, latest losses, time left, failure reason
    DELETE /v1/jobs/{id}    stop it

The photos are checked with the project's subject checks (`comfusion.data.check_subject`) in a
temporary folder before anything is stored; then they are stored in job storage under their
SHA-256 (`<job_storage>/uploads/<hash>.<ext>`), a job config naming them is written beside them,
and `jobs/train_many.py` runs it as a Ray job through `JobSubmissionClient`, never inside a Serve
replica. The Ray job's metadata names the owner key, the subject and a request key (the digest of
the generated config, photos included): the same upload again answers the job already queued,
running or done, and train_many's `run_key` reuses finished runs even once the Ray job is gone.

Progress comes from MLflow: the job tags its runs with the job id and the owner key, and the
training workers log their steps every `job.metrics_every_s`. The subject id is reserved for its
owner by a tag on its registered model; a finished job has registered the subject with the
`serving` alias, so `POST /v1/generate` renders it with no further step.
"""
# No `from __future__ import annotations`: FastAPI reads the route signatures.
import asyncio
import copy
import dataclasses
import hashlib
import io
import logging
import os
import re
import shlex
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import yaml
from fastapi import APIRouter, FastAPI, Request, Security
from fastapi.responses import JSONResponse
from PIL import Image
from starlette.datastructures import UploadFile

from comfusion.config import DEFAULT_IDENTIFIER, ConfigError, JobConfig, SubjectSpec, from_dict, load_config, to_dict
from comfusion.data import SubjectError, check_subject
from comfusion.registry import MODEL_DESCRIPTION, TAG_OWNER  # TAG_OWNER: the key that created a run / subject
from comfusion.fsutil import write_file_atomic
from serve.auth import Caller, require_key
from serve.settings import ServeSettings

log = logging.getLogger("ray.serve")
REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = "selfservice"  # the MLflow experiment (and job.name) of uploaded subjects
TAG_JOB = "comfusion.job"  # the Ray job id that trained a run
MARK = "comfusion.selfservice"  # Ray job metadata key marking the jobs this module submitted
FIELDS = ("photos", "class_noun", "id", "identifier", "methods", "steps")
ENDED = {"SUCCEEDED": "done", "FAILED": "failed", "STOPPED": "cancelled"}
RETRY_AFTER_S = 30
router = APIRouter(tags=["training"])


class Refused(Exception):
    """A request answered with a 4xx (or 503): its status, the field at fault and why."""

    def __init__(self, status: int, field: str, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.field, self.message, self.retry_after = status, field, message, retry_after

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after else None
        if self.status != 422:
            return JSONResponse(status_code=self.status, headers=headers, content={"detail": self.message})
        return unprocessable([(self.field, self.message)])


def unprocessable(problems: list[tuple[str, str]]) -> JSONResponse:
    """A 422 shaped like the app's validation errors: one entry per (field, problem)."""
    detail = [{"loc": ["body", f], "field": f, "msg": m, "type": "value_error"} for f, m in problems]
    return JSONResponse(status_code=422, content={"detail": detail,
                                                  "message": "; ".join(f"{f}: {m}" for f, m in problems)})


@dataclass(frozen=True)
class Upload:
    """One POST /v1/subjects, parsed (not yet checked)."""

    subject_id: str
    class_noun: str
    identifier: str
    methods: tuple[str, ...]
    steps: int
    photos: tuple[tuple[str, bytes], ...]  # (file name as sent, bytes)


def install(app: FastAPI, settings: ServeSettings) -> None:
    """Called by the Ingress: the routes' state, and the upload route's own body limit."""
    app.state.trainings = Trainings(settings)
    app.state.body_limits = {**(getattr(app.state, "body_limits", None) or {}),
                             "/v1/subjects": settings.max_upload_bytes}


# ---------------------------------------------------------------------------------------
# parsing and checking an upload


async def parse_upload(request: Request, settings: ServeSettings, defaults: JobConfig) -> Upload:
    """The multipart form as an Upload; Refused (422) for a missing, unknown or malformed field."""
    try:
        form = await request.form(max_files=settings.max_photos + 5, max_fields=len(FIELDS) + 5)
    except Exception as e:  # noqa: BLE001 - Starlette's parser errors: not multipart, too many parts
        raise Refused(422, "photos", f"not a multipart form with at most {settings.max_photos} photos "
                                     f"({type(e).__name__}: {str(e)[:200]})") from None
    unknown = sorted(set(form.keys()) - set(FIELDS))
    if unknown:
        raise Refused(422, unknown[0], f"unknown field; known: {', '.join(FIELDS)}")
    photos = form.getlist("photos")
    if not photos or not all(isinstance(p, UploadFile) for p in photos):
        raise Refused(422, "photos", "send 1 or more photos as files of the multipart field 'photos'")
    if len(photos) > settings.max_photos:
        raise Refused(422, "photos", f"{len(photos)} photos; a subject has 1 to {settings.max_photos}")
    text = {k: form.get(k) for k in FIELDS[1:]}
    if any(v is not None and not isinstance(v, str) for v in text.values()):
        raise Refused(422, next(k for k, v in text.items() if v is not None and not isinstance(v, str)),
                      "must be a text field, not a file")
    if not text["class_noun"]:
        raise Refused(422, "class_noun", "is required, e.g. 'dog'")
    steps = _steps(text["steps"], settings.max_train_steps, defaults.train.steps)
    methods = tuple(m.strip() for m in (text["methods"] or "comfusion").split(",") if m.strip())
    named = [(p.filename or f"photo-{i}", await p.read()) for i, p in enumerate(photos)]
    sid = text["id"] or default_id(text["class_noun"], [b for _, b in named])
    return Upload(sid, text["class_noun"], text["identifier"] or DEFAULT_IDENTIFIER, methods, steps, tuple(named))


def _steps(raw: str | None, limit: int, default: int) -> int:
    if raw is None or raw == "":
        return min(default, limit)
    if not raw.strip().isdigit() or not 1 <= int(raw) <= limit:
        raise Refused(422, "steps", f"{raw[:20]!r} must be a whole number of training steps in 1..{limit}")
    return int(raw)


def default_id(class_noun: str, photos: list[bytes]) -> str:
    """`<class noun>-<8 hex of the photos>`: the same photos give the same subject id."""
    digest = hashlib.sha256(b"".join(hashlib.sha256(p).digest() for p in photos)).hexdigest()[:8]
    slug = re.sub(r"[^a-z0-9]+", "-", class_noun.lower()).strip("-")[:40] or "subject"
    return f"{slug}-{digest}"


def _safe_name(name: str, index: int) -> str:
    """A file name to check a photo under (the check's messages name it), free of path parts."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name.replace("\\", "/")).name)[:64].strip("._")
    return base or f"photo-{index}"


def check_upload(up: Upload, cfg: JobConfig) -> list[str]:
    """Run the project's subject checks on the upload in a temporary folder (nothing is kept).

    Returns the stored file name of each photo (`<sha256>.<ext>`); Refused (422) naming each
    photo and problem otherwise.
    """
    with tempfile.TemporaryDirectory(prefix="upload-") as tmp:
        paths = []
        for i, (name, data) in enumerate(up.photos):
            (Path(tmp) / str(i)).mkdir()
            paths.append(f"{i}/{_safe_name(name, i)}")
            (Path(tmp) / paths[-1]).write_bytes(data)
        spec = SubjectSpec(id=up.subject_id, images=tuple(paths), class_noun=up.class_noun, identifier=up.identifier)
        data_cfg = dataclasses.replace(cfg.data, root=tmp, subjects=(), allow_absolute_paths=False)
        try:
            check_subject(spec, data_cfg, cfg.model.resolution, load_pixels=False)
        except SubjectError as e:
            raise _subject_refusal(e.problems, tmp, up) from None
    return [f"{hashlib.sha256(data).hexdigest()}.{_extension(data)}" for _, data in up.photos]


def _subject_refusal(problems: list[str], tmp: str, up: Upload) -> "RefusedMany":
    out = []
    for p in problems:
        for i, (name, _) in enumerate(up.photos):  # the temporary path -> the name the client sent
            p = p.replace(f"{tmp}/{i}/{_safe_name(name, i)}", name).replace(f"{i}/{_safe_name(name, i)}", name)
        field = ("photos" if p.startswith(("image", "has ")) else
                 next((f for f in ("class_noun", "identifier", "id") if p.startswith(f)), "photos"))
        out.append((field, p))
    return RefusedMany(out)


class RefusedMany(Refused):
    """A 422 with several problems (every problem of a subject, as the manifest check reports)."""

    def __init__(self, problems: list[tuple[str, str]]):
        super().__init__(422, problems[0][0], "; ".join(m for _, m in problems))
        self.problems = problems

    def response(self) -> JSONResponse:
        return unprocessable(self.problems)


def _extension(data: bytes) -> str:
    with Image.open(io.BytesIO(data)) as img:  # already checked: one of JPEG, PNG, WebP
        return {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}.get(img.format, "img")


def job_values(up: Upload, files: list[str], cfg: JobConfig, settings: ServeSettings, storage: Path) -> dict:
    """The job config of one upload (as YAML values): the base config with this subject alone."""
    values = to_dict(cfg)
    values["model"].update(base=settings.base, preset_seed=settings.preset_seed)  # what this app serves
    values["data"].update(root=str(storage / "uploads"), allow_absolute_paths=False, subjects=[
        {"id": up.subject_id, "images": files, "class_noun": up.class_noun, "identifier": up.identifier}])
    values["job"].update(name=EXPERIMENT, methods=list(up.methods), storage=str(storage))
    values["train"].update(steps=up.steps, num_instance_images=len(files),
                           checkpoint_every=min(values["train"]["checkpoint_every"], up.steps))
    try:
        from_dict(copy.deepcopy(values))
    except ConfigError as e:
        field = {"job.methods": "methods", "train.steps": "steps"}.get(e.key, e.key)
        raise Refused(422, field, str(e).split(": ", 1)[-1]) from None
    return values


def request_key(values: dict) -> str:
    """What makes two uploads the same training: the whole generated config (photos by hash)."""
    return hashlib.sha256(yaml.safe_dump(values, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------
# the cluster (Ray's job API) and the tracking server (MLflow)


def _repo_path(path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else REPO / p


def ray_auth_headers(token_file: str) -> dict:
    """`Authorization: Bearer <token>` for a token-protected Ray head: `RAY_AUTH_TOKEN`, else the
    token file (`ray_token_file`, else `$RAY_AUTH_TOKEN_PATH`, else ~/.ray/auth_token); {} without one."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    path = Path(token_file or os.environ.get("RAY_AUTH_TOKEN_PATH") or "~/.ray/auth_token").expanduser()
    if not token and path.is_file():
        token = path.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


class Trainings:
    """The app's side of self-service training: checks, storage, Ray jobs, progress from MLflow."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.storage = Path(settings.job_storage).expanduser().resolve()
        self.lock = asyncio.Lock()  # one duplicate / limit check + submission at a time per replica
        self._client = None
        self._base: JobConfig | None = None

    def base(self) -> JobConfig:
        """The job config uploads train with (`train_config`), read once."""
        if self._base is None:
            try:
                self._base = load_config(_repo_path(self.settings.train_config))
            except ConfigError as e:
                raise Refused(503, "train_config", f"the app's training config is broken: {e}") from None
        return self._base

    def ray(self):
        from ray.job_submission import JobSubmissionClient  # noqa: PLC0415

        if self._client is None:
            try:
                self._client = JobSubmissionClient(self.settings.ray_address,
                                                   headers=ray_auth_headers(self.settings.ray_token_file))
            except Exception as e:  # noqa: BLE001 - unreachable, refused token, ...
                raise Refused(503, "cluster", f"the Ray job API at {self.settings.ray_address} does not answer "
                                              f"({type(e).__name__}: {str(e)[:200]})", RETRY_AFTER_S) from None
        return self._client

    def mlflow(self):
        from mlflow import MlflowClient  # noqa: PLC0415

        return MlflowClient(self.settings.tracking_uri)

    def our_jobs(self) -> list:
        """Every Ray job this module submitted (newest first)."""
        try:
            jobs = [j for j in self.ray().list_jobs() if (j.metadata or {}).get(MARK) == "1"]
        except Refused:
            raise
        except Exception as e:  # noqa: BLE001
            self._client = None  # reconnect next time (a restarted head)
            raise Refused(503, "cluster", f"the Ray job API does not answer ({type(e).__name__})", RETRY_AFTER_S) from None
        return sorted(jobs, key=lambda j: j.start_time or 0, reverse=True)

    def find(self, job_id: str, caller: Caller):
        """The job if this caller may see it (its owner, or an admin key), else Refused 404."""
        for job in self.our_jobs():
            if job.submission_id == job_id and visible(job, caller):
                return job
        raise Refused(404, "id", f"no job {job_id!r}")

    # --- a new training --------------------------------------------------------------

    def reserve(self, subject_id: str, caller: Caller) -> None:
        """The subject id is the caller's: create its registered model with the owner tag, or check
        the tag of the existing one (an admin key may retrain any subject)."""
        from mlflow.exceptions import MlflowException  # noqa: PLC0415

        client = self.mlflow()
        try:
            model = client.get_registered_model(subject_id)
        except MlflowException as e:
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise Refused(503, "registry", f"the registry does not answer ({e.error_code})", RETRY_AFTER_S) from None
            try:
                client.create_registered_model(subject_id, tags={TAG_OWNER: caller.key_id}, description=MODEL_DESCRIPTION)
                return
            except MlflowException:  # created meanwhile: check its owner below
                model = client.get_registered_model(subject_id)
        owner = (model.tags or {}).get(TAG_OWNER)
        if owner != caller.key_id and not caller.admin:
            raise Refused(409, "id", f"subject id {subject_id!r} is taken by another key; choose another id")

    def store(self, up: Upload, files: list[str], values: dict, key: str) -> Path:
        """Photos under their hashes (written once), then the job config; returns the config's path."""
        uploads = self.storage / "uploads"
        uploads.mkdir(parents=True, exist_ok=True)
        for (_, data), name in zip(up.photos, files):
            if not (uploads / name).is_file():
                write_file_atomic(uploads / name, data)
        path = self.storage / "selfservice" / "configs" / f"{key}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_file_atomic(path, yaml.safe_dump(values, sort_keys=False).encode())
        return path

    def runtime_env(self) -> dict:
        """The repository as the job's working dir, with cluster/runtime_env.yaml's excludes and env
        vars, the app's MLflow, and this process's offline / cache settings."""
        env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
        env_vars = {**env.get("env_vars", {}), "MLFLOW_TRACKING_URI": self.settings.tracking_uri}
        env_vars.update({k: os.environ[k] for k in ("HF_HUB_OFFLINE", "COMFUSION_CACHE") if k in os.environ})
        return {"working_dir": str(REPO), "excludes": env.get("excludes", []), "env_vars": env_vars}

    def submit(self, up: Upload, config: Path, key: str, caller: Caller) -> str:
        job_id = f"{up.subject_id}-{uuid.uuid4().hex[:8]}"
        entrypoint = " ".join(shlex.quote(a) for a in (
            "python", "jobs/train_many.py", "--config", str(config),
            "--tag", f"{TAG_OWNER}={caller.key_id}", "--tag", f"{TAG_JOB}={job_id}"))
        metadata = {MARK: "1", "owner": caller.key_id, "subject": up.subject_id, "request": key,
                    "methods": ",".join(up.methods), "steps": str(up.steps)}
        return self.ray().submit_job(entrypoint=entrypoint, submission_id=job_id, runtime_env=self.runtime_env(),
                                     metadata=metadata)

    def duplicate(self, key: str, caller: Caller):
        """The caller's job for the same request that is queued, running or done, else None."""
        return next((j for j in self.our_jobs() if (j.metadata or {}).get("request") == key
                     and visible(j, caller) and status(j) not in ("FAILED", "STOPPED")), None)

    def active(self, caller: Caller) -> int:
        return sum(1 for j in self.our_jobs()
                   if (j.metadata or {}).get("owner") == caller.key_id and status(j) in ("PENDING", "RUNNING"))

    # --- progress --------------------------------------------------------------------

    def view(self, job) -> dict:
        """What GET /v1/jobs/{id} answers for one Ray job."""
        meta, ray_status = job.metadata or {}, status(job)
        total = int(meta.get("steps", 0))
        runs = self._runs(job.submission_id)
        methods = {m: self._method(runs.get(m), total) for m in meta.get("methods", "").split(",") if m}
        state = job_state(ray_status, methods)
        return {"id": job.submission_id, "subject": meta.get("subject"), "owner": meta.get("owner"), "state": state,
                "ray_status": ray_status, "methods": methods, "eta_s": eta(methods) if state == "training" else None,
                "error": self._failure(job, runs) if state == "failed" else None,
                "created": _iso(job.start_time), "ended": _iso(job.end_time), "location": f"/v1/jobs/{job.submission_id}"}

    def _runs(self, job_id: str) -> dict:
        """The job's MLflow runs by method (the newest per method)."""
        client = self.mlflow()
        exp = client.get_experiment_by_name(EXPERIMENT)
        if exp is None:
            return {}
        found = client.search_runs([exp.experiment_id], filter_string=f"tags.`{TAG_JOB}` = '{job_id}'",
                                   order_by=["attributes.start_time ASC"])
        return {r.data.tags.get("method", "?"): r for r in found}

    def _method(self, run, total: int) -> dict:
        if run is None:
            return {"state": "waiting", "step": 0, "total": total, "losses": {}, "steps_per_s": None}
        client = self.mlflow()
        history = sorted(client.get_metric_history(run.info.run_id, "loss/total"), key=lambda m: m.step)
        step = history[-1].step if history else 0
        rate = None
        if len(history) >= 2 and history[-1].timestamp > history[0].timestamp:
            rate = (history[-1].step - history[0].step) / ((history[-1].timestamp - history[0].timestamp) / 1000)
        registered = bool(client.search_model_versions(f"run_id = '{run.info.run_id}'"))
        run_status = run.info.status
        state = ("done" if run_status == "FINISHED" and registered else "failed" if run_status in ("FAILED", "KILLED")
                 else "registering" if step >= total else "training")
        losses = {k.removeprefix("loss/"): v for k, v in run.data.metrics.items() if k.startswith("loss/")}
        return {"state": state, "step": int(step), "total": total, "losses": losses,
                "steps_per_s": round(rate, 3) if rate else None, "run_id": run.info.run_id}

    def _failure(self, job, runs: dict) -> str:
        """The reason in one line: the failed run's error tag, else the job's last error line."""
        for run in runs.values():
            if run.data.tags.get("error"):
                return _one_line(run.data.tags["error"])
        try:
            logs = self.ray().get_job_logs(job.submission_id)
        except Exception:  # noqa: BLE001
            logs = ""
        lines = [ln.strip() for ln in logs.splitlines() if ln.strip().startswith(("error", "ERROR"))
                 or re.match(r"^\S+ \(\w+\): ", ln.strip())]
        return _one_line(lines[-1] if lines else (job.message or "the job failed"))

    def stop(self, job) -> None:
        """Stop the Ray job, and end its MLflow runs still marked running as KILLED."""
        self.ray().stop_job(job.submission_id)
        client = self.mlflow()
        for run in self._runs(job.submission_id).values():
            if run.info.status == "RUNNING":
                client.set_terminated(run.info.run_id, status="KILLED")


def status(job) -> str:
    """A Ray job's status as its plain name (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED)."""
    return getattr(job.status, "value", str(job.status))


def visible(job, caller: Caller) -> bool:
    return caller.admin or (job.metadata or {}).get("owner") == caller.key_id


def job_state(ray_status: str, methods: dict) -> str:
    """queued, preparing priors, training, registering, done, failed or cancelled."""
    if ray_status in ENDED:
        return ENDED[ray_status]
    if ray_status == "PENDING":
        return "queued"
    states = [m["state"] for m in methods.values()]
    if all(s == "waiting" for s in states):
        return "preparing priors"  # runs are made once the class priors exist
    return "training" if any(s in ("training", "waiting") for s in states) else "registering"


def eta(methods: dict) -> float | None:
    """Seconds left: each method's steps left at its own speed (a method not started yet at the
    speed of one that has); the methods train side by side, so the slowest sets it."""
    rates = [m["steps_per_s"] for m in methods.values() if m["steps_per_s"]]
    if not rates:
        return None
    left = [(m["total"] - m["step"]) / (m["steps_per_s"] or min(rates)) for m in methods.values()
            if m["state"] in ("training", "waiting")]
    return round(max(left), 1) if left else 0.0


def _one_line(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= 300 else text[:297] + "..."


def _iso(ms: int | None) -> str | None:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000)) if ms else None


# ---------------------------------------------------------------------------------------
# routes


def trainings(request: Request) -> Trainings:
    found = getattr(request.app.state, "trainings", None)
    if found is None:
        raise Refused(503, "cluster", "self-service training is not set up on this app")
    return found


UPLOAD_FORM = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["photos", "class_noun"], "properties": {
        "photos": {"type": "array", "items": {"type": "string", "format": "binary"},
                   "description": "1 to 5 photos of the subject (JPEG, PNG or WebP)"},
        "class_noun": {"type": "string", "description": "what the subject is, e.g. 'dog' (1 to 4 words)"},
        "id": {"type": "string", "description": "subject id (default: <class noun>-<hash of the photos>)"},
        "identifier": {"type": "string", "description": f"the rare token naming it (default {DEFAULT_IDENTIFIER!r})"},
        "methods": {"type": "string", "description": "comma-separated: comfusion (default), dreambooth"},
        "steps": {"type": "integer", "description": "training steps (default: the app's training config)"}}}}}}}


@router.post("/v1/subjects", status_code=202, openapi_extra=UPLOAD_FORM, responses={
    200: {"description": "the same photos and settings were uploaded before: that job"},
    202: {"description": "training submitted; follow `Location`"}, 401: {"description": "no or a bad API key"},
    409: {"description": "the subject id belongs to another key"}, 413: {"description": "upload too large"},
    422: {"description": "a photo or field is refused (named, with the reason)"},
    429: {"description": "this key has its maximum of trainings running, or is over its rate"},
    503: {"description": "the cluster or the registry does not answer; see Retry-After"}})
async def create_subject(request: Request, caller: Caller = Security(require_key)):
    """Upload a subject's photos and train it; answers at once with the job to follow."""
    try:
        return await _create_subject(request, caller, trainings(request))
    except Refused as e:
        return e.response()
    except Exception as e:  # noqa: BLE001
        return registry_outage(e).response()


def registry_outage(e: Exception) -> Refused:
    """MLflow that does not answer in time (or answers 5xx) while a route reads or writes it: 503 with
    Retry-After, as for the job API; anything else is raised on, for the app's 500 handler."""
    import requests  # noqa: PLC0415
    from mlflow.exceptions import MlflowException  # noqa: PLC0415

    if not isinstance(e, (MlflowException, requests.RequestException, TimeoutError)):
        raise e
    log.warning("registry unavailable: %s: %s", type(e).__name__, _one_line(e)[:200])
    return Refused(503, "registry", f"the registry does not answer ({type(e).__name__}); retry later", RETRY_AFTER_S)


async def _create_subject(request: Request, caller: Caller, tr: Trainings) -> JSONResponse:
    base = await asyncio.to_thread(tr.base)
    up = await parse_upload(request, tr.settings, base)
    files = await asyncio.to_thread(check_upload, up, base)  # nothing is stored before this passes
    values = job_values(up, files, base, tr.settings, tr.storage)
    key = request_key(values)
    async with tr.lock:
        same = await asyncio.to_thread(tr.duplicate, key, caller)
        if same is not None:
            view = await asyncio.to_thread(tr.view, same)
            return JSONResponse(status_code=200, headers={"Location": view["location"]},
                                content={"job_id": same.submission_id, "duplicate": True, **view})
        if await asyncio.to_thread(tr.active, caller) >= tr.settings.max_trainings_per_key:
            raise Refused(429, "photos", f"key {caller.key_id!r} has {tr.settings.max_trainings_per_key} trainings "
                                         "queued or running; wait for one to end", RETRY_AFTER_S)
        await asyncio.to_thread(tr.reserve, up.subject_id, caller)
        config = await asyncio.to_thread(tr.store, up, files, values, key)
        try:
            job_id = await asyncio.to_thread(tr.submit, up, config, key, caller)
        except Refused:
            raise
        except Exception as e:  # noqa: BLE001 - the job API refused it
            log.error("job submission failed: %s: %s", type(e).__name__, e)
            raise Refused(503, "cluster", f"the cluster did not take the job ({type(e).__name__}: "
                                          f"{_one_line(e)[:200]})", RETRY_AFTER_S) from None
    log.info("key %s submitted job %s (subject %s)", caller.key_id, job_id, up.subject_id)
    return JSONResponse(status_code=202, headers={"Location": f"/v1/jobs/{job_id}"}, content={
        "job_id": job_id, "subject": up.subject_id, "state": "queued", "methods": list(up.methods),
        "steps": up.steps, "photos": files, "location": f"/v1/jobs/{job_id}"})


@router.get("/v1/jobs", responses={401: {"description": "no or a bad API key"}})
async def list_jobs(request: Request, caller: Caller = Security(require_key)):
    """The caller's training jobs, newest first (an admin key: everyone's)."""
    try:
        tr = trainings(request)
        jobs = [j for j in await asyncio.to_thread(tr.our_jobs) if visible(j, caller)]
        return {"jobs": [await asyncio.to_thread(tr.view, j) for j in jobs]}
    except Refused as e:
        return e.response()
    except Exception as e:  # noqa: BLE001
        return registry_outage(e).response()


@router.get("/v1/jobs/{job_id}", responses={404: {"description": "no such job for this key"}})
async def get_job(job_id: str, request: Request, caller: Caller = Security(require_key)):
    """State (queued, preparing priors, training, registering, done, failed, cancelled), step and
    total per method, latest losses, seconds left, and the failure reason in one line."""
    try:
        tr = trainings(request)
        job = await asyncio.to_thread(tr.find, job_id, caller)
        return await asyncio.to_thread(tr.view, job)
    except Refused as e:
        return e.response()
    except Exception as e:  # noqa: BLE001
        return registry_outage(e).response()


@router.delete("/v1/jobs/{job_id}", status_code=202, responses={
    404: {"description": "no such job for this key"}, 409: {"description": "the job has already ended"}})
async def stop_job(job_id: str, request: Request, caller: Caller = Security(require_key)):
    """Stop a queued or running training (its subject keeps any version registered before)."""
    try:
        tr = trainings(request)
        job = await asyncio.to_thread(tr.find, job_id, caller)
        if status(job) in ENDED:
            raise Refused(409, "id", f"job {job_id!r} has already ended ({ENDED[status(job)]})")
        await asyncio.to_thread(tr.stop, job)
        return JSONResponse(status_code=202, content={"id": job_id, "state": "cancelling",
                                                      "location": f"/v1/jobs/{job_id}"})
    except Refused as e:
        return e.response()
    except Exception as e:  # noqa: BLE001
        return registry_outage(e).response()
