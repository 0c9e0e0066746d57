"""Class-scene priors on Ray Data: one pipeline for every class a job needs.

The driver plans every class (all input is checked before anything starts), opens each
cache folder, and turns the missing indices into sampler batches (`prior_batches`, the
same groups the plain loop uses, so the pixels match it). One Ray Data pipeline maps the
batches through an actor pool that loads the base model once per actor and calls
`comfusion.sampling.sample`; the driver collects the rows per class and commits Parquet
shards through the `comfusion.priors` cache API. A class with nothing missing is reused
as is; when no class misses anything, no Ray Data work runs at all.
"""
from __future__ import annotations

import logging
import os
import time
from collections import defaultdict
from typing import Callable

import numpy as np
import ray
import torch

from comfusion.config import JobConfig, ModelConfig
from comfusion.priors import (SHARD_ROWS, PriorCache, PriorCacheError, PriorPlan, PriorReport,
                              commit_shard, missing_indices, open_cache, plan_priors, prior_batches,
                              sample_priors)
from jobs.resources import actor_pool


class PriorSampler:
    """Ray Data actor: the base model, loaded once; each call samples one batch of priors per row."""

    def __init__(self, model: ModelConfig, plans: dict[str, PriorPlan], batch_size: int,
                 device: str, threads: int | None):
        if threads:
            torch.set_num_threads(threads)  # as many threads as CPU slots held
        self.plans, self.batch_size = plans, batch_size
        from comfusion.models import load_base  # noqa: PLC0415 (diffusers: in the actors, not the driver)
        from comfusion.sampling import default_dtype  # noqa: PLC0415

        self.components = load_base(model.base, revision=model.revision, seed=model.preset_seed,
                                    device=device, dtype=default_dtype(device))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """{key, indices (one sampler batch each)} -> one row per image {key, index, png, latent}."""
        keys, indices, pngs, latents = [], [], [], []
        for key, group in zip(batch["key"], batch["indices"]):
            group = [int(i) for i in group]
            p, z = sample_priors(self.components, self.plans[str(key)], group, self.batch_size)
            keys += [str(key)] * len(group)
            indices += group
            pngs += p
            latents.append(z)  # (b, 4, h, w)
        return {"key": np.array(keys), "index": np.array(indices, dtype=np.int64),
                "png": np.array(pngs, dtype=object), "latent": np.concatenate(latents)}


class _Progress:
    """A line at most every `every_s` while priors are made: images done, rate, time left."""

    def __init__(self, total: int, every_s: float, say: Callable[[str], None] | None):
        self.total, self.every_s, self.say = total, every_s, say
        self.done, self.t0 = 0, time.monotonic()
        self.last = self.t0

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.say is None or (now - self.last < self.every_s and self.done < self.total):
            return
        self.last = now
        rate = self.done / max(now - self.t0, 1e-9)
        left = (self.total - self.done) / rate if rate > 0 else float("nan")
        self.say(f"priors: {self.done}/{self.total} images, {rate:.2f}/s, ~{left:.0f} s left")


def _run_pipeline(cfg: JobConfig, work: dict[str, tuple[PriorPlan, PriorCache, list[int]]],
                  cpus_per_actor: float | None, shard_rows: int,
                  progress: Callable[[str], None] | None = None) -> dict[str, int]:
    """Generate every missing prior in one Ray Data pipeline; returns images committed per key."""
    bs = cfg.sampler.batch_size
    items = [{"key": key, "indices": batch} for key, (_, _, missing) in work.items()
             for batch in prior_batches(missing, bs)]
    if not ray.is_initialized():
        ray.init()
    pool = actor_pool(cfg, len(items), "a prior actor", cpus_per_actor)
    plans = {key: plan for key, (plan, _, _) in work.items()}
    # A lost actor fails the pipeline; `make_priors` runs it once more for what is still missing,
    # keeping every shard already committed.
    ds = pool.map_batches(
        ray.data.from_items(items, override_num_blocks=len(items)), PriorSampler,
        batch_size=1, batch_format="numpy",  # one row = one sampler batch of bs prompts
        fn_constructor_kwargs=dict(model=cfg.model, plans=plans, batch_size=bs, device=pool.device,
                                   threads=pool.threads))
    # the job prints its own progress line (below); Ray Data's operator log every few seconds is noise
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    total = sum(len(missing) for _, _, missing in work.values())
    return _commit_stream(ds, {key: cache for key, (_, cache, _) in work.items()},
                          max(shard_rows, bs), _Progress(total, cfg.job.progress_every_s, progress))


