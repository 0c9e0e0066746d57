"""Evaluate trained subjects: DINO, CLIP-I and CLIP-T (supplement C), the paper's Tables 1 and 3.

    python -m jobs.evaluate --config configs/paper.yaml [--set k=v ...] [--methods comfusion dreambooth]
    python -m jobs.evaluate --config configs/demo.yaml --checkpoint path/to/ckpt [LABEL=path/to/ckpt ...]

Each trained (subject, method) is found in MLflow (the latest FINISHED run of experiment
`job.name` tagged `subject` and `method`; its `checkpoint` artifacts are downloaded under
`<job.storage>/eval-checkpoints/`) or given as checkpoint folders (`LABEL=DIR` names the table
row, e.g. an ablation). For each subject, `eval.images_per_prompt` images are sampled per
prompt of the "specific" set (the subject's scenes, the paper's 15 by default) and/or the
"unseen" set (the 25 DreamBooth prompts), image j of prompt i from seed (eval.seed, i, j) for
every method. A Ray Data actor pool does the work: each actor loads the base model and the
judges once, swaps subject weights in place and calls the shared `sample`, then embeds the
images. The driver embeds the real photos and the prompts, scores, logs `eval/...` metrics
and sample grids to each subject's run, writes scores.csv, table.md and scores.png to
`eval.out` (or --out), logs them to an `evaluation` run, and prints the table.
Exit status: 0 when everything asked for was evaluated, 1 when something was missing or failed
(the rest is still reported), 2 for a bad config or command line.
"""
from __future__ import annotations

import argparse
import io
import math
import os
import shutil
import sys
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from PIL import Image

if __package__ in (None, ""):  # run as a script (python jobs/evaluate.py): make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# ruff: noqa: E402  (the project imports follow the path fix above)

from comfusion.checkpoint import CheckpointError, SubjectMeta, load_subject_weights_, verify_checkpoint
from comfusion.config import ConfigError, JobConfig, flatten, load_config
from comfusion.data import ImageError, load_image
from comfusion.metrics import (EvalPrompt, ImageEmbeddings, Scorer, eval_seed, evaluation_plan, image_scores,
                               real_images_scores, slug)
from comfusion.models import ModelNotFoundError, load_base
from comfusion.sampling import default_dtype, image_grid, png_bytes, sample
from jobs.eval_report import ALL, REAL, REAL_SET, summary_tables, write_report

GRID_IMAGES = 4  # images per prompt in the sample grids
THUMB = 128  # grid thumbnails: at most this many pixels a side
Progress = Callable[[str], None]


class EvalError(RuntimeError):
    """Something needed for one (subject, method) is missing; the others still run."""


def say(msg: str) -> None:
    print(f"[evaluate] {msg}", flush=True)


@dataclass(frozen=True)
class Target:
    """One trained (subject, method) to evaluate, with the real photos it is scored against."""

    subject: str
    method: str  # the table row: the method, or the label given with --checkpoint LABEL=DIR
    checkpoint: str  # verified local checkpoint folder
    identifier: str
    class_noun: str
    photos: tuple[str, ...]  # the subject's real photos (DINO / CLIP-I references)
    scenes: tuple[str, ...]  # the "specific" prompt set
    run_id: str | None = None  # the subject's MLflow run, when found through MLflow

    @property
    def name(self) -> str:
        return f"{self.subject}/{self.method}"


# ---------------------------------------------------------------------------------------
# finding what to evaluate


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"


def _subject_entry(cfg: JobConfig, meta: SubjectMeta) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(photos, scenes) of the subject: from the config's manifest, else the one stored at training."""
    for s in cfg.data.subjects:
        if s.id == meta.id:
            return tuple(s.images), tuple(s.scenes or cfg.data.scenes)
    data = meta.config.get("data", {}) if isinstance(meta.config, dict) else {}
    for s in data.get("subjects") or []:
        if isinstance(s, dict) and s.get("id") == meta.id and s.get("images"):
            return tuple(s["images"]), tuple(s.get("scenes") or data.get("scenes") or cfg.data.scenes)
    raise EvalError(f"subject {meta.id!r}: no real photos; add it to data.subjects of the config")


