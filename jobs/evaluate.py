"""Evaluate trained subjects: DINO, CLIP-I and CLIP-T (supplement C), the paper's Tables 1 and 3.

    python -m jobs.evaluate --config configs/paper.yaml [--set k=v ...] [--methods comfusion dreambooth]
    python -m jobs.evaluate --config configs/demo.yaml --checkpoint path/to/ckpt [LABEL=path/to/ckpt ...]

Each trained (subject, method) is found in MLflow (the latest FINISHED run of experiment
`job.name` tagged `subject` and `method`; its `checkpoint` artifacts are read in place from a
local artifact store, else downloaded under `<job.storage>/eval-checkpoints/`) or given as checkpoint folders (`LABEL=DIR` names the table
row, e.g. an ablation). For each subject, `eval.images_per_prompt` images are sampled per
prompt of the "specific" set (the subject's scenes, the paper's 15 by default) and/or the
"unseen" set (the 25 DreamBooth prompts), image j of prompt i from seed (eval.seed, i, j) for
every method. A Ray Data actor pool does the work: each actor loads the base model and the
judges once, swaps subject weights in place and calls the shared `sample`, then embeds the
images. The driver embeds the real photos and the prompts, scores, logs `eval/...` metrics
and sample grids to each subject's run, writes scores.csv, table.md and scores.png to
`eval.out` (or --out), logs them to an `evaluation` run, and prints the table. MLflow is the
training job's backend: `MLFLOW_TRACKING_URI`, else `<job.storage>/mlflow.db` (`comfusion.registry.tracking_uri`).
Exit status: 0 when everything asked for was evaluated, 1 when something was missing or failed
(the rest is still reported), 2 for a bad config or command line.
"""
from __future__ import annotations

import argparse
import sys
import time
import urllib.parse
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from PIL import Image

if __package__ in (None, ""):  # run as a script (python jobs/evaluate.py): make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# ruff: noqa: E402  (the project imports follow the path fix above)

from comfusion.checkpoint import CheckpointError, SubjectMeta, verify_checkpoint
from comfusion.config import ConfigError, JobConfig, load_config
from comfusion.data import ImageError, subject_scenes
from comfusion.fsutil import publish_dir, scratch_dir
from comfusion.lora import SubjectSlot
from comfusion.metrics import EvalPrompt, ImageEmbeddings, Scorer, eval_seed, evaluation_plan
from comfusion.models import ModelNotFoundError, load_base
from comfusion.registry import CHECKPOINT_ARTIFACT, tracking_uri
from comfusion.sampling import default_device, default_dtype, png_bytes, sample
from jobs.eval_report import (GRID_IMAGES, Generated, embed_references, log_evaluation_run, log_to_subject_runs,
                               sample_grids, score_target, write_report)
from jobs.eval_targets import Target

THUMB = 128  # grid thumbnails: at most this many pixels a side
ITEM_BATCHES = 16  # sampler batches per work item: 256 images at eval.batch_size 16
Progress = Callable[[str], None]


class EvalError(RuntimeError):
    """Something needed for one (subject, method) is missing; the others still run."""


def say(msg: str) -> None:
    """Progress output of the job."""
    print(f"[evaluate] {msg}", flush=True)


# ---------------------------------------------------------------------------------------
# finding what to evaluate


def _subject_entry(cfg: JobConfig, meta: SubjectMeta) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(photos, scenes) of the subject: from the config's manifest, else the one stored at training."""
    for s in cfg.data.subjects:
        if s.id == meta.id:
            return tuple(s.images), tuple(subject_scenes(s.scenes, cfg.data.scenes))
    data = meta.config.get("data", {}) if isinstance(meta.config, dict) else {}
    for s in data.get("subjects") or []:
        if isinstance(s, dict) and s.get("id") == meta.id and s.get("images"):
            return tuple(s["images"]), tuple(subject_scenes(s.get("scenes"), data.get("scenes") or cfg.data.scenes))
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


def local_artifact_dir(artifact_uri: str) -> Path | None:
    """The folder of a run's artifacts when the store is a local file system, else None."""
    parsed = urllib.parse.urlparse(artifact_uri)
    if parsed.scheme == "file":
        return Path(urllib.request.url2pathname(parsed.path))
    return Path(artifact_uri) if parsed.scheme == "" else None


def fetch_checkpoint(client, run, root: Path) -> Path:
    """The run's `checkpoint` artifacts as a local folder: read in place from a local artifact store
    (no copy of 2 GB per subject), else downloaded once to `root/<run_id>/checkpoint`."""
    local = local_artifact_dir(run.info.artifact_uri)
    if local is not None and (local / CHECKPOINT_ARTIFACT).is_dir():
        return local / CHECKPOINT_ARTIFACT  # verified by make_target
    run_id = run.info.run_id
    folder = root / run_id / CHECKPOINT_ARTIFACT
    if folder.is_dir():
        try:
            verify_checkpoint(folder)
            return folder
        except CheckpointError:
            pass  # a damaged copy: replaced below, in one step
    with scratch_dir(folder) as tmp:
        downloaded = Path(client.download_artifacts(run_id, CHECKPOINT_ARTIFACT, str(tmp)))
        verify_checkpoint(downloaded)
        publish_dir(downloaded, folder)
    return folder


