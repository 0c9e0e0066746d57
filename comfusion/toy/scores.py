"""Scores of generated toy-world pictures without the confounds issue 16 found, and their spread.

For one instance and pictures asked "in" each scene (S scenes x n images):

- exact judges (the renderer's own, never trained): `scene` = share of pictures whose background
  `world.scene_of` finds to be the asked one; `inst` = mean `world.instance_distance` to the
  instance (lower is closer); `both` = share with the asked scene and `inst` < BOTH_THRESHOLD;
  `inst|ok` = `inst` over the pictures whose scene is right only.
- neural judges, each a (DINO-role, CLIP) pair named like a model (`toy` = the judges the fusion
  losses train against; `toy-heldout` = judges trained with another seed and data order, which no
  loss uses): `<judge>/dino` and `<judge>/clip_i` compare each picture with references rendered
  *in its asked scene* (never the training photo, whose background is always PHOTO_SCENE), so a
  picture that redraws the photo's room gains nothing; `|ok` versions average over the pictures
  whose scene is right. `<judge>/clip_t` scores "a [class noun] [scene]". `<judge>/dino_photo`
  is the old, confounded score (against the instance's room photos, training photo included),
  kept to show what the confound did.

`paired_bootstrap` gives the 95% interval of a mean difference over paired units (instances).
"""
from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from comfusion.metrics import Scorer
from comfusion.prompts import class_scene_text
from comfusion.toy import world

TRAIN_JUDGES, HELDOUT_JUDGES = "toy", "toy-heldout"
BOTH_THRESHOLD = 1.6  # instance_distance below which a picture counts as the instance (90% of others lie above)
N_REFERENCES = 4  # references per asked scene
REFERENCE_VIEW_START = 80_000  # their view seeds: apart from the exact judge's (50_000+) and Real Images' (70_000+)


def scene_references(inst: world.Instance, scenes: Sequence[str], n: int = N_REFERENCES,
                     size: int = world.DEFAULT_SIZE) -> np.ndarray:
    """(S, n, H, W, 3) uint8: the instance rendered in each asked scene from n reference views."""
    return np.stack([np.stack([world.render(inst, s, REFERENCE_VIEW_START + i, size) for i in range(n)])
                     for s in scenes])


