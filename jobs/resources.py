"""What a job may ask the Ray cluster for: the GPU rule, actor pools sized from what the cluster can
actually schedule, and a bounded wait for room with a message that says what holds it.

A job shares its cluster with other work (a Serve app holding CPUs or GPUs, another job), so
sizes come from what is free, not from the cluster's total: pools start with one actor and grow
as room appears, trials queue. When not even one actor or trainer fits for
`job.schedule_timeout_s`, the job stops with `NoRoomError` instead of waiting forever.
"""
from __future__ import annotations

import math
import os
import time
import warnings
from collections import Counter
from dataclasses import dataclass

import ray

from comfusion.config import ConfigError, JobConfig

POLL_S = 1.0
EPS = 1e-6


class NoRoomError(RuntimeError):
    """Nothing the job asked for could be scheduled within `job.schedule_timeout_s`."""


def uses_gpu(cfg: JobConfig) -> bool:
    """The GPU rule: `job.use_gpu` yes / no, or auto = yes when the cluster has a GPU."""
    gpus = ray.cluster_resources().get("GPU", 0)
    if cfg.job.use_gpu == "yes" and gpus < 1:
        raise ConfigError("job.use_gpu", "is 'yes' but the Ray cluster has no GPU")
    return cfg.job.use_gpu == "yes" or (cfg.job.use_gpu == "auto" and gpus > 0)


def unit(cfg: JobConfig, use_gpu: bool, cpus: float | None = None) -> dict[str, float]:
    """Resources of one actor or trainer: a GPU where there are GPUs, else CPU slots."""
    if use_gpu:
        return {"GPU": 1.0}
    per = cpus or cfg.job.cpus_per_trainer
    total = ray.cluster_resources().get("CPU", 0)
    if per > total:
        raise ConfigError("job.cpus_per_trainer", f"{per} CPUs per worker, but the cluster has {total:g}")
    return {"CPU": float(per)}


def fits(need: dict[str, float], pool: dict[str, float]) -> int:
    """How many units of `need` fit into `pool`."""
    return min(math.floor(pool.get(k, 0.0) / v + EPS) for k, v in need.items())


@dataclass(frozen=True)
class Pool:
    """A Ray Data actor pool: starts with `min_size` actors and grows up to `max_size`."""

    min_size: int
    max_size: int
    remote_args: dict  # num_cpus / num_gpus of each actor
    device: str
    threads: int | None  # torch threads per actor (CPU slots held), None on a GPU

    def map_batches(self, ds: "ray.data.Dataset", fn: type, **kwargs) -> "ray.data.Dataset":
        """`ds.map_batches(fn)` on this pool. Its actors are not restarted: Ray warns at every
        start of a restartable actor whose constructor arguments live in the object store, and
        callers redo a failed pipeline for what is missing instead. Ray 2.60 takes
        `max_restarts` only through its deprecated extra-arguments route, so that one warning
        is silenced here rather than shown to every user."""
        strategy = ray.data.ActorPoolStrategy(min_size=self.min_size, max_size=self.max_size,
                                              initial_size=self.min_size)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*is deprecated")
            return ds.map_batches(fn, compute=strategy, max_restarts=0, **self.remote_args, **kwargs)


def actor_pool(cfg: JobConfig, n_items: int, what: str, cpus_per_actor: float | None = None) -> Pool:
    """Pool for `n_items` work items: at most what the cluster could hold, after waiting (bounded)
    until at least one actor fits next to whatever else runs there."""
    use_gpu = uses_gpu(cfg)
    need = unit(cfg, use_gpu, cpus_per_actor)
    wait_for_room(need, cfg.job.schedule_timeout_s, what)
    most = max(1, min(fits(need, ray.cluster_resources()), n_items))
    args = {"num_gpus": 1} if use_gpu else {"num_cpus": need["CPU"]}
    threads = None if use_gpu else max(1, int(need["CPU"]))
    return Pool(min_size=1, max_size=most, remote_args=args, device="cuda" if use_gpu else "cpu", threads=threads)