def _commit_stream(ds: "ray.data.Dataset", caches: dict[str, PriorCache], shard_rows: int,
                   tally: _Progress | None = None) -> dict[str, int]:
    """Consume the pipeline on the driver, committing a shard per class every `shard_rows` rows."""
    buffers: dict[str, list] = defaultdict(list)  # key -> [(index, png, latent (4, h, w))]
    committed: dict[str, int] = defaultdict(int)

    def flush(key: str) -> None:
        rows = buffers.pop(key, [])
        if rows:
            commit_shard(caches[key], [r[0] for r in rows], [r[1] for r in rows], np.stack([r[2] for r in rows]))
            committed[key] += len(rows)

    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for key, index, png, z in zip(batch["key"], batch["index"], batch["png"], batch["latent"]):
                buffers[str(key)].append((int(index), bytes(png), z))
                if len(buffers[str(key)]) >= shard_rows:
                    flush(str(key))
            if tally is not None:
                tally.add(len(batch["key"]))
    finally:  # rows already made are kept even if the pipeline fails part way
        for key in list(buffers):
            flush(key)
    return committed


def _generate_missing(cfg: JobConfig, work: dict, cpus_per_actor: float | None, shard_rows: int,
                      progress: Callable[[str], None] | None, attempts: int = 2) -> dict[str, int]:
    """Run the pipeline for what is missing; a pipeline that fails part way (a lost actor, a
    node gone) is run once more for what is still missing. Committed shards are never redone."""
    made: dict[str, int] = defaultdict(int)
    for attempt in range(1, attempts + 1):
        todo = {key: (plan, cache, missing_indices(cache)) for key, (plan, cache, _) in work.items()}
        todo = {key: w for key, w in todo.items() if w[2]}
        if not todo:
            break
        try:
            for key, n in _run_pipeline(cfg, todo, cpus_per_actor, shard_rows, progress).items():
                made[key] += n
            break
        except ray.exceptions.RayError as e:
            if attempt == attempts:
                raise
            if progress:
                progress(f"priors: the pipeline failed ({type(e).__name__}); running it again for what is missing")
    return made


def make_priors(cfg: JobConfig, class_nouns: list[str], storage: str | os.PathLike, *,
                progress: Callable[[str], None] | None = print, cpus_per_actor: float | None = None,
                shard_rows: int = SHARD_ROWS, methods: list[str] | None = None,
                scenes: list[str] | tuple[str, ...] | None = None) -> dict:
    """Make sure every class in `class_nouns` has its complete prior set under `storage`.

    With `methods` (e.g. ["comfusion", "dreambooth"]) every (class, method) plan is made in the
    same pipeline and the reports are keyed by (class noun, method); without, by class noun
    for `cfg.method`. `scenes`: the subjects' scenes (default `data.scenes`; see `plan_priors`).

    All classes go through one Ray Data pipeline; only missing (or damaged) indices are
    generated. Returns a report per class noun: key, folder, generated and reused counts.
    Bad input (empty class noun, count outside 1..max_count, no scenes) raises before any
    folder is made or actor started.
    """
    if not isinstance(storage, (str, os.PathLike)) or not os.fspath(storage).strip():
        raise ValueError(f"storage must be a non-empty path, got {storage!r}")
    if isinstance(class_nouns, str):
        raise TypeError(f"class_nouns must be a list of class nouns, got the string {class_nouns!r}")
    nouns = list(dict.fromkeys(class_nouns))
    if methods is None:
        plans = {c: plan_priors(c, cfg, scenes) for c in nouns}  # validates every class first
    else:
        plans = {(c, m): plan_priors(c, cfg, scenes, method=m) for c in nouns for m in dict.fromkeys(methods)}
    work = {}
    for plan in plans.values():
        cache = open_cache(storage, plan)
        work[plan.key] = (plan, cache, missing_indices(cache))
    made = _generate_missing(cfg, work, cpus_per_actor, shard_rows, progress)
    reports = {}
    for noun, plan in plans.items():
        _, cache, missing = work[plan.key]
        left = missing_indices(cache)
        if left:
            raise PriorCacheError(f"priors for {noun!r}: {len(left)} still missing after generation")
        reports[noun] = PriorReport(plan.class_noun, plan.key, str(cache.folder), made.get(plan.key, 0),
                                    plan.count - len(missing), plan.scenes)
        if progress:
            progress(reports[noun].line())
    return reports

