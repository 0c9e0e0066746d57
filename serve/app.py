"""The Ray Serve app: a FastAPI ingress bound to a multiplexed `Generator` deployment.

    client --HTTP--> Ingress (validate, resolve subject, build prompt, count tokens)
                        --handle.options(multiplexed_model_id="<subject>@v<version>")-->
                     Generator (base pipeline loaded once; subject weights cached LRU, swapped in place)

A replica of `Generator` builds the base pipeline once. Each subject version is a multiplexed
"model": its UNet and text-encoder state dicts on the CPU, read from the checkpoint the registry
fetched. Generating copies those weights into the one pipeline (skipped when that version is
already in it) and samples, both under one lock per replica, so two subjects' weights never
mix in one image. The model id carries the registry version, so a re-registered subject is
loaded afresh instead of being served from a stale cache entry.

Run it: `serve run configs/serve.yaml` (or `serve run serve.app:app`).
"""
# No `from __future__ import annotations` here: FastAPI must see the real request types on the
# routes that Serve re-creates inside the replica.
import asyncio
import base64
import logging
import secrets
import threading
import time

import psutil
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.exceptions import RayTaskError
from ray.serve.config import BackpressureConfig
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException
from transformers import CLIPTokenizer

from comfusion import __version__
from comfusion.checkpoint import CheckpointError, load_subject_weights_, read_subject_weights
from comfusion.models import BASE_PRESETS, SAVED_PRESETS, build_byte_tokenizer, load_base, resolve_base
from comfusion.prompts import instance_scene_text
from comfusion.sampling import default_dtype, png_bytes, sample
from serve.registry import SubjectRecord, SubjectRegistry, UnknownSubjectError
from serve.schemas import MAX_SEED, GenerateRequest, GenerateResponse, SubjectInfo, SubjectList
from serve.settings import ServeSettings

log = logging.getLogger("ray.serve")
api = FastAPI(title="ComFusion", version=__version__,
              description="Render trained ComFusion subjects: `a [identifier] [class noun] [scene]`.")


# ---------------------------------------------------------------------------------------
# helpers


def resolve_device(name: str) -> str:
    """"auto" -> "cuda" when a GPU is visible, else "cpu"."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def load_tokenizer(base: str, seed: int = 0) -> CLIPTokenizer:
    """The base model's tokenizer alone (the ingress counts tokens; it needs no weights)."""
    if base in BASE_PRESETS and base not in SAVED_PRESETS:
        return build_byte_tokenizer()  # the in-memory presets use the byte tokenizer
    return CLIPTokenizer.from_pretrained(resolve_base(base, seed), subfolder="tokenizer")


def model_id(record: SubjectRecord) -> str:
    """The multiplexed model id of a subject version, e.g. `yellow-ball@v3`."""
    return f"{record.id}@v{record.version}"


def split_model_id(mid: str) -> tuple[str, int]:
    subject_id, _, version = mid.rpartition("@v")
    return subject_id, int(version)


def unprocessable(field: str, message: str) -> JSONResponse:
    """A 422 shaped like the validation errors: the field and what is wrong with it."""
    return JSONResponse(status_code=422, content={
        "detail": [{"loc": ["body", field], "field": field, "msg": message, "type": "value_error"}],
        "message": f"{field}: {message}"})


def overloaded(retry_after_s: int) -> JSONResponse:
    return JSONResponse(status_code=503, headers={"Retry-After": str(retry_after_s)},
                        content={"detail": "the model is overloaded; retry later"})


def _root_cause(e: BaseException) -> BaseException:
    """The exception raised inside the replica, for a RayTaskError from a handle call."""
    return e.cause if isinstance(e, RayTaskError) and e.cause is not None else e


def wants_png(request: Request) -> bool:
    """True when the Accept header names image/png before any JSON type."""
    types = [part.split(";")[0].strip().lower() for part in request.headers.get("accept", "").split(",")]
    for t in types:
        if t == "image/png":
            return True
        if t in ("application/json", "application/*"):
            return False
    return False