def make_target(cfg: JobConfig, folder: str | Path, label: str | None = None, run_id: str | None = None) -> Target:
    """A verified checkpoint folder -> Target; EvalError (or CheckpointError) says why not."""
    meta = verify_checkpoint(folder)
    if meta.base_model != cfg.model.base:
        raise EvalError(f"checkpoint {folder} was trained from base {meta.base_model!r}, the config evaluates "
                        f"{cfg.model.base!r} (set --set model.base=...)")
    photos, scenes = _subject_entry(cfg, meta)
    return Target(meta.id, label or meta.method, str(folder), meta.identifier, meta.class_noun, photos, scenes,
                  run_id)


def folder_targets(cfg: JobConfig, specs: list[str]) -> tuple[list[Target], list[str]]:
    """Targets from `DIR` or `LABEL=DIR` arguments, and the problems of those that failed."""
    targets, problems = [], []
    for spec in specs:
        label, folder = (spec.split("=", 1) if "=" in spec and not Path(spec).exists() else (None, spec))
        try:
            targets.append(make_target(cfg, folder, label))
        except (EvalError, CheckpointError) as e:
            problems.append(str(e))
    return targets, problems


def latest_finished_runs(client, experiment_id: str) -> dict[tuple[str, str], object]:
    """(subject, method) -> the latest FINISHED run tagged with both."""
    runs, token = {}, None
    while True:
        page = client.search_runs([experiment_id], "attributes.status = 'FINISHED'",
                                  order_by=["attributes.start_time DESC"], max_results=500, page_token=token)
        for run in page:
            key = (run.data.tags.get("subject"), run.data.tags.get("method"))
            if all(key) and key not in runs:
                runs[key] = run
        token = page.token
        if not token:
            return runs


def fetch_checkpoint(client, run_id: str, root: Path) -> Path:
    """The run's `checkpoint` artifacts in `root/<run_id>/checkpoint`, downloaded once, verified."""
    folder = root / run_id / "checkpoint"
    if folder.is_dir():
        try:
            verify_checkpoint(folder)
            return folder
        except CheckpointError:
            shutil.rmtree(folder)
    tmp = root / f".{run_id}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        local = Path(client.download_artifacts(run_id, "checkpoint", str(tmp)))
        verify_checkpoint(local)
        folder.parent.mkdir(parents=True, exist_ok=True)
        os.replace(local, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def mlflow_targets(client, cfg: JobConfig, methods: list[str]) -> tuple[list[Target], list[str]]:
    """Targets for every configured subject (every tagged subject when none) and method."""
    exp = client.get_experiment_by_name(cfg.job.name)
    if exp is None:
        return [], [f"no MLflow experiment named {cfg.job.name!r} at {tracking_uri()}"]
    runs = latest_finished_runs(client, exp.experiment_id)
    subjects = [s.id for s in cfg.data.subjects] or sorted({s for s, _ in runs})
    targets, problems = [], []
    for sid in subjects:
        for method in methods:
            run = runs.get((sid, method))
            if run is None:
                problems.append(f"{sid}/{method}: no FINISHED run in experiment {cfg.job.name!r}")
                continue
            try:
                folder = fetch_checkpoint(client, run.info.run_id, Path(cfg.job.storage) / "eval-checkpoints")
                targets.append(make_target(cfg, folder, method, run.info.run_id))
            except Exception as e:  # noqa: BLE001 - a missing artifact, a corrupt file: report, go on
                problems.append(f"{sid}/{method} (run {run.info.run_id}): {type(e).__name__}: {e}")
    return targets, problems


# ---------------------------------------------------------------------------------------
# generation: work items, the actor, the pipeline


def work_items(cfg: JobConfig, targets: list[Target], plans: list[list[EvalPrompt]]) -> list[dict]:
    """Sampler batches of `eval.batch_size` images, never mixing subjects (one weight swap each)."""
    items = []
    for t, (target, plan) in enumerate(zip(targets, plans)):
        images = [(p, j) for p in plan for j in range(cfg.eval.images_per_prompt)]
        for k in range(0, len(images), cfg.eval.batch_size):
            chunk = images[k:k + cfg.eval.batch_size]
            items.append({"target": t, "checkpoint": target.checkpoint,
                          "prompt_set": [p.prompt_set for p, _ in chunk], "prompt_index": [p.index for p, _ in chunk],
                          "image_index": [j for _, j in chunk], "prompt": [p.prompt for p, _ in chunk],
                          "seed": [eval_seed(cfg.eval.seed, p.index, j) for p, j in chunk]})
    return items


def thumbnail_png(image: np.ndarray, side: int = THUMB) -> bytes:
    """PNG of a (H, W, 3) image shrunk to at most `side` pixels a side (for the grids)."""
    img = Image.fromarray(image)
    if max(img.size) > side:
        img.thumbnail((side, side), Image.Resampling.LANCZOS)
    return png_bytes(np.asarray(img))


class EvalWorker:
    """Ray Data actor (also the plain loop): base model and judges loaded once; per work item,
    swap the subject's weights in place, sample, embed."""

    def __init__(self, cfg: JobConfig, device: str = "cpu", threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)  # as many threads as CPU slots held
        self.cfg = cfg
        self.components = load_base(cfg.model.base, revision=cfg.model.revision, seed=cfg.model.preset_seed,
                                    device=device, dtype=default_dtype(device))
        self.scorer = Scorer.load(cfg.eval.dino, cfg.eval.clip_judges, seed=cfg.model.preset_seed, device=device,
                                  batch_size=cfg.eval.batch_size)
        self.loaded: str | None = None  # checkpoint folder whose weights are in the components

    def process(self, item: dict) -> dict[str, np.ndarray]:
        """One work item -> one row per image: keys, DINO and CLIP embeddings, a grid thumbnail or b""."""
        folder = str(item["checkpoint"])
        if folder != self.loaded:
            load_subject_weights_(self.components, folder)
            self.loaded = folder
        s, res = self.cfg.sampler, self.cfg.model.resolution
        images = sample(self.components, [str(p) for p in item["prompt"]], [int(x) for x in item["seed"]],
                        steps=s.steps, guidance_scale=s.guidance_scale, height=res, width=res,
                        batch_size=self.cfg.eval.batch_size).images  # (B, H, W, 3) uint8
        emb = self.scorer.embed_images(images)
        n = len(images)
        row = {"target": np.full(n, int(item["target"]), dtype=np.int64),
               "prompt_set": np.array([str(x) for x in item["prompt_set"]]),
               "prompt_index": np.asarray(item["prompt_index"], dtype=np.int64),
               "image_index": np.asarray(item["image_index"], dtype=np.int64),
               "dino": emb.dino.numpy(),
               "thumb": np.array([thumbnail_png(im) if int(j) < GRID_IMAGES else b""
                                  for im, j in zip(images, item["image_index"])], dtype=object)}
        row.update({f"clip_{k}": emb.clip[name].numpy() for k, name in enumerate(self.scorer.clip_names)})
        return row

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [self.process({k: v[i] for k, v in batch.items()}) for i in range(len(batch["target"]))]
        return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}


