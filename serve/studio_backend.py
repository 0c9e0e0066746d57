"""What the studio asks of the app: subjects, their versions, pictures, training photos, MLflow logging,
and the self-service training routes.

`AppBackend` works inside an Ingress replica: the replica's own registry view, its Generator
handle (the same multiplexed call `POST /v1/generate` makes, so a studio picture is the API's
picture) and its tokenizer check. Training goes through the app's own HTTP routes
(`serve.selfservice`), called in-process over ASGI with the signed-in key, so an upload from the
studio meets the same checks, limits, owner tags and job submission as one sent with curl.
Errors come back as `StudioError` with a message for people.
"""
from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import logging
import tempfile
import time
from pathlib import Path

import httpx

from comfusion.prompts import instance_scene_text
from comfusion.registry import SERVING_ALIAS, visible_to
from serve.auth import Caller
from serve.registry import RegistryUnavailable, SubjectRecord

log = logging.getLogger("ray.serve")
PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_PHOTO_BYTES = 20 * 2**20
API_TIMEOUT_S = 300.0  # an in-process call of a training route (an upload waits on the job API)
NO_TRAINING = ("Self-service training is not set up on this app: it needs the Ray job API (`ray_address`) and "
               "job storage (`job_storage`). Subjects can still be trained with `jobs/train_many.py`.")


class StudioError(RuntimeError):
    """Something the studio cannot do; the message is shown as it is."""


def no_subjects_message() -> str:
    return ("No subjects are registered yet. Train one (`jobs/train_many.py`, or `make demo`); "
            "it appears here within seconds of being registered.")


def read_detail(response) -> str:
    """The `detail` of one of the app's JSON error responses."""
    try:
        body = json.loads(bytes(response.body))
        detail = body.get("message") or body.get("detail")
        return detail if isinstance(detail, str) else json.dumps(detail)
    except (ValueError, AttributeError):
        return f"status {getattr(response, 'status_code', '?')}"


def api_problem(response: httpx.Response) -> str:
    """One of the app's error answers as a sentence for the page (the API's own words, never a trace)."""
    try:
        body = response.json()
        detail = body.get("message") or body.get("detail")
        detail = detail if isinstance(detail, str) else json.dumps(detail)
    except (ValueError, AttributeError):
        detail = response.text[:300] or f"status {response.status_code}"
    code, retry = response.status_code, response.headers.get("retry-after")
    later = f" (try again in {retry} s)" if retry else ""
    if code == 401:
        return "Your key is no longer valid: reload the page and sign in again."
    if code == 413:
        return f"The photos are too large together ({detail}); send fewer or smaller photos."
    if code == 422:
        return f"Not accepted: {detail}"
    if code == 503:
        return f"Training is not available right now: {detail}{later}"
    return f"{detail}{later}" if code in (403, 404, 409, 429) else f"The app answered {code}: {detail}"