# ---------------------------------------------------------------------------------------
# errors: bad input is always a 4xx with the field named; nothing leaks a stack trace


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    detail = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ())]
        field = ".".join(loc[1:]) if loc[:1] == ["body"] else ".".join(loc)
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        detail.append({"loc": loc, "field": field or "body", "msg": msg, "type": err.get("type", "value_error")})
    message = "; ".join(f"{d['field']}: {d['msg']}" for d in detail)
    return JSONResponse(status_code=422, content={"detail": detail, "message": message})


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(status_code=exc.status_code, content={"detail": exc.detail}, headers=exc.headers)


@api.exception_handler(Exception)
async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
    return JSONResponse(status_code=500, content={"detail": f"internal error ({type(exc).__name__})"})


# ---------------------------------------------------------------------------------------
# the model deployment


class ModelError(RuntimeError):
    """Loading a subject or sampling failed; carries a one-line message across the Ray boundary
    (some exceptions, e.g. CheckpointError, cannot be rebuilt on the caller's side)."""


class SubjectWeights:
    """The multiplexed "model": one subject version's state dicts on the CPU.

    LRU eviction calls `__del__`; it only tells the replica the subject left the cache. The
    tensors are freed when the last in-flight request holding this object lets go of it.
    """

    def __init__(self, mid: str, unet_state: dict, text_state: dict, meta, on_release):
        self.mid, self.state, self.meta = mid, (unet_state, text_state), meta
        self._on_release = on_release

    def __del__(self):
        release, self._on_release = getattr(self, "_on_release", None), None
        if release is not None:  # evicted, or garbage-collected: report it once
            release(self.mid)


def _pin(state: dict) -> dict:
    """Page-locked copies, so swapping into a CUDA pipeline is a fast host-to-device copy."""
    return {k: v.pin_memory() for k, v in state.items()}


@serve.deployment(name="Generator", max_ongoing_requests=4, max_queued_requests=8,
                  ray_actor_options={"num_cpus": 1})
class Generator:
    """One base pipeline per replica; subjects' weights cached (LRU, K per replica) and swapped in."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.device = resolve_device(settings.device)
        self.dtype = default_dtype(self.device)
        self.components = load_base(settings.base, seed=settings.preset_seed, device=self.device, dtype=self.dtype)
        self.pipeline_builds = 1  # never rebuilt for a request: only weights are swapped
        self.registry = SubjectRegistry(settings.tracking_uri, settings.cache_dir, ttl_s=settings.registry_ttl_s)
        self._lock = asyncio.Lock()  # one image at a time owns the pipeline's weights
        self._current: str | None = None  # model id whose weights are in the pipeline now
        self._loaded: set[str] = set()  # model ids in the multiplex cache
        self._loaded_lock = threading.Lock()  # eviction reports come from an executor thread
        self._counts = dict(loads=0, evictions=0, swaps=0, swap_seconds=0.0, load_seconds=0.0, images=0)

        async def load_subject(mid: str) -> SubjectWeights:
            return await self._load_subject(mid)

        self._get_subject = serve.multiplexed(max_num_models_per_replica=settings.max_models_per_replica)(
            load_subject)

    async def _load_subject(self, mid: str) -> SubjectWeights:
        """Fetch (registry cache) and read one subject version's weights to the CPU."""
        t0 = time.perf_counter()
        subject_id, version = split_model_id(mid)
        folder = await asyncio.to_thread(self.registry.fetch, subject_id, version)
        unet_state, text_state, meta = await asyncio.to_thread(read_subject_weights, folder, device="cpu",
                                                               dtype=self.dtype)
        if self.device == "cuda":
            unet_state, text_state = _pin(unet_state), _pin(text_state)
        with self._loaded_lock:
            self._loaded.add(mid)
        self._counts["loads"] += 1
        self._counts["load_seconds"] += time.perf_counter() - t0
        return SubjectWeights(mid, unet_state, text_state, meta, self._released)

    def _released(self, mid: str) -> None:
        with self._loaded_lock:
            if mid in self._loaded:
                self._loaded.discard(mid)
                self._counts["evictions"] += 1

    async def _swap_in(self, weights: SubjectWeights) -> None:
        """Copy the subject's weights into the pipeline in place (caller holds the lock)."""
        if self._current == weights.mid:
            return
        t0 = time.perf_counter()
        self._current = None  # unknown until the copy completes
        await asyncio.to_thread(load_subject_weights_, self.components, weights.state)
        self._current = weights.mid
        self._counts["swaps"] += 1
        self._counts["swap_seconds"] += time.perf_counter() - t0

    async def generate(self, prompt: str, seeds: list[int], steps: int, guidance_scale: float,
                       height: int | None, width: int | None) -> dict:
        """PNG bytes of one image per seed, for the subject named by the request's model id."""
        mid = serve.get_multiplexed_model_id()
        try:
            weights = await self._get_subject(mid)
            async with self._lock:
                await self._swap_in(weights)
                out = await asyncio.to_thread(sample, self.components, [prompt] * len(seeds), seeds, steps=steps,
                                              guidance_scale=guidance_scale, height=height, width=width)
        except UnknownSubjectError:
            raise
        except Exception as e:  # noqa: BLE001 - one message line for the ingress's 500
            log.error("generation failed for %s: %s: %s", mid, type(e).__name__, e)
            message = str(e).replace(e.folder, mid) if isinstance(e, CheckpointError) else str(e)
            raise ModelError(f"{type(e).__name__}: {message}") from None  # no server paths for clients
        self._counts["images"] += len(seeds)
        pngs = await asyncio.to_thread(lambda: [png_bytes(img) for img in out.images])
        h, w = out.images.shape[1:3]
        return dict(images=pngs, seeds=list(seeds), height=int(h), width=int(w))

    async def stats(self) -> dict:
        """Replica state for tests and dashboards."""
        with self._loaded_lock:
            loaded = sorted(self._loaded)
        return dict(replica=serve.get_replica_context().replica_id.unique_id, device=self.device,
                    dtype=str(self.dtype), pipeline_builds=self.pipeline_builds, loaded=loaded,
                    current=self._current, max_models_per_replica=self.settings.max_models_per_replica,
                    rss_bytes=psutil.Process().memory_info().rss, **self._counts)


