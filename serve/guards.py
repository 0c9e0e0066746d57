"""What keeps the Serve app whole under faults: stop flags for abandoned work, a body-size cap,
errors that carry their HTTP status across the Ray boundary, and the base-model check.
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from starlette.exceptions import HTTPException

from comfusion.checkpoint import SubjectMeta
from comfusion.models import BASE_PRESETS


class ServeError(RuntimeError):
    """A Generator failure with the status the ingress answers and a one-line message for the
    client (no server paths). Some exceptions, e.g. CheckpointError, cannot be rebuilt on the
    caller's side, so the Generator raises this instead."""

    status = 500

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status or type(self).status

    def __reduce__(self):
        return type(self), (str(self), self.status)


class RequestStopped(ServeError):
    """The request was cancelled (the client hung up) or ran past its deadline."""

    status = 504


class StopFlag:
    """Set from the event loop when a request is abandoned; the sampler checks it every step.

    Calling the flag (the sampler's `cancel` hook, in the worker thread) is True once it is set
    or the wall-clock `deadline` has passed. It records the thread CPU time of the step that was
    running when the stop was seen: the compute spent after the stop, at most one step.
    """

    def __init__(self, deadline: float | None = None):
        self.deadline = deadline
        self.reason: str | None = None
        self.steps = 0  # denoising steps started
        self.cpu_after_stop = 0.0  # thread CPU seconds of the step the stop landed in
        self._event = threading.Event()
        self._step_cpu: float | None = None  # thread CPU time when the current step started

    def set(self, reason: str = "cancelled") -> None:
        if self.reason is None:
            self.reason = reason
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def __call__(self) -> bool:
        now = time.thread_time()
        if self.deadline is not None and time.time() >= self.deadline:
            self.set("timed out")
        if self._event.is_set():
            if self._step_cpu is not None:
                self.cpu_after_stop = now - self._step_cpu
                self._step_cpu = None
            return True
        self._step_cpu = now
        self.steps += 1
        return False


# ---------------------------------------------------------------------------------------
# request bodies


class BodySizeLimit:
    """ASGI middleware: a body over the limit gets a 413 before it is read whole.

    A declared `Content-Length` is checked first; a chunked body is counted as it arrives. The
    limit is the app's `state.body_limits[path]` for a route with its own, else its
    `state.max_body_bytes` when set (the Serve ingress sets both from its settings, which arrive
    after import), else `default`.
    """

    def __init__(self, app, default: int):
        self.app, self.default = app, default

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = getattr(scope.get("app"), "state", None)
        per_route = getattr(state, "body_limits", None) or {}  # e.g. photo uploads: {"/v1/subjects": 20 MiB}
        limit = per_route.get(scope.get("path")) or getattr(state, "max_body_bytes", None) or self.default
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            return await _refuse(send, limit)
        seen, started = 0, False

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:  # FastAPI re-raises an HTTPException met while reading the body
                    raise BodyTooLarge(limit)
            return message

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except BodyTooLarge:
            if not started:
                await _refuse(send, limit)


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(status_code=413, detail=_too_large(limit))


def _too_large(limit: int) -> str:
    return f"request body larger than {limit} bytes"


async def _refuse(send, limit: int) -> None:
    body = json.dumps({"detail": _too_large(limit)}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------------------------------
# base model


def _same_base(a: str, b: str) -> bool:
    """Names of one base model: equal strings, or two spellings of one local folder."""
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.is_dir() and pb.is_dir() and pa.resolve() == pb.resolve()


def base_mismatch(meta: SubjectMeta, base: str, preset_seed: int) -> str | None:
    """Why a subject cannot be served on this base, or None when it can.

    The seed of a random-weight preset (`tiny`, `sd15-arch`) is compared too when the
    checkpoint's config records it: same shapes, other weights.
    """
    seed = (meta.config.get("model") or {}).get("preset_seed") if isinstance(meta.config, dict) else None
    seeded = base in BASE_PRESETS
    same = _same_base(meta.base_model, base) and (not seeded or seed is None or int(seed) == preset_seed)
    if same:
        return None
    theirs = f"{meta.base_model!r}" + (f" (preset seed {seed})" if seeded and seed is not None else "")
    ours = f"{base!r}" + (f" (preset seed {preset_seed})" if seeded else "")
    return f"was trained on base {theirs}; this app serves base {ours}"
