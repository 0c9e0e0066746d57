"""Class-scene priors (Eq. 3): the plan, the Parquet cache, and the plain-loop generator.

A `PriorPlan` says which N images a class needs: image i is "a [class noun] [scene]" with
scene i % len(scenes) (balanced: 200 over 15 scenes gives 13 or 14 each) and a seed derived
from (seed, class noun, i) by sha256. Its `key` names the cache folder
`<storage>/priors/<key>/`, which holds

    plan.json              the plan (what the key hashes, in readable form)
    shard-<id>.parquet     rows {index, prompt, scene, seed, png, latent, latent_shape}
    manifest.json          the complete shards: file, indices, row count, sha256
    .lock                  flock guard of the manifest's read-modify-write

A shard is written under a temporary name and renamed into place, then added to the
manifest (itself written to a temporary file and renamed) under the lock, so two jobs
filling the same key never corrupt it. A shard that is missing, unreadable, of the wrong
row count or checksum is dropped when the cache is opened; its indices count as missing.

Images depend on which indices share a UNet batch (the kernels are not batch-invariant),
so both generators sample the same groups: `prior_batches` (index // batch_size).
`generate_missing` is the no-Ray path; `jobs/priors.py` runs the same groups on Ray Data.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from comfusion.config import ConfigError, JobConfig, SamplerConfig
from comfusion.fsutil import clean_stale, sha256_file, write_file_atomic
from comfusion.prompts import class_scene_text, class_text

FORMAT_VERSION = 1  # bump when prompts, seeds or the row layout change: old caches get new keys
KEY_CHARS = 16  # hex characters of the cache key
SHARD_ROWS = 64  # rows per Parquet shard (rounded up to whole sampler batches)

SCHEMA = pa.schema([
    ("index", pa.int32()),
    ("prompt", pa.string()),
    ("scene", pa.string()),
    ("seed", pa.int64()),
    ("png", pa.binary()),
    ("latent", pa.binary()),  # float32 bytes, C order, of shape `latent_shape`
    ("latent_shape", pa.list_(pa.int32())),
])


class PriorCacheError(RuntimeError):
    """A prior cache folder is incomplete, damaged or belongs to another plan."""


# ---------------------------------------------------------------------------------------
# the plan


def prior_seed(seed: int, class_noun: str, index: int) -> int:
    """Seed of prior `index`: sha256 of (seed, class noun, index), 63 bits (stable across runs)."""
    digest = hashlib.sha256(f"{seed}\x00{class_noun}\x00{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


@dataclass(frozen=True)
class PriorRow:
    """One planned prior image."""

    index: int
    prompt: str  # "a [class noun] [scene]"
    scene: str
    seed: int


@dataclass(frozen=True)
class PriorPlan:
    """The N class-scene priors of one class, and everything that decides their pixels."""

    class_noun: str
    scenes: tuple[str, ...]
    count: int  # N
    seed: int  # base seed of the per-image seeds
    base: str  # base model: preset, folder or hub id
    revision: str | None
    preset_seed: int  # seed of a preset's random weights
    steps: int  # DDIM steps
    guidance_scale: float
    resolution: int  # pixels of the square images

    def row(self, index: int) -> PriorRow:
        """Prior `index`: scene index % len(scenes), so scenes are balanced to within one image."""
        if not 0 <= index < self.count:
            raise IndexError(f"prior index {index} outside 0..{self.count - 1}")
        scene = self.scenes[index % len(self.scenes)]
        # DreamBooth's plan has the single scene "": its prompt is T^C = "a [class noun]" (Eq. 2).
        prompt = class_scene_text(self.class_noun, scene) if scene else class_text(self.class_noun)
        return PriorRow(index, prompt, scene,
                        prior_seed(self.seed, self.class_noun, index))

    def rows(self) -> list[PriorRow]:
        return [self.row(i) for i in range(self.count)]

    @property
    def key(self) -> str:
        """Short sha256 hex of every field (and the format version): the cache folder name."""
        text = json.dumps({"format": FORMAT_VERSION, **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:KEY_CHARS]

    def to_dict(self) -> dict:
        return {**asdict(self), "scenes": list(self.scenes)}

    @classmethod
    def from_dict(cls, values: dict) -> "PriorPlan":
        values = {k: v for k, v in values.items() if k not in ("key", "format")}
        return cls(**{**values, "scenes": tuple(values["scenes"])})


def prior_scenes(method: str, scenes: Sequence[str]) -> tuple[str, ...]:
    """The scenes a method's priors are made over: the subject's `scenes` for ComFusion (Eq. 3),
    the single empty scene for DreamBooth, whose priors are "a [class noun]" (Eq. 2)."""
    return ("",) if method == "dreambooth" else tuple(scenes)


def plan_priors(class_noun: str, cfg: JobConfig, scenes: Sequence[str] | None = None,
                method: str | None = None) -> PriorPlan:
    """The prior plan of `class_noun` under `cfg` for a subject whose scenes are `scenes` (default
    `data.scenes`), method default `cfg.method`; the plan's scenes are `prior_scenes(method, scenes)`.

    Refuses bad input before any work: an empty class noun (ValueError), no scenes, a count
    below 1 or above `priors.max_count` (ConfigError naming the key).
    """
    if not isinstance(class_noun, str) or not class_noun.strip():
        raise ValueError(f"class noun must be a non-empty string, got {class_noun!r}")
    method = method or cfg.method
    scenes = prior_scenes(method, cfg.data.scenes if scenes is None else scenes)
    if method == "dreambooth" and scenes == ("",):
        pass  # the class-only plan
    elif not scenes or not all(isinstance(s, str) and s.strip() for s in scenes):
        raise ConfigError("data.scenes", "needs at least one non-empty scene")
    p = cfg.priors
    if p.count < 1:
        raise ConfigError("priors.count", f"must be >= 1, got {p.count}")
    if p.count > p.max_count:
        raise ConfigError("priors.count", f"{p.count} is above the cap priors.max_count={p.max_count}")
    return PriorPlan(class_noun=class_noun.strip(), scenes=scenes, count=p.count, seed=p.seed,
                     base=cfg.model.base, revision=cfg.model.revision, preset_seed=cfg.model.preset_seed,
                     steps=cfg.sampler.steps, guidance_scale=float(cfg.sampler.guidance_scale),
                     resolution=cfg.model.resolution)


def prior_batches(indices: Sequence[int], batch_size: int) -> list[list[int]]:
    """Group indices into UNet batches by `index // batch_size`, whatever else is missing.

    Both generators use these groups, so an image comes out bit-identical whichever path
    (and whichever partial re-run) made it, on the same device and thread count.
    """
    groups: dict[int, list[int]] = {}
    for i in sorted(set(indices)):
        groups.setdefault(i // batch_size, []).append(i)
    return [groups[g] for g in sorted(groups)]


def sample_priors(components: dict, plan: PriorPlan, indices: Sequence[int],
                  batch_size: int) -> tuple[list[bytes], np.ndarray]:
    """PNG bytes and float32 latents (B, 4, h, w) of the priors `indices`, via `sampling.sample`."""
    rows = [plan.row(i) for i in indices]
    from comfusion.sampling import png_bytes, sample  # noqa: PLC0415 (diffusers: only where priors are made)

    out = sample(components, [r.prompt for r in rows], [r.seed for r in rows], steps=plan.steps,
                 guidance_scale=plan.guidance_scale, height=plan.resolution, width=plan.resolution,
                 batch_size=batch_size)
    return [png_bytes(im) for im in out.images], out.latents.numpy().astype(np.float32)


# ---------------------------------------------------------------------------------------
# the cache folder


@dataclass(frozen=True)
class ShardEntry:
    """A complete shard, as the manifest lists it."""

    file: str
    indices: tuple[int, ...]
    rows: int
    sha256: str


@dataclass(frozen=True)
class PriorCache:
    """An opened cache folder `<storage>/priors/<key>/` of one plan."""

    folder: Path
    plan: PriorPlan


@dataclass(frozen=True)
class PriorReport:
    """What making a class's priors did."""

    class_noun: str
    key: str
    folder: str
    generated: int  # images made by this call
    reused: int  # images already in the cache
    scenes: tuple[str, ...] = ()  # the plan's scenes; ("",) is DreamBooth's class-only set

    def line(self) -> str:
        what = "class only" if self.scenes == ("",) else f"{len(self.scenes)} scenes"
        return (f"priors for '{self.class_noun}' ({what}): generated {self.generated}, reused {self.reused} "
                f"(key {self.key}, {self.folder})")