def mlflow_targets(client, cfg: JobConfig, methods: list[str]) -> tuple[list[Target], list[str]]:
    """Targets for every configured subject (every tagged subject when none) and method."""
    exp = client.get_experiment_by_name(cfg.job.name)
    if exp is None:
        return [], [f"no MLflow experiment named {cfg.job.name!r} at {tracking_uri(cfg.job.storage, cfg.job.tracking_uri)}"]
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
                folder = fetch_checkpoint(client, run, Path(cfg.job.storage) / "eval-checkpoints")
                targets.append(make_target(cfg, folder, method, run.info.run_id))
            except Exception as e:  # noqa: BLE001 - a missing artifact, a corrupt file: report, go on
                problems.append(f"{sid}/{method} (run {run.info.run_id}): {type(e).__name__}: {e}")
    return targets, problems


# ---------------------------------------------------------------------------------------
# generation: work items, the actor, the pipeline


def work_items(cfg: JobConfig, targets: list[Target], plans: list[list[EvalPrompt]],
               batches_per_item: int = ITEM_BATCHES) -> list[dict]:
    """Work items of up to `batches_per_item` sampler batches of `eval.batch_size` images, never
    mixing subjects: each item costs one weight swap (a 2 GB read and hash for SD 1.5), so items
    are large enough to bury it, and small enough to spread the subjects over the actors."""
    items, per_item = [], cfg.eval.batch_size * batches_per_item
    for t, (target, plan) in enumerate(zip(targets, plans)):
        images = [(p, j) for p in plan for j in range(cfg.eval.images_per_prompt)]
        for k in range(0, len(images), per_item):
            chunk = images[k:k + per_item]
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
                                  batch_size=cfg.eval.batch_size, heldout_dino=cfg.eval.heldout_dino)
        self.slot = SubjectSlot(self.components)  # full subjects swapped in place, LoRA ones as adapters

    def process(self, item: dict) -> dict[str, np.ndarray]:
        """One work item -> one row per image: keys, DINO and CLIP embeddings, a grid thumbnail or b""."""
        folder = str(item["checkpoint"])
        if folder != self.slot.current:
            self.slot.use_folder(folder)
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
        row.update({"dino_heldout": emb.heldout_dino[j].numpy() for j in emb.heldout_dino})  # at most one
        return row

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A Ray Data batch of work items -> the rows of all their images."""
        rows = [self.process({k: v[i] for k, v in batch.items()}) for i in range(len(batch["target"]))]
        return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}


def generate_ray(cfg: JobConfig, items: list[dict]) -> Iterable[dict]:
    """The work items through a Ray Data actor pool; yields batches of per-image rows."""
    import ray  # noqa: PLC0415

    if not ray.is_initialized():
        ray.init()
    from jobs.resources import actor_pool  # noqa: PLC0415

    pool = actor_pool(cfg, len(items), "an evaluation actor")
    ds = pool.map_batches(
        ray.data.from_items(items, override_num_blocks=len(items)), EvalWorker,
        batch_size=1, batch_format="numpy",  # one row = one work item of one subject
        fn_constructor_kwargs=dict(cfg=cfg, device=pool.device, threads=pool.threads))
    yield from ds.iter_batches(batch_size=None, batch_format="numpy")


def generate_plain(cfg: JobConfig, items: list[dict], worker: EvalWorker | None = None) -> Iterable[dict]:
    """The same work in this process, one item after another (no Ray)."""
    worker = worker or EvalWorker(cfg, device=default_device())
    for item in items:
        yield worker.process(item)


# ---------------------------------------------------------------------------------------
# collecting


HELDOUT_KEY = "\x00heldout-dino"  # never a CLIP judge's name


def collect(batches: Iterable[dict], clip_names: list[str], total: int, progress: Progress | None = say,
            heldout_dino: str = "") -> dict[int, Generated]:
    """Gather the per-image rows by target, sorted, so the scores do not depend on arrival order."""
    parts: dict[int, list] = defaultdict(list)
    done, next_report, t0 = 0, 0.0, time.perf_counter()
    for batch in batches:
        for i in range(len(batch["target"])):
            key = (str(batch["prompt_set"][i]), int(batch["prompt_index"][i]), int(batch["image_index"][i]))
            clips = {name: batch[f"clip_{k}"][i] for k, name in enumerate(clip_names)}
            if "dino_heldout" in batch:  # the held-out DINO (eval.heldout_dino) rides with the CLIP judges
                clips[HELDOUT_KEY] = batch["dino_heldout"][i]
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
        if heldout_dino and HELDOUT_KEY in rows[0][2]:
            emb.heldout_dino[heldout_dino] = torch.from_numpy(np.stack([r[2][HELDOUT_KEY] for r in rows]))
        out[t] = Generated([r[0] for r in rows], emb, {r[0]: r[3] for r in rows if r[3]})
    return out


# ---------------------------------------------------------------------------------------
# the entry point


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring, also printed by --help)."""
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
    """Find the checkpoints, generate and embed on Ray, score, report, log; returns the exit status."""
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

        client = MlflowClient(tracking_uri=tracking_uri(cfg.job.storage, cfg.job.tracking_uri))
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
        real, texts, rows = embed_references(cfg, targets, plans, progress=say)
        items = work_items(cfg, targets, plans)
        batches = generate_plain(cfg, items) if args.no_ray else generate_ray(cfg, items)
        clip_names = list(dict.fromkeys(cfg.eval.clip_judges))
        generated = collect(batches, clip_names, n_images, heldout_dino=cfg.eval.heldout_dino)
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
        say(f"logged eval metrics to {n_runs} subject run(s) and the report to run {rid} ({client.tracking_uri})")
    say(f"wrote {', '.join(str(p) for p in paths.values())}")
    print(table)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
