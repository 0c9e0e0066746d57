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
import functools
import logging
import secrets
import threading
import time
from dataclasses import dataclass

import numpy as np
import psutil
from fastapi import Depends, FastAPI, HTTPException, Request, Security
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
from comfusion.checkpoint import CheckpointError, read_subject_weights, verify_checkpoint
from comfusion.lora import LoraWeights, SubjectSlot, read_lora_subject
from comfusion.models import BASE_PRESETS, SAVED_PRESETS, build_byte_tokenizer, load_base, resolve_base
from comfusion.prompts import instance_scene_text
from comfusion.registry import visible_to
from comfusion.sampling import SamplingCancelled, default_device, default_dtype, png_bytes, sample
from serve.adapters import FullWeights, SubjectHandle, SubjectWeightsCache
from serve.auth import Caller, KeyStore, require_key
from serve.docs import add_offline_docs
from serve.guards import BodySizeLimit, RequestStopped, ServeError, StopFlag, base_mismatch
from serve.registry import (RegistryUnavailable, SubjectRecord, SubjectRegistry, UnknownSubjectError,
                            configure_mlflow_http)
from serve.schemas import MAX_SEED, GenerateRequest, GenerateResponse, SubjectInfo, SubjectList
from serve.settings import ServeSettings
from serve.studio_gate import StudioMount
from serve import selfservice

log = logging.getLogger("ray.serve")
api = FastAPI(title="ComFusion", version=__version__, docs_url=None, redoc_url=None,
              description="Render trained ComFusion subjects: `a [identifier] [class noun] [scene]`.")
add_offline_docs(api)  # /docs from the app's own files: works without internet access
api.add_middleware(BodySizeLimit, default=ServeSettings().max_body_bytes)  # the Ingress sets its own
api.mount("/studio", StudioMount(), name="studio")  # the Gradio studio, installed by each Ingress replica
api.include_router(selfservice.router)  # POST /v1/subjects, /v1/jobs: self-service training (Ray jobs)


async def require_admin(caller: Caller = Security(require_key)) -> Caller:
    if not caller.admin:
        raise HTTPException(status_code=403, detail=f"key {caller.key_id!r} is not an admin key")
    return caller


# ---------------------------------------------------------------------------------------
# helpers


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


def timed_out(timeout_s: float) -> JSONResponse:
    return JSONResponse(status_code=504, content={"detail": f"not finished within the app's {timeout_s:g} s "
                                                            "request timeout; its compute was stopped"})


async def _result(response):
    """A DeploymentResponse as a coroutine (for `asyncio.wait_for`)."""
    return await response


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


def _pin(state: dict) -> dict:
    """Page-locked copies, so swapping into a CUDA pipeline is a fast host-to-device copy."""
    return {k: v.pin_memory() for k, v in state.items()}


def _registry(settings: ServeSettings) -> SubjectRegistry:
    """The replica's registry view, with MLflow's HTTP timeouts and retries shortened first."""
    configure_mlflow_http(settings.registry_timeout_s, settings.registry_retries)
    return SubjectRegistry(settings.tracking_uri, settings.cache_dir, ttl_s=settings.registry_ttl_s,
                           lookup_wait_s=settings.lookup_wait_s, max_lookups=settings.max_lookups,
                           cache_max_bytes=int(settings.cache_max_mb * 2**20))


@dataclass
class _Job:
    """One generate request inside a batch: what to render and its own stop flag."""

    mid: str
    prompt: str
    seeds: list[int]
    steps: int
    guidance_scale: float
    height: int | None
    width: int | None
    stop: StopFlag

    def group(self) -> tuple:
        """Requests render in one sampler call only when these agree."""
        return self.steps, self.guidance_scale, self.height, self.width


class _BatchStop:
    """The sampler's cancel hook for a batch: every member's flag is checked (so each records its
    own steps), and the batch stops once all of them are stopped."""

    def __init__(self, members: list[StopFlag]):
        self.members = members

    def __call__(self) -> bool:
        return all([flag() for flag in self.members])  # a list: call every flag, no short circuit

    def set(self, reason: str = "cancelled") -> None:
        for flag in self.members:
            flag.set(reason)


@serve.deployment(name="Generator", max_ongoing_requests=16, max_queued_requests=32,
                  ray_actor_options={"num_cpus": 1})