# ---------------------------------------------------------------------------------------
# the HTTP ingress


@serve.deployment(name="Ingress", max_ongoing_requests=64, max_queued_requests=128,
                  backpressure_config=BackpressureConfig(status_code=503, retry_after_s=1),
                  ray_actor_options={"num_cpus": 0.25})
@serve.ingress(api)
class Ingress:
    """Validates requests and sends good ones to the subject's `Generator` replica."""

    def __init__(self, generator: DeploymentHandle, settings: ServeSettings):
        self.generator = generator
        self.settings = settings
        self.registry = SubjectRegistry(settings.tracking_uri, settings.cache_dir, ttl_s=settings.registry_ttl_s)
        self.tokenizer = load_tokenizer(settings.base, settings.preset_seed)

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/v1/subjects", response_model=SubjectList)
    async def subjects(self):
        """Every subject with a `serving` version: id, identifier, class noun, method, metrics."""
        try:
            records = await asyncio.to_thread(self.registry.list_subjects)
        except Exception as e:  # noqa: BLE001 - the registry backend is down
            return self._registry_down(e)
        return SubjectList(subjects=[SubjectInfo(**r.public()) for r in records])

    @api.get("/v1/stats")
    async def stats(self):
        """The state of one Generator replica (loaded subjects, swaps, pipeline builds, RSS)."""
        try:
            return await self.generator.stats.remote()
        except BackPressureError:
            return overloaded(self.settings.retry_after_s)

    def _registry_down(self, e: Exception) -> JSONResponse:
        log.error("registry lookup failed: %s: %s", type(e).__name__, e)
        return JSONResponse(status_code=503, headers={"Retry-After": str(self.settings.retry_after_s)},
                            content={"detail": "the subject registry is unavailable"})

    def _prompt(self, req: GenerateRequest, record: SubjectRecord) -> tuple[str, str]:
        """The text to render and the request field it came from."""
        if req.scene is not None:
            return instance_scene_text(record.identifier, record.class_noun, req.scene), "scene"
        return req.prompt, "prompt"

    def _too_long(self, prompt: str, field: str) -> JSONResponse | None:
        """A 422 when the prompt needs more tokens than the text encoder takes."""
        n = len(self.tokenizer(prompt, truncation=False).input_ids)  # BOS and EOS included
        limit = self.tokenizer.model_max_length
        if n <= limit:
            return None
        return unprocessable(field, f"the prompt is {n} tokens long (start and end tokens included); "
                                    f"the model takes at most {limit}")

    @api.post("/v1/generate", response_model=GenerateResponse, responses={
        200: {"content": {"image/png": {}}, "description": "JSON, or the PNG itself for `Accept: image/png`"},
        404: {"description": "unknown subject"}, 422: {"description": "invalid request"},
        503: {"description": "overloaded; see Retry-After"}})
    async def generate(self, req: GenerateRequest, request: Request):
        """Render the subject: with `scene`, the prompt is `a [identifier] [class noun] [scene]`."""
        try:
            record = await asyncio.to_thread(self.registry.resolve, req.subject)
        except Exception as e:  # noqa: BLE001 - the registry backend is down, not the request's fault
            return self._registry_down(e)
        if record is None:
            return JSONResponse(status_code=404, content={"detail": f"unknown subject {req.subject!r}"})
        prompt, field = self._prompt(req, record)
        if (error := self._too_long(prompt, field)) is not None:
            return error
        png = wants_png(request)
        if png and req.num_images != 1:
            return unprocessable("num_images", "Accept: image/png returns one image; ask for num_images 1 "
                                               "or accept application/json")
        first = req.seed if req.seed is not None else secrets.randbelow(MAX_SEED + 1)
        seeds = [first + i for i in range(req.num_images)]
        steps = req.steps or self.settings.default_steps
        result = await self._call_generator(record, prompt, seeds, steps, req)
        if isinstance(result, Response):
            return result
        if png:
            return Response(result["images"][0], media_type="image/png", headers={
                "X-Seed": str(seeds[0]), "X-Subject-Version": str(record.version)})
        return GenerateResponse(images=[base64.b64encode(b).decode("ascii") for b in result["images"]],
                                prompt=prompt, seeds=seeds, subject=record.id, version=record.version, steps=steps,
                                guidance_scale=req.guidance_scale, height=result["height"], width=result["width"])

    async def _call_generator(self, record: SubjectRecord, prompt: str, seeds: list[int], steps: int,
                              req: GenerateRequest) -> dict | Response:
        """The Generator's result, or the error response: 503 when overloaded, 500 when it failed."""
        handle = self.generator.options(multiplexed_model_id=model_id(record))
        try:
            return await handle.generate.remote(prompt, seeds, steps, req.guidance_scale, req.height, req.width)
        except BackPressureError:
            return overloaded(self.settings.retry_after_s)
        except Exception as e:  # noqa: BLE001 - reported as a 500 with a message, never a stack
            cause = _root_cause(e)
            if isinstance(cause, BackPressureError):
                return overloaded(self.settings.retry_after_s)
            if isinstance(cause, UnknownSubjectError):
                return JSONResponse(status_code=404, content={"detail": str(cause)})
            first_line = (str(cause).strip().splitlines() or [""])[0][:300]
            if not isinstance(cause, ModelError):
                first_line = f"{type(cause).__name__}: {first_line}"
                log.error("generator call failed for %s: %s", model_id(record), first_line)
            return JSONResponse(status_code=500, content={"detail": f"generation failed: {first_line}"})


# ---------------------------------------------------------------------------------------
# application builders


def make_app(settings: ServeSettings, *, generator_options: dict | None = None,
             ingress_options: dict | None = None) -> serve.Application:
    """The bound application; `*_options` are `Deployment.options` overrides (tests, benchmarks)."""
    generator = Generator.options(**(generator_options or {})).bind(settings)
    return Ingress.options(**(ingress_options or {})).bind(generator, settings)


def build_app(args: dict) -> serve.Application:
    """Builder for `import_path: serve.app:build_app`: `args` are `ServeSettings` fields."""
    return make_app(ServeSettings.from_args(args))


app = build_app({})  # `serve run serve.app:app`: the defaults (tiny preset, CPU)