class AppBackend:
    """The studio's view of one Ingress replica."""

    def __init__(self, ingress):
        self.ingress = ingress
        self.settings = ingress.settings
        self.registry = ingress.registry
        self.api = None  # the Ingress's FastAPI app, seen on the first request through /studio (`attach_api`)

    # --- the app's own training routes

    def attach_api(self, app, upload_path: str) -> None:
        """Remember the app serving /studio, and let Gradio's upload route (`upload_path`) take photos up
        to the app's upload limit (the app's default body limit is for small JSON requests)."""
        if self.api is not None or app is None or not hasattr(app, "state"):
            return
        limits = getattr(app.state, "body_limits", None) or {}
        if hasattr(self.settings, "max_upload_bytes"):
            app.state.body_limits = {**limits, upload_path: self.settings.max_upload_bytes}
        self.api = app

    async def call_api(self, method: str, path: str, key: str, **kwargs) -> httpx.Response:
        """One request to the app's own routes, in this process, as the signed-in key."""
        if self.api is None:
            raise StudioError(NO_TRAINING)
        transport = httpx.ASGITransport(app=self.api, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://ingress", timeout=API_TIMEOUT_S) as client:
            return await client.request(method, path, headers={"Authorization": f"Bearer {key}"}, **kwargs)

    async def training_api(self, method: str, path: str, key: str, **kwargs) -> dict:
        """The JSON of a 2xx answer; StudioError with the API's reason otherwise."""
        response = await self.call_api(method, path, key, **kwargs)
        if response.status_code == 503 and "not set up" in response.text:
            raise StudioError(NO_TRAINING)
        if response.status_code >= 400:
            raise StudioError(api_problem(response))
        return response.json()

    # --- subjects

    async def subjects(self, caller: Caller | None = None) -> list[SubjectRecord]:
        """The registry's subjects (those `caller` may see, when given)."""
        try:
            records = await asyncio.to_thread(self.registry.list_subjects)
        except RegistryUnavailable as e:
            raise StudioError(f"The subject registry does not answer ({e}); retry in a moment.") from None
        return [r for r in records if caller is None or visible_to(r.owner, caller.key_id, caller.admin)]

    async def subject(self, subject_id: str, caller: Caller | None = None) -> SubjectRecord:
        if not subject_id:
            raise StudioError("Choose a subject first.")
        try:
            record = await asyncio.to_thread(self.registry.resolve, subject_id)
        except RegistryUnavailable as e:
            raise StudioError(f"The subject registry does not answer ({e}); retry in a moment.") from None
        if record is None or (caller is not None and not visible_to(record.owner, caller.key_id, caller.admin)):
            raise StudioError(f"Subject {subject_id!r} is not registered (any more).")
        return record

    async def versions(self, subject_id: str) -> dict[str, SubjectRecord]:
        """Alias -> record of every alias of the subject (`comfusion`, `dreambooth`, `serving`, ...)."""
        record = await self.subject(subject_id)
        try:
            aliases = await asyncio.to_thread(self._aliases, subject_id)
        except Exception as e:  # noqa: BLE001 - MLflow down or slow
            raise StudioError(f"The registry did not list the versions of {subject_id!r} "
                              f"({type(e).__name__}); retry in a moment.") from None
        return {alias: dataclasses.replace(record, version=int(v), method=alias) for alias, v in aliases.items()}

    def _aliases(self, subject_id: str) -> dict[str, int]:
        from mlflow import MlflowClient  # noqa: PLC0415

        model = MlflowClient(tracking_uri=self.settings.tracking_uri).get_registered_model(subject_id)
        return {a: int(v) for a, v in sorted((model.aliases or {}).items())}

    @staticmethod
    def methods(versions: dict[str, SubjectRecord]) -> dict[str, SubjectRecord]:
        """One label per distinct version: method aliases first; `serving` only when no other alias names
        its version."""
        out: dict[str, SubjectRecord] = {}
        for alias, rec in sorted(versions.items(), key=lambda kv: kv[0] == SERVING_ALIAS):
            if all(r.version != rec.version for r in out.values()):
                out[alias] = rec
        return out

    # --- pictures

    def prompt(self, record: SubjectRecord, scene: str | None, free_prompt: str | None) -> str:
        """The prompt of a scene (`a [identifier] [class noun] [scene]`) or the free prompt, checked for length."""
        if scene:
            text, field = instance_scene_text(record.identifier, record.class_noun, scene), "scene"
        else:
            text, field = (free_prompt or "").strip(), "prompt"
            if not text:
                raise StudioError("Write a prompt, or choose one of the paper's scenes.")
        if (error := self.ingress._too_long(text, field)) is not None:
            raise StudioError(read_detail(error))
        return text

    async def render(self, record: SubjectRecord, prompt: str, seeds: list[int], steps: int) -> list[bytes]:
        """PNG bytes, one per seed, from the app's Generator (the call `/v1/generate` makes)."""
        from serve.schemas import GenerateRequest  # noqa: PLC0415

        req = GenerateRequest(subject=record.id, prompt=prompt, num_images=len(seeds), seed=seeds[0], steps=steps)
        deadline = time.time() + self.settings.request_timeout_s
        result = await self.ingress._call_generator(record, prompt, seeds, steps, req, deadline)
        if not isinstance(result, dict):
            raise StudioError(f"{record.id} ({record.method} v{record.version}) could not be rendered: "
                              f"{read_detail(result)}")
        return result["images"]

    # --- the training photo

    async def photo(self, record: SubjectRecord) -> bytes | None:
        """The subject's first training photo as PNG, when its checkpoint's config names one that this
        machine can read; None otherwise (checkpoints carry no photos, only their paths)."""
        try:
            return await asyncio.to_thread(self._photo, record)
        except Exception as e:  # noqa: BLE001 - a missing photo is not an error
            log.info("studio: no training photo for %s v%d (%s)", record.id, record.version, type(e).__name__)
            return None

    def _photo(self, record: SubjectRecord) -> bytes | None:
        import mlflow  # noqa: PLC0415
        from PIL import Image  # noqa: PLC0415

        with tempfile.TemporaryDirectory() as tmp:
            meta = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{record.source.rstrip('/')}/subject.json",
                                                            dst_path=tmp, tracking_uri=self.settings.tracking_uri))
            config = json.loads(meta.read_text()).get("config") or {}
        data = config.get("data") or {}
        spec = next((s for s in data.get("subjects") or [] if s.get("id") == record.id), None)
        if not spec or not spec.get("images"):
            return None
        path = Path(data.get("root") or "/") / spec["images"][0]
        if path.suffix.lower() not in PHOTO_SUFFIXES or not path.is_file() or path.stat().st_size > MAX_PHOTO_BYTES:
            return None
        with Image.open(path) as img:
            buf = io.BytesIO()
            img.convert("RGB").save(buf, format="PNG")
        return buf.getvalue()

    # --- MLflow

    async def log_results(self, table: list[dict], results_csv: str, votes_csv: str) -> str:
        return await asyncio.to_thread(log_user_study, self.settings.tracking_uri, table, results_csv, votes_csv)