class Generator:
    """One base pipeline per replica; subjects' weights cached in host memory and put in per request.

    Full subjects: K per replica (LRU), copied into the pipeline in place. LoRA subjects: many per
    replica (`serve.adapters`), activated as an adapter of the same pipeline. Requests for the same
    subject that arrive together render in one sampler call (`@serve.batch`, which batches per
    multiplexed model id). The swap and the sampling of one batch run in one worker thread that owns
    the pipeline until it returns: a cancelled request cannot release the pipeline half-way through
    a swap. Cancelling sets the request's StopFlag, which the sampler checks every denoising step;
    a batch stops when all its requests are stopped.
    """

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.device = default_device(settings.device)
        self.dtype = default_dtype(self.device)
        self.components = load_base(settings.base, seed=settings.preset_seed, device=self.device, dtype=self.dtype)
        self.pipeline_builds = 1  # never rebuilt for a request: only weights are swapped
        self.registry = _registry(settings)
        self.slot = SubjectSlot(self.components, max_rank=settings.lora_max_rank)  # what is in the pipeline now
        self.cache = SubjectWeightsCache(settings.max_models_per_replica, settings.max_adapters_per_replica,
                                         int(settings.adapter_cache_mb * 2**20), on_full_evict=self._released)
        self._lock = asyncio.Lock()  # held from before a request's thread starts until it has ended
        self._counts = dict(loads=0, evictions=0, swaps=0, swap_seconds=0.0, load_seconds=0.0, images=0,
                            stopped=0, steps_after_stop=0, cpu_after_stop=0.0, healed=0, lora_swaps=0,
                            lora_swap_seconds=0.0, batches=0, batched_requests=0)
        self._generate_batch.set_max_batch_size(settings.max_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(settings.batch_wait_s)

        async def load_subject(mid: str) -> SubjectHandle:
            return await self._load_subject(mid)

        # Serve's multiplex LRU holds small handles (it routes by them); the weights' own LRUs bound memory
        self._get_subject = serve.multiplexed(
            max_num_models_per_replica=settings.max_models_per_replica + settings.max_adapters_per_replica)(
            load_subject)

    async def _load_subject(self, mid: str) -> SubjectHandle:
        """Fetch (disk cache, else the registry), verify and read one subject version's weights."""
        t0 = time.perf_counter()
        subject_id, version = split_model_id(mid)
        weights = await asyncio.to_thread(self._read_whole, subject_id, version)
        if (why := base_mismatch(weights.meta, self.settings.base, self.settings.preset_seed)) is not None:
            raise ServeError(f"subject {subject_id!r} version {version} {why}", status=409)
        self._counts["loads"] += 1
        self._counts["load_seconds"] += time.perf_counter() - t0
        return self.cache.put(mid, weights)

    async def _weights(self, handle: SubjectHandle):
        """The handle's weights from host memory, read again when their LRU let them go."""
        weights = self.cache.get(handle)
        if weights is None:
            await self._load_subject(handle.mid)
            weights = self.cache.get(handle)
        return weights

    def _read_whole(self, subject_id: str, version: int) -> FullWeights | LoraWeights:
        """The verified weights; a cached copy that fails its checksums is moved aside and fetched
        once more. ServeError naming the subject and version (no paths) when it stays damaged."""
        for attempt in range(2):
            try:
                folder = self.registry.fetch(subject_id, version)
                weights = self._read_folder(folder)
                self._counts["healed"] += attempt  # the second attempt worked: the cache healed
                return weights
            except RegistryUnavailable as e:
                raise ServeError(f"subject {subject_id!r} version {version} is not cached here and {e}",
                                 status=503) from None
            except (CheckpointError, OSError, ValueError) as e:
                problem = f"{e.file}: {e.problem}" if isinstance(e, CheckpointError) else type(e).__name__
                log.warning("subject %s v%d damaged (%s); attempt %d", subject_id, version, problem, attempt + 1)
                self.registry.quarantine(subject_id, version)
        raise ServeError(f"subject {subject_id!r} version {version}: the checkpoint is damaged ({problem}) "
                         "and the registry's copy did not restore it")

    def _read_folder(self, folder) -> FullWeights | LoraWeights:
        if verify_checkpoint(folder).kind == "lora":
            return read_lora_subject(folder, dtype=self.dtype)
        unet_state, text_state, meta = read_subject_weights(folder, device="cpu", dtype=self.dtype)
        if self.device == "cuda":
            unet_state, text_state = _pin(unet_state), _pin(text_state)
        return FullWeights(unet_state, text_state, meta)

    def _released(self, mid: str) -> None:
        self._counts["evictions"] += 1

    def _swap_in(self, mid: str, weights: FullWeights | LoraWeights) -> None:
        """Put the subject into the pipeline (worker thread, pipeline owned)."""
        if self.slot.current == mid:
            return
        t0 = time.perf_counter()
        if self.settings.fault_slow_subject and mid.startswith(f"{self.settings.fault_slow_subject}@"):
            self.slot.current = None  # unknown until the swap completes
            time.sleep(self.settings.fault_swap_delay_s)  # fault injection: a slow swap
        lora = isinstance(weights, LoraWeights)
        if lora:
            self.slot.use_lora(mid, weights)
        else:
            self.slot.use_full(mid, weights.state)
        key = "lora_swap" if lora else "swap"
        self._counts[f"{key}s"] += 1
        self._counts[f"{key}_seconds"] += time.perf_counter() - t0

    def _render(self, mid: str, weights, jobs: list[_Job], stop: _BatchStop):
        """Swap (never interrupted) and sample every job's seeds in one call (stopped at the next
        step once all jobs are stopped)."""
        if stop():
            raise SamplingCancelled("stopped before it started")
        self._swap_in(mid, weights)
        first = jobs[0]
        prompts = [j.prompt for j in jobs for _ in j.seeds]
        seeds = [s for j in jobs for s in j.seeds]
        return sample(self.components, prompts, seeds, cancel=stop, steps=first.steps,
                      guidance_scale=first.guidance_scale, height=first.height, width=first.width,
                      batch_size=max(8, len(seeds)))

    async def _run_owned(self, func, stop):
        """`func()` in a worker thread that owns the pipeline until it returns, whatever happens to
        the awaiting task: the lock is released by the thread's completion, not by the task."""
        await self._lock.acquire()  # a cancel while waiting here leaves the lock untouched
        loop = asyncio.get_running_loop()
        try:
            future = loop.run_in_executor(None, func)
        except BaseException:
            self._lock.release()
            raise
        future.add_done_callback(lambda _: self._lock.release())
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            stop.set("cancelled")  # the sampler stops at its next step; the swap, if running, completes
            future.add_done_callback(lambda f: self._count_stop(stop, f))
            raise

    def _count_stop(self, stop, future: asyncio.Future | None = None) -> None:
        """Count each stopped request of `stop` (a StopFlag or a batch's flags) once its work ended."""
        if future is not None and not future.cancelled():
            future.exception()  # retrieved: SamplingCancelled is the expected end of a cancelled request
        for flag in getattr(stop, "members", [stop]):
            if flag.is_set():
                self._counts["stopped"] += 1
                self._counts["steps_after_stop"] += int(flag.cpu_after_stop > 0)
                self._counts["cpu_after_stop"] += flag.cpu_after_stop

    async def generate(self, prompt: str, seeds: list[int], steps: int, guidance_scale: float,
                       height: int | None, width: int | None, deadline: float | None = None) -> dict:
        """PNG bytes of one image per seed, for the subject named by the request's model id.

        `deadline` (wall-clock seconds) stops the sampling like a cancel does.
        """
        job = _Job(serve.get_multiplexed_model_id(), prompt, list(seeds), steps, guidance_scale, height, width,
                   StopFlag(deadline))
        try:
            out = await self._generate_batch(job)
        except asyncio.CancelledError:
            job.stop.set("cancelled")  # counted by the batch once its sampling has ended
            raise
        if isinstance(out, SamplingCancelled):
            raise RequestStopped(f"generation {job.stop.reason or 'stopped'} after {job.stop.steps} of {steps} "
                                 "steps") from None
        if isinstance(out, BaseException):
            raise out
        self._counts["images"] += len(seeds)
        pngs = await asyncio.to_thread(lambda: [png_bytes(img) for img in out])
        h, w = out.shape[1:3]
        return dict(images=pngs, seeds=list(seeds), height=int(h), width=int(w))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _generate_batch(self, jobs: list[_Job]) -> list:
        """One subject's requests that arrived together (Serve batches per model id): per group of
        equal sampler settings, one swap and one sampler call. Returns per job its (n, H, W, 3)
        images, or the exception that ended it."""
        results: list = [None] * len(jobs)
        groups: dict[tuple, list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(job.group(), []).append(i)
        for idx in groups.values():
            outs = await self._render_group([jobs[i] for i in idx])
            for i, out in zip(idx, outs):
                results[i] = out
        return results

    async def _render_group(self, jobs: list[_Job]) -> list:
        mid = jobs[0].mid
        stop = _BatchStop([j.stop for j in jobs])
        try:
            handle = await self._get_subject(mid)
            weights = await self._weights(handle)
            out = await self._run_owned(functools.partial(self._render, mid, weights, jobs, stop), stop)
        except (UnknownSubjectError, ServeError) as e:
            return [e] * len(jobs)
        except SamplingCancelled as e:
            self._count_stop(stop)
            return [e] * len(jobs)
        except Exception as e:  # noqa: BLE001 - one message line for the ingress's 500
            log.error("generation failed for %s: %s: %s", mid, type(e).__name__, e)
            message = str(e).replace(e.folder, mid) if isinstance(e, CheckpointError) else str(e)
            return [ServeError(f"{type(e).__name__}: {message}")] * len(jobs)  # no server paths for clients
        self._count_stop(stop)  # requests stopped while others of the batch went on
        self._counts["batches"] += 1
        self._counts["batched_requests"] += len(jobs)
        bounds = np.cumsum([0] + [len(j.seeds) for j in jobs])
        return [out.images[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    async def stats(self) -> dict:
        """Replica state for tests, benchmarks and dashboards."""
        cpu = psutil.Process().cpu_times()
        return dict(replica=serve.get_replica_context().replica_id.unique_id, device=self.device,
                    dtype=str(self.dtype), pipeline_builds=self.pipeline_builds, loaded=sorted(self.cache.full.keys()),
                    current=self.slot.current, max_models_per_replica=self.settings.max_models_per_replica,
                    max_adapters_per_replica=self.settings.max_adapters_per_replica,
                    rss_bytes=psutil.Process().memory_info().rss, cpu_seconds=cpu.user + cpu.system,
                    busy=self._lock.locked(), slot_swaps=dict(self.slot.swaps), **self.cache.stats(), **self._counts)


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
        self.registry = _registry(settings)
        self.registry.refresh_soon()  # list the registry while the replica starts
        self.tokenizer = load_tokenizer(settings.base, settings.preset_seed)
        api.state.max_body_bytes = settings.max_body_bytes  # read by BodySizeLimit
        api.state.keys = KeyStore(settings.api_keys_file)  # read by require_key; reloaded when the file changes
        selfservice.install(api, settings)  # the training routes' state and the upload size limit
        if api.state.keys.count == 0:
            log.warning("no API keys in %s (%s): every request but /healthz is refused until one is created "
                        "with `python -m serve.auth create NAME --file %s`", settings.api_keys_file,
                        api.state.keys.error or "no such file or no keys", settings.api_keys_file)
        # /studio (same registry, Generator and keys) is built in the background: importing Gradio
        # takes ~10 s, and the API should not wait for it (/studio answers 503 until it is ready)
        self.studio = None
        threading.Thread(target=self._start_studio, name="studio-start", daemon=True).start()

    def _start_studio(self) -> None:
        try:
            from serve.studio import start_studio  # gradio is imported by replicas only

            self.studio = start_studio(self, api.state.keys)
        except Exception as e:  # noqa: BLE001 - the API goes on without the studio
            log.error("studio disabled: %s: %s", type(e).__name__, e)

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/v1/subjects", response_model=SubjectList)
    async def subjects(self, caller: Caller = Security(require_key)):
        """Every subject with a `serving` version that the key may see (its own and the operators';
        an admin key sees all): id, identifier, class noun, method, kind, metrics."""
        try:
            records = await asyncio.to_thread(self.registry.list_subjects)
        except RegistryUnavailable as e:  # down, and never listed since this replica started
            return self._registry_down(e)
        return SubjectList(subjects=[SubjectInfo(**r.public()) for r in records
                                     if visible_to(r.owner, caller.key_id, caller.admin)])

    @api.get("/v1/stats", dependencies=[Depends(require_admin)])
    async def stats(self):
        """The state of one Generator replica (loaded subjects, swaps, pipeline builds, RSS); admin keys only."""
        try:
            return await self.generator.stats.remote()
        except BackPressureError:
            return overloaded(self.settings.retry_after_s)

    def _registry_down(self, e: Exception) -> JSONResponse:
        log.warning("registry lookup failed: %s: %s", type(e).__name__, e)
        return JSONResponse(status_code=503, headers={"Retry-After": str(self.settings.retry_after_s)},
                            content={"detail": f"{e}; retry later"})

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
        401: {"description": "no API key, or not a valid one"},
        429: {"description": "the key is over its request rate; see Retry-After"},
        200: {"content": {"image/png": {}}, "description": "JSON, or the PNG itself for `Accept: image/png`"},
        404: {"description": "unknown subject"}, 409: {"description": "the subject's base is not the app's"},
        413: {"description": "body too large"}, 422: {"description": "invalid request"},
        503: {"description": "overloaded, or the registry is down for a subject not seen before; see Retry-After"},
        504: {"description": "not finished within the app's request timeout"}})
    async def generate(self, req: GenerateRequest, request: Request, caller: Caller = Security(require_key)):
        """Render the subject: with `scene`, the prompt is `a [identifier] [class noun] [scene]`."""
        deadline = time.time() + self.settings.request_timeout_s  # no header moves it
        try:
            record = await asyncio.to_thread(self.registry.resolve, req.subject)
        except RegistryUnavailable as e:  # only for subjects never seen while MLflow answered
            return self._registry_down(e)
        if record is None or not visible_to(record.owner, caller.key_id, caller.admin):  # others' are unknown
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
        result = await self._call_generator(record, prompt, seeds, steps, req, deadline)
        if isinstance(result, Response):
            return result
        if png:
            return Response(result["images"][0], media_type="image/png", headers={
                "X-Seed": str(seeds[0]), "X-Subject-Version": str(record.version)})
        return GenerateResponse(images=[base64.b64encode(b).decode("ascii") for b in result["images"]],
                                prompt=prompt, seeds=seeds, subject=record.id, version=record.version, steps=steps,
                                guidance_scale=req.guidance_scale, height=result["height"], width=result["width"])

    async def _call_generator(self, record: SubjectRecord, prompt: str, seeds: list[int], steps: int,
                              req: GenerateRequest, deadline: float) -> dict | Response:
        """The Generator's result, or the error response (503 overloaded, 504 past the deadline, the
        Generator's status for its errors). A cancelled request cancels the Generator's call."""
        handle = self.generator.options(multiplexed_model_id=model_id(record))
        response = handle.generate.remote(prompt, seeds, steps, req.guidance_scale, req.height, req.width, deadline)
        try:  # the Generator stops itself at the deadline; the grace covers its reply in flight
            return await asyncio.wait_for(_result(response), timeout=max(deadline - time.time(), 0) + 5.0)
        except (TimeoutError, asyncio.TimeoutError):
            response.cancel()
            return timed_out(self.settings.request_timeout_s)
        except asyncio.CancelledError:
            response.cancel()  # the client hung up: stop the Generator's work too
            raise
        except BackPressureError:
            return overloaded(self.settings.retry_after_s)
        except Exception as e:  # noqa: BLE001 - reported with its status and a message, never a stack
            return self._generator_error(record, _root_cause(e))

    def _generator_error(self, record: SubjectRecord, cause: BaseException) -> JSONResponse:
        if isinstance(cause, BackPressureError):
            return overloaded(self.settings.retry_after_s)
        if isinstance(cause, UnknownSubjectError):
            return JSONResponse(status_code=404, content={"detail": str(cause)})
        if isinstance(cause, RequestStopped):
            return timed_out(self.settings.request_timeout_s)
        first_line = (str(cause).strip().splitlines() or [""])[0][:300]
        if isinstance(cause, ServeError):
            headers = {"Retry-After": str(self.settings.retry_after_s)} if cause.status == 503 else None
            prefix = "generation failed: " if cause.status == 500 else ""
            return JSONResponse(status_code=cause.status, headers=headers, content={"detail": prefix + first_line})
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