def _cos(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """(N, D), (M, D) -> (N, M) cosines as float64 numpy."""
    return (F.normalize(a.double(), dim=-1) @ F.normalize(b.double(), dim=-1).T).numpy()


def _masked_mean(values: np.ndarray, mask: np.ndarray) -> float:
    return float(values[mask].mean()) if mask.any() else math.nan


def exact_scores(images: np.ndarray, inst: world.Instance, scenes: Sequence[str]) -> tuple[dict, np.ndarray]:
    """The exact columns of (S, n, H, W, 3) pictures, and the (S*n,) mask of right scenes."""
    flat = images.reshape(-1, *images.shape[2:])
    asked = np.repeat(np.array(list(scenes)), images.shape[1])
    right = np.array([world.scene_of(im)[0] for im in flat]) == asked
    dist = np.array([world.instance_distance(im, inst) for im in flat])
    return {"scene": float(right.mean()), "inst": float(dist.mean()), "inst|ok": _masked_mean(dist, right),
            "both": float((right & (dist < BOTH_THRESHOLD)).mean())}, right


def judge_scores(scorer: Scorer, name: str, images: np.ndarray, inst: world.Instance, scenes: Sequence[str],
                 right: np.ndarray) -> dict[str, float]:
    """`<name>/...` columns of one (DINO, CLIP) judge pair for (S, n, H, W, 3) pictures."""
    s, n = images.shape[:2]
    size = images.shape[2]
    refs = scene_references(inst, scenes, size=size)  # (S, R, H, W, 3)
    r = refs.shape[1]
    clip = scorer.clip_names[0]
    gen = scorer.embed_images(images.reshape(s * n, *images.shape[2:]))
    ref = scorer.embed_images(refs.reshape(s * r, *refs.shape[2:]))
    own = np.repeat(np.arange(s), n)[:, None] == np.repeat(np.arange(s), r)[None]  # (S*n, S*r): same scene
    dino = np.where(own, _cos(gen.dino, ref.dino), 0).sum(1) / r  # (S*n,) mean over the asked scene's refs
    clip_i = np.where(own, _cos(gen.clip[clip], ref.clip[clip]), 0).sum(1) / r
    texts = scorer.clip_text_embed([class_scene_text(inst.class_noun, sc) for sc in scenes], clip)  # (S, P)
    clip_t = _cos(gen.clip[clip], texts)[np.arange(s * n), np.repeat(np.arange(s), n)]  # (S*n,): own scene's text
    photos = scorer.dino_embed(world.instance_photos(inst, N_REFERENCES, size))  # room photos, training photo first
    return {f"{name}/dino": float(dino.mean()), f"{name}/dino|ok": _masked_mean(dino, right),
            f"{name}/clip_i": float(clip_i.mean()), f"{name}/clip_i|ok": _masked_mean(clip_i, right),
            f"{name}/clip_t": float(clip_t.mean()), f"{name}/dino_photo": float(_cos(gen.dino, photos).mean())}


def score_images(scorers: dict[str, Scorer], images: np.ndarray, inst: world.Instance,
                 scenes: Sequence[str]) -> dict[str, float]:
    """Every column for one instance: the exact judges, then each named judge pair."""
    out, right = exact_scores(images, inst, scenes)
    for name, scorer in scorers.items():
        out.update(judge_scores(scorer, name, images, inst, scenes, right))
    return out


def load_scorers(names: Sequence[str] = (TRAIN_JUDGES, HELDOUT_JUDGES), batch_size: int = 64) -> dict[str, Scorer]:
    """A `Scorer` (one DINO, one CLIP) per judge name, e.g. "toy" and "toy-heldout"."""
    return {n: Scorer.load(n, [n], batch_size=batch_size) for n in names}


def paired_bootstrap(diffs: Sequence[float], n_boot: int = 4000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float, float]:
    """Mean of paired differences (one per unit, e.g. instance; NaN units dropped) and the
    percentile bootstrap interval of that mean: (mean, low, high). NaN if no unit is left."""
    d = np.asarray([x for x in diffs if np.isfinite(x)], dtype=np.float64)
    if len(d) == 0:
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(1)  # (n_boot,)
    tail = (1 - level) / 2 * 100
    return float(d.mean()), float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def frontier_gap(base: dict[tuple, np.ndarray], other: dict[tuple, np.ndarray], n_boot: int = 2000,
                 seed: int = 0, level: float = 0.95) -> tuple[float, float, float, int]:
    """How far `other`'s points lie above `base`'s frontier at equal x: (mean gap, low, high, points).

    Each dict maps a point (e.g. (lr, step)) to an (instances, 2) array of per-instance (x, y), the
    same instances in the same order everywhere (NaN allowed). On the means over instances, `base`'s
    points sorted by x make a piecewise-linear y(x); the gap is the mean of y - y_base(x) over
    `other`'s points whose x lies within `base`'s x range (no extrapolation). The interval resamples
    instances (the same resample for both), so it is paired like `paired_bootstrap`."""
    b, o = np.stack(list(base.values())), np.stack(list(other.values()))  # (P, I, 2)

    def gap(idx: np.ndarray) -> tuple[float, int]:
        with warnings.catch_warnings():  # an instance missing from a resample's points: NaN, dropped below
            warnings.simplefilter("ignore", RuntimeWarning)
            mb, mo = np.nanmean(b[:, idx], axis=1), np.nanmean(o[:, idx], axis=1)  # (P, 2)
        mb, mo = mb[np.isfinite(mb).all(1)], mo[np.isfinite(mo).all(1)]
        if len(mb) < 2:
            return math.nan, 0
        mb = mb[np.argsort(mb[:, 0])]
        inside = mo[(mo[:, 0] >= mb[0, 0]) & (mo[:, 0] <= mb[-1, 0])]
        if not len(inside):
            return math.nan, 0
        return float(np.mean(inside[:, 1] - np.interp(inside[:, 0], mb[:, 0], mb[:, 1]))), len(inside)

    n_inst = b.shape[1]
    mean, points = gap(np.arange(n_inst))
    rng = np.random.default_rng(seed)
    boots = np.array([gap(rng.integers(0, n_inst, n_inst))[0] for _ in range(n_boot)])
    boots = boots[np.isfinite(boots)]
    if not len(boots) or not math.isfinite(mean):
        return mean, math.nan, math.nan, points
    tail = (1 - level) / 2 * 100
    return mean, float(np.percentile(boots, tail)), float(np.percentile(boots, 100 - tail)), points