def _actor_options(cfg: JobConfig, n_items: int) -> dict:
    """Pool size and resources: one GPU per actor where there are GPUs, else `job.cpus_per_trainer` CPUs."""
    import ray  # noqa: PLC0415

    res = ray.cluster_resources()
    gpus = int(res.get("GPU", 0))
    if cfg.job.use_gpu == "yes" or (cfg.job.use_gpu == "auto" and gpus > 0):
        if gpus < 1:
            raise ConfigError("job.use_gpu", "is 'yes' but the Ray cluster has no GPU")
        return dict(num_gpus=1, size=max(1, min(gpus, n_items)), device="cuda", threads=None)
    per, cpus = cfg.job.cpus_per_trainer, res.get("CPU", 1)
    if per > cpus:
        raise ConfigError("job.cpus_per_trainer", f"{per} CPUs per evaluation actor, but the cluster has {cpus}")
    return dict(num_cpus=per, size=max(1, min(int(cpus // per), n_items)), device="cpu", threads=max(1, int(per)))


def generate_ray(cfg: JobConfig, items: list[dict]) -> Iterable[dict]:
    """The work items through a Ray Data actor pool; yields batches of per-image rows."""
    import ray  # noqa: PLC0415

    if not ray.is_initialized():
        ray.init()
    opts = _actor_options(cfg, len(items))
    device, threads, size = opts.pop("device"), opts.pop("threads"), opts.pop("size")
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        EvalWorker, batch_size=1, batch_format="numpy",  # one row = one sampler batch of one subject
        fn_constructor_kwargs=dict(cfg=cfg, device=device, threads=threads),
        compute=ray.data.ActorPoolStrategy(size=size), **opts)
    yield from ds.iter_batches(batch_size=None, batch_format="numpy")


def generate_plain(cfg: JobConfig, items: list[dict], worker: EvalWorker | None = None) -> Iterable[dict]:
    """The same work in this process, one item after another (no Ray)."""
    worker = worker or EvalWorker(cfg, device="cuda" if torch.cuda.is_available() else "cpu")
    for item in items:
        yield worker.process(item)


# ---------------------------------------------------------------------------------------
# collecting and scoring


@dataclass
class Generated:
    """What came back for one target, in (prompt set, prompt index, image index) order."""

    keys: list[tuple[str, int, int]] = field(default_factory=list)
    embeddings: ImageEmbeddings | None = None
    thumbs: dict[tuple[str, int, int], bytes] = field(default_factory=dict)


def collect(batches: Iterable[dict], clip_names: list[str], total: int, progress: Progress | None = say
            ) -> dict[int, Generated]:
    """Gather the per-image rows by target, sorted, so the scores do not depend on arrival order."""
    parts: dict[int, list] = defaultdict(list)
    done, next_report, t0 = 0, 0.0, time.perf_counter()
    for batch in batches:
        for i in range(len(batch["target"])):
            key = (str(batch["prompt_set"][i]), int(batch["prompt_index"][i]), int(batch["image_index"][i]))
            clips = {name: batch[f"clip_{k}"][i] for k, name in enumerate(clip_names)}
            parts[int(batch["target"][i])].append((key, batch["dino"][i], clips, bytes(batch["thumb"][i])))
        done += len(batch["target"])
        if progress and (done / total >= next_report or done == total):
            progress(f"generated and embedded {done}/{total} images ({time.perf_counter() - t0:.0f} s)")
            next_report = done / total + 0.1
    out = {}
    for t, rows in parts.items():
        rows.sort(key=lambda r: r[0])
        emb = ImageEmbeddings(torch.from_numpy(np.stack([r[1] for r in rows])),
                              {n: torch.from_numpy(np.stack([r[2][n] for r in rows])) for n in clip_names})
        out[t] = Generated([r[0] for r in rows], emb, {r[0]: r[3] for r in rows if r[3]})
    return out


def _row(target_or_subject, method, prompt_set, prompt, scene, score) -> dict:
    return dict(subject=target_or_subject, method=method, prompt_set=prompt_set, prompt=prompt, scene=scene,
                judge=score.judge, metric=score.metric, value=score.value)


def score_target(target: Target, plan: list[EvalPrompt], gen: Generated, real: ImageEmbeddings,
                 texts: dict[str, dict[str, torch.Tensor]], dino_judge: str) -> list[dict]:
    """Per-prompt and per-set (`ALL`) scores of one target. `texts`: CLIP-T text -> judge -> (1, P)."""
    by_key = {p.prompt_set + "\x00" + str(p.index): p for p in plan}
    prompts = [by_key[f"{s}\x00{i}"] for s, i, _ in gen.keys]  # the prompt of each image
    rows = []
    for prompt_set in dict.fromkeys(p.prompt_set for p in plan):
        for p in [p for p in plan if p.prompt_set == prompt_set]:
            idx = [k for k, q in enumerate(prompts) if q is p]
            for sc in image_scores(gen.embeddings.select(idx), real, texts[p.text], dino_judge):
                rows.append(_row(target.subject, target.method, prompt_set, p.prompt, p.scene, sc))
        idx = [k for k, q in enumerate(prompts) if q.prompt_set == prompt_set]
        per_image = {j: torch.cat([texts[prompts[k].text][j] for k in idx]) for j in real.clip}  # (N, P)
        rows += [_row(target.subject, target.method, prompt_set, ALL, "", sc)
                 for sc in image_scores(gen.embeddings.select(idx), real, per_image, dino_judge)]
    return rows


def embed_references(cfg: JobConfig, targets: list[Target], plans: list[list[EvalPrompt]],
                     progress: Progress | None = say) -> tuple[dict, dict, list[dict]]:
    """Real-photo embeddings per subject, CLIP text embeddings per CLIP-T text, and the Real Images rows."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    scorer = Scorer.load(cfg.eval.dino, cfg.eval.clip_judges, seed=cfg.model.preset_seed, device=device,
                         batch_size=cfg.eval.batch_size)
    real, rows = {}, []
    for t in targets:
        if t.subject in real:
            continue
        photos = [np.asarray(load_image(p, min_side=1, max_pixels=cfg.data.max_pixels)) for p in t.photos]
        real[t.subject] = scorer.embed_images(photos)
        ri = real_images_scores(real[t.subject], scorer.dino_name)
        if ri.reason and progress:
            progress(f"{t.subject}: no Real Images score: {ri.reason}")
        rows += [_row(t.subject, REAL, REAL_SET, ALL, "", sc) for sc in ri.scores if math.isfinite(sc.value)]
    texts_list = sorted({p.text for plan in plans for p in plan})
    emb = scorer.embed_texts(texts_list)
    texts = {text: {j: emb[j][i:i + 1] for j in emb} for i, text in enumerate(texts_list)}
    del scorer
    if device == "cuda":
        torch.cuda.empty_cache()  # the actors may share this GPU
    return real, texts, rows


# ---------------------------------------------------------------------------------------
# grids and MLflow


def sample_grids(targets: list[Target], plans: list[list[EvalPrompt]], generated: dict[int, Generated],
                 out: Path) -> dict[int, dict[str, Path]]:
    """One PNG per (target, prompt set): a row per prompt, its first GRID_IMAGES images."""
    grids: dict[int, dict[str, Path]] = defaultdict(dict)
    for t, (target, plan) in enumerate(zip(targets, plans)):
        gen = generated.get(t)
        for prompt_set in dict.fromkeys(p.prompt_set for p in plan):
            rows = [[np.asarray(Image.open(io.BytesIO(gen.thumbs[(prompt_set, p.index, j)])))
                     for j in range(GRID_IMAGES) if (prompt_set, p.index, j) in gen.thumbs]
                    for p in plan if p.prompt_set == prompt_set] if gen else []
            cols = max((len(r) for r in rows), default=0)
            if not cols:
                continue
            blank = np.zeros_like(rows[0][0])
            tiles = np.stack([im for r in rows for im in r + [blank] * (cols - len(r))])
            path = out / "grids" / f"{slug(target.subject)}--{slug(target.method)}--{prompt_set}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image_grid(tiles, cols)).save(path)
            grids[t][prompt_set] = path
    return grids


def judge_slug(name: str) -> str:
    """'openai/clip-vit-large-patch14' -> 'clip-vit-large-patch14' (a metric-key part)."""
    return slug(Path(name.rstrip("/")).name or name)


def metric_key(row: dict, first_set: str, first_clip: str) -> str | None:
    """The MLflow key of a score row, or None for rows not logged as run metrics (per-prompt DINO / CLIP-I).

    eval/dino, eval/clip_i, eval/clip_t: first prompt set, first CLIP judge; other judges
    eval/<judge-slug>/clip_i; other sets eval/<set>/...; per scene eval/clip_t/<scene-slug>.
    """
    parts = ["eval"] + ([row["prompt_set"]] if row["prompt_set"] != first_set else [])
    if row["metric"] != "dino" and row["judge"] != first_clip:
        parts.append(judge_slug(row["judge"]))
    parts.append(row["metric"])
    if row["prompt"] != ALL:
        if row["metric"] != "clip_t":
            return None
        parts.append(slug(row["scene"]))
    return "/".join(parts)


def log_to_subject_runs(client, cfg: JobConfig, targets: list[Target], rows: list[dict],
                        grids: dict[int, dict[str, Path]]) -> int:
    """`eval/...` metrics and the sample grids into each target's own run; returns runs logged."""
    from mlflow.entities import Metric  # noqa: PLC0415

    now, logged = int(time.time() * 1000), 0
    for t, target in enumerate(targets):
        if target.run_id is None:
            continue
        mine = [r for r in rows if r["subject"] == target.subject and r["method"] == target.method]
        keys = {metric_key(r, cfg.eval.prompt_sets[0], cfg.eval.clip_judges[0]): r["value"] for r in mine}
        metrics = [Metric(k, float(v), now, 0) for k, v in keys.items() if k and math.isfinite(v)]
        for k in range(0, len(metrics), 500):  # MLflow's batch limit is 1000 metrics
            client.log_batch(target.run_id, metrics=metrics[k:k + 500])
        for prompt_set, path in grids.get(t, {}).items():
            client.log_image(target.run_id, np.asarray(Image.open(path)), artifact_file=f"eval/{prompt_set}.png")
        logged += 1
    return logged


def log_evaluation_run(client, cfg: JobConfig, rows: list[dict], paths: dict, out: Path,
                       methods: list[str]) -> str:
    """An `evaluation` run in experiment `job.name`: the eval settings, the table cells, the report files."""
    from mlflow.entities import Metric, Param  # noqa: PLC0415

    exp = client.get_experiment_by_name(cfg.job.name)
    exp_id = exp.experiment_id if exp else client.create_experiment(cfg.job.name)
    run = client.create_run(exp_id, run_name="evaluation", tags={"kind": "evaluation"})
    rid, now = run.info.run_id, int(time.time() * 1000)
    params = [Param(k, str(v)[:500]) for k, v in flatten(cfg).items() if k.split(".")[0] in ("eval", "sampler", "model")]
    metrics = [Metric(f"{t.prompt_set}/{judge_slug(t.clip_judge)}/{slug(r.label)}/{name}", v, now, 0)
               for t in summary_tables(rows, methods) for r in t.rows
               for name, v in (("dino", r.dino), ("clip_i", r.clip_i), ("clip_t", r.clip_t)) if math.isfinite(v)]
    client.log_batch(rid, metrics=metrics[:1000], params=params[:100])
    for path in paths.values():
        client.log_artifact(rid, str(path))
    if (out / "grids").is_dir():
        client.log_artifacts(rid, str(out / "grids"), "grids")
    client.set_terminated(rid)
    return rid


# ---------------------------------------------------------------------------------------
# the entry point


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="job config YAML (default: the built-in defaults)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted config override")
    ap.add_argument("--checkpoint", nargs="+", default=[], metavar="[LABEL=]DIR",
                    help="evaluate these checkpoint folders instead of looking runs up in MLflow")
    ap.add_argument("--methods", nargs="+", help="methods to look up in MLflow (default: job.methods)")
    ap.add_argument("--out", help="report folder (default: eval.out)")
    ap.add_argument("--max-prompts", type=int, help="only the first N prompts of each set (smoke runs)")
    ap.add_argument("--no-mlflow", action="store_true", help="with --checkpoint: log nothing to MLflow")
    ap.add_argument("--no-ray", action="store_true", help="generate in this process, without Ray")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        cfg = cfg.replace(**{"eval.out": args.out}) if args.out else cfg
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.no_mlflow and not args.checkpoint:
        print("error: --no-mlflow needs --checkpoint (runs are found through MLflow)", file=sys.stderr)
        return 2
    client = None
    if not args.no_mlflow:
        from mlflow import MlflowClient  # noqa: PLC0415

        client = MlflowClient(tracking_uri=tracking_uri())
    methods = args.methods or list(cfg.job.methods)
    targets, problems = (folder_targets(cfg, args.checkpoint) if args.checkpoint
                         else mlflow_targets(client, cfg, methods))
    for p in problems:
        say(f"skipped: {p}")
    if not targets:
        say("nothing to evaluate")
        return 1
    plans = [evaluation_plan(t.identifier, t.class_noun, cfg.eval.prompt_sets, t.scenes, args.max_prompts)
             for t in targets]
    n_images = sum(len(p) for p in plans) * cfg.eval.images_per_prompt
    say(f"{len(targets)} subject checkpoint(s): {', '.join(t.name for t in targets)}; {n_images} images; "
        f"DINO judge {cfg.eval.dino}; CLIP judges {', '.join(cfg.eval.clip_judges)}")
    try:
        real, texts, rows = embed_references(cfg, targets, plans)
        items = work_items(cfg, targets, plans)
        batches = generate_plain(cfg, items) if args.no_ray else generate_ray(cfg, items)
        clip_names = list(dict.fromkeys(cfg.eval.clip_judges))
        generated = collect(batches, clip_names, n_images)
    except (ModelNotFoundError, ImageError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1 if not isinstance(e, ConfigError) else 2
    for t, (target, plan) in enumerate(zip(targets, plans)):
        rows += score_target(target, plan, generated[t], real[target.subject], texts, cfg.eval.dino)
    out = Path(cfg.eval.out)
    order = list(dict.fromkeys(t.method for t in targets))
    paths, table = write_report(rows, out, order)
    grids = sample_grids(targets, plans, generated, out)
    if client is not None:
        n_runs = log_to_subject_runs(client, cfg, targets, rows, grids)
        rid = log_evaluation_run(client, cfg, rows, paths, out, order)
        say(f"logged eval metrics to {n_runs} subject run(s) and the report to run {rid} ({tracking_uri()})")
    say(f"wrote {', '.join(str(p) for p in paths.values())}")
    print(table)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