def log_user_study(tracking_uri: str, table: list[dict], results_csv: str, votes_csv: str,
                   experiment: str = "studio") -> str:
    """Log the win rates and both CSVs to the newest `evaluation` run (made by `jobs/evaluate.py`), or to
    a new `evaluation` run in experiment `experiment` when there is none; returns the run id."""
    from mlflow import MlflowClient  # noqa: PLC0415
    from mlflow.entities import Metric  # noqa: PLC0415

    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.search_runs([e.experiment_id for e in client.search_experiments()],
                               filter_string="tags.kind = 'evaluation'", order_by=["attributes.start_time DESC"],
                               max_results=1)
    if found:
        run_id = found[0].info.run_id
    else:
        exp = client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp is not None else client.create_experiment(experiment)
        run_id = client.create_run(exp_id, run_name="evaluation", tags={"kind": "evaluation"}).info.run_id
        client.set_terminated(run_id)
    now = int(time.time() * 1000)
    metrics = []
    for r in table:
        key = f"user_study/{r['method_a']}_vs_{r['method_b']}/{r['subject'].strip('()')}/{r['question']}"
        metrics += [Metric(f"{key}/a_win_rate", r["a_win_rate"], now, 0), Metric(f"{key}/votes", r["votes"], now, 0),
                    Metric(f"{key}/ci_low", r["ci_low"], now, 0), Metric(f"{key}/ci_high", r["ci_high"], now, 0)]
    for k in range(0, len(metrics), 500):
        client.log_batch(run_id, metrics=metrics[k:k + 500])
    client.log_text(run_id, results_csv, "user_study/results.csv")
    client.log_text(run_id, votes_csv, "user_study/votes.csv")
    return run_id