def cache_dir(storage: str | os.PathLike, plan: PriorPlan) -> Path:
    return Path(storage) / "priors" / plan.key


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Exclusive flock on `<folder>/.lock`: guards the manifest's read-modify-write."""
    with open(folder / ".lock", "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _read_manifest(folder: Path) -> list[ShardEntry]:
    path = folder / "manifest.json"
    try:
        shards = json.loads(path.read_text())["shards"]
    except FileNotFoundError:
        return []
    except (ValueError, KeyError, TypeError):  # damaged (it is only ever renamed into place whole):
        return []  # every index counts as missing and the next commit writes a fresh manifest
    return [ShardEntry(s["file"], tuple(s["indices"]), s["rows"], s["sha256"]) for s in shards]


def _write_manifest(folder: Path, entries: list[ShardEntry]) -> None:
    shards = [{**asdict(e), "indices": list(e.indices)} for e in entries]
    write_file_atomic(folder / "manifest.json", json.dumps({"shards": shards}, indent=1).encode())


def _shard_ok(folder: Path, entry: ShardEntry) -> bool:
    """True when the shard file exists, matches its checksum, and holds `rows` rows."""
    path = folder / entry.file
    try:
        if sha256_file(path) != entry.sha256:
            return False
        return pq.read_metadata(path).num_rows == entry.rows == len(entry.indices)
    except (OSError, pa.ArrowException):
        return False


def open_cache(storage: str | os.PathLike, plan: PriorPlan) -> PriorCache:
    """Create or open the cache folder of `plan`, dropping damaged shards from its manifest."""
    folder = cache_dir(storage, plan)
    folder.mkdir(parents=True, exist_ok=True)
    plan_path = folder / "plan.json"
    if plan_path.exists():
        stored = PriorPlan.from_dict(json.loads(plan_path.read_text()))
        if stored != plan:
            raise PriorCacheError(f"{folder} holds another plan than {plan} (key collision)")
    else:
        write_file_atomic(plan_path, json.dumps({"key": plan.key, "format": FORMAT_VERSION, **plan.to_dict()},
                                            indent=1).encode())
    clean_stale(folder)  # temporary files of writers that died
    cache = PriorCache(folder, plan)
    drop_damaged(cache)
    return cache


def drop_damaged(cache: PriorCache) -> list[ShardEntry]:
    """Remove damaged shards from the manifest (and disk); returns the dropped entries."""
    with _locked(cache.folder):
        entries = _read_manifest(cache.folder)
        bad = [e for e in entries if not _shard_ok(cache.folder, e)]
        if bad:
            _write_manifest(cache.folder, [e for e in entries if e not in bad])
            for e in bad:
                with contextlib.suppress(OSError):
                    os.unlink(cache.folder / e.file)
    return bad


def missing_indices(cache: PriorCache) -> list[int]:
    """The plan's indices in no shard of the manifest, ascending."""
    present = {i for e in _read_manifest(cache.folder) for i in e.indices}
    return [i for i in range(cache.plan.count) if i not in present]


def commit_shard(cache: PriorCache, indices: Sequence[int], pngs: Sequence[bytes],
                 latents: np.ndarray) -> ShardEntry:
    """Write the priors `indices` as one shard and add it to the manifest.

    latents: (B, 4, h, w) float32, row b belonging to `indices[b]`. Prompt, scene and seed
    come from the plan, so a shard always agrees with its key.
    """
    latents = np.ascontiguousarray(latents, dtype=np.float32)
    if not (len(indices) == len(pngs) == len(latents) > 0):
        raise ValueError(f"a shard needs matching non-empty rows: {len(indices)} indices, "
                         f"{len(pngs)} PNGs, {len(latents)} latents")
    rows = [cache.plan.row(int(i)) for i in indices]  # IndexError for an index outside the plan
    table = pa.table({
        "index": [r.index for r in rows], "prompt": [r.prompt for r in rows],
        "scene": [r.scene for r in rows], "seed": [r.seed for r in rows], "png": list(pngs),
        "latent": [z.tobytes() for z in latents], "latent_shape": [list(z.shape) for z in latents],
    }, schema=SCHEMA)
    name = f"shard-{uuid.uuid4().hex[:16]}.parquet"
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    data = buf.getvalue().to_pybytes()
    entry = ShardEntry(name, tuple(r.index for r in rows), len(rows), hashlib.sha256(data).hexdigest())
    write_file_atomic(cache.folder / name, data)  # on disk before the manifest names it
    with _locked(cache.folder):
        _write_manifest(cache.folder, _read_manifest(cache.folder) + [entry])
    return entry


# ---------------------------------------------------------------------------------------
# reading a complete set


@dataclass(frozen=True, eq=False)
class PriorSet:
    """All N priors of a plan, in index order: what the trainer reads."""

    plan: PriorPlan
    prompts: tuple[str, ...]
    scenes: tuple[str, ...]
    seeds: tuple[int, ...]
    latents: torch.Tensor  # (N, 4, h, w) float32, VAE-scaled
    pngs: tuple[bytes, ...]

    def __len__(self) -> int:
        return len(self.prompts)

    def image(self, index: int) -> np.ndarray:
        """Prior `index` decoded: (H, W, 3) uint8."""
        return np.asarray(Image.open(io.BytesIO(self.pngs[index])).convert("RGB"))


def read_priors(cache_dir: str | os.PathLike) -> PriorSet:
    """Read a complete cache folder; raises PriorCacheError if a shard is damaged or rows are missing."""
    folder = Path(cache_dir)
    if not (folder / "plan.json").exists():
        raise PriorCacheError(f"{folder} is not a prior cache (no plan.json)")
    plan = PriorPlan.from_dict(json.loads((folder / "plan.json").read_text()))
    by_index: dict[int, dict] = {}
    for entry in _read_manifest(folder):
        if not _shard_ok(folder, entry):
            raise PriorCacheError(f"shard {folder / entry.file} is damaged; re-run prior generation")
        for row in pq.read_table(folder / entry.file).to_pylist():
            by_index.setdefault(row["index"], row)  # two jobs may both have made an index: keep one
    missing = [i for i in range(plan.count) if i not in by_index]
    if missing:
        raise PriorCacheError(f"{folder}: {len(missing)} of {plan.count} priors missing "
                              f"(e.g. {missing[:5]}); re-run prior generation")
    rows = [by_index[i] for i in range(plan.count)]
    latents = np.stack([np.frombuffer(r["latent"], np.float32).reshape(r["latent_shape"]) for r in rows])
    return PriorSet(plan, tuple(r["prompt"] for r in rows), tuple(r["scene"] for r in rows),
                    tuple(r["seed"] for r in rows), torch.from_numpy(latents.copy()),  # (N, 4, h, w)
                    tuple(r["png"] for r in rows))


# ---------------------------------------------------------------------------------------
# the plain loop (no Ray)


def shard_groups(batches: list[list[int]], batch_size: int,
                 shard_rows: int = SHARD_ROWS) -> list[list[list[int]]]:
    """Consecutive sampler batches packed into shards of about `shard_rows` rows."""
    per_shard = max(1, -(-shard_rows // batch_size))  # whole batches per shard
    return [batches[i:i + per_shard] for i in range(0, len(batches), per_shard)]


def generate_missing(plan: PriorPlan, cache: PriorCache, components: dict, sampler_cfg: SamplerConfig,
                     progress: Callable[[str], None] | None = print, *,
                     shard_rows: int = SHARD_ROWS) -> PriorReport:
    """Generate the cache's missing priors in a plain loop over `prior_batches`, one shard at a time.

    `sampler_cfg` gives the batch size; its steps and guidance must be the plan's.
    """
    if (sampler_cfg.steps, float(sampler_cfg.guidance_scale)) != (plan.steps, plan.guidance_scale):
        raise ValueError(f"sampler steps/guidance {sampler_cfg.steps}/{sampler_cfg.guidance_scale} differ "
                         f"from the plan's {plan.steps}/{plan.guidance_scale}")
    if cache.plan != plan:
        raise ValueError("the cache was opened for another plan")
    missing = missing_indices(cache)
    bs = sampler_cfg.batch_size
    done = 0
    for shard in shard_groups(prior_batches(missing, bs), bs, shard_rows):
        pngs, latents = [], []
        for batch in shard:
            p, z = sample_priors(components, plan, batch, bs)  # z: (b, 4, h, w)
            pngs += p
            latents.append(z)
        indices = [i for batch in shard for i in batch]
        commit_shard(cache, indices, pngs, np.concatenate(latents))
        done += len(indices)
        if progress:
            progress(f"priors for '{plan.class_noun}': {done}/{len(missing)} generated")
    report = PriorReport(plan.class_noun, plan.key, str(cache.folder), done, plan.count - len(missing),
                         plan.scenes)
    if progress:
        progress(report.line())
    return report


def ensure_priors(class_noun: str, cfg: JobConfig, storage: str | os.PathLike, *,
                  components: dict | None = None, device: str = "cpu",
                  progress: Callable[[str], None] | None = print, method: str | None = None,
                  scenes: Sequence[str] | None = None) -> PriorReport:
    """Plan, open and complete one class's priors without Ray (base model loaded only if needed);
    `scenes`: the subject's (default `data.scenes`)."""
    plan = plan_priors(class_noun, cfg, scenes=scenes, method=method)
    cache = open_cache(storage, plan)
    if components is None and missing_indices(cache):
        from comfusion.models import load_base  # noqa: PLC0415  (only when something is missing)
        from comfusion.sampling import default_dtype  # noqa: PLC0415

        components = load_base(cfg.model.base, revision=cfg.model.revision, seed=cfg.model.preset_seed,
                               device=device, dtype=default_dtype(device))
    return generate_missing(plan, cache, components, cfg.sampler, progress)