def trainer_slots(cfg: JobConfig, use_gpu: bool, n_runs: int) -> int:
    """Trainers at once: as many as fit in what is free now (at least one, once one fits), capped
    by `job.max_concurrent`; each slot trains the job's runs one after another."""
    need = trainer_need(cfg, use_gpu)
    free = wait_for_room(need, cfg.job.schedule_timeout_s, "a trainer")
    slots = max(1, min(fits(need, free), n_runs))
    return min(slots, cfg.job.max_concurrent) if cfg.job.max_concurrent else slots


def trainer_need(cfg: JobConfig, use_gpu: bool) -> dict[str, float]:
    """One training slot: its Ray Train worker (a GPU worker also holds a CPU, Ray Train's default)."""
    if use_gpu:
        return {"GPU": 1.0, "CPU": 1.0}
    return unit(cfg, use_gpu)


def wait_for_room(need: dict[str, float], timeout_s: float, what: str,
                  progress_every_s: float = 30.0) -> dict[str, float]:
    """Block until one unit of `need` is free on the cluster; returns the free resources then.

    Prints a line while it waits; raises NoRoomError after `timeout_s` naming what was asked,
    what is free and what holds the rest.
    """
    start = last = time.monotonic()
    while True:
        free = ray.available_resources()
        if fits(need, free) >= 1:
            return free
        now = time.monotonic()
        if now - start >= timeout_s:
            raise NoRoomError(room_report(need, what, f"nothing could be scheduled for {timeout_s:g} s "
                                                      "(job.schedule_timeout_s)"))
        if now - last >= progress_every_s:
            print(f"waiting for room: {room_report(need, what, f'{now - start:.0f} s so far')}", flush=True)
            last = now
        time.sleep(POLL_S)


def room_report(need: dict[str, float], what: str, why: str) -> str:
    """One paragraph: what was asked, what is free of the total, and what holds it."""
    total, free = ray.cluster_resources(), ray.available_resources()
    lines = [f"{what} needs {_fmt(need)}: {why}.",
             "  free now: " + ", ".join(f"{k} {free.get(k, 0.0):g} of {total.get(k, 0.0):g}" for k in need)]
    holders = resource_holders(need)
    if holders:
        lines.append("  held by: " + "; ".join(holders))
    lines.append("  Free room (e.g. `serve shutdown`, or scale the app down), add nodes, or lower "
                 "job.cpus_per_trainer.")
    return "\n".join(lines)


def resource_holders(need: dict[str, float], limit: int = 8) -> list[str]:
    """Live actors that hold any of the resources in `need` (best effort: needs Ray's state API)."""
    from ray.util.state import list_actors  # noqa: PLC0415

    # The state API resolves its server from RAY_API_SERVER_ADDRESS, then RAY_ADDRESS, before the
    # address it is given; point it at this job's own cluster for the one call.
    saved = os.environ.get("RAY_API_SERVER_ADDRESS")
    os.environ["RAY_API_SERVER_ADDRESS"] = ray.get_runtime_context().gcs_address
    try:
        actors = list_actors(filters=[("state", "=", "ALIVE")], detail=True, limit=1000,
                             raise_on_missing_output=False)
    except Exception:  # noqa: BLE001  (no dashboard: the totals above still say how much is held)
        return []
    finally:
        if saved is None:
            os.environ.pop("RAY_API_SERVER_ADDRESS", None)
        else:
            os.environ["RAY_API_SERVER_ADDRESS"] = saved
    held: Counter = Counter()
    for a in actors:
        res = {k: v for k, v in (a.required_resources or {}).items() if k in need and v > 0}
        if res:
            held[f"{a.class_name} ({_fmt(res)})"] += 1
    return [f"{n} x {name}" if n > 1 else name for name, n in held.most_common(limit)]


def _fmt(res: dict[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in res.items())
