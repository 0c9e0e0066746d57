"""The paper's claim measured inside the toy world: DreamBooth, ComFusion and the Table 3 ablations.

For several world instances that pretraining never saw (seeds from `world.HELD_OUT_SEED_START`),
one photo each on one background (`world.PHOTO_SCENE`), every method is trained with the same
budget (configs/toy_quality.yaml: steps, learning rate, priors) on the committed `toy` preset,
then samples "a sks [class noun] [scene]" for every scene of `data.scenes` from the same seeds.
It prints the paper's Table 1 layout with the toy judges, plus the world's exact judges:

  DINO     toy instance encoder: mean cosine of generated images to the instance's real photos
           (4 views on the photo background, the first being the training photo)
  CLIP-I   toy CLIP image tower, the same pairs
  CLIP-T   toy CLIP: generated image vs "a [class noun] [scene]" (T^CS: the toy CLIP never saw
           an identifier word, so the prompt's "sks" is left out of the text it scores)
  scene    exact: share of images whose background `world.scene_of` finds to be the asked scene
  inst     exact: mean `world.instance_distance` to the instance (lower is closer; own instance
           about 0.2 clean and 1.2 blurred, other instances of the class about 2.5)
  both     exact: share with the asked scene AND inst < 1.6 (90% of other instances lie above)

Rows besides the methods: "Real Images" are the instance rendered by the world in each asked
scene (what a perfect model would draw: the ceiling of every column), and "Base, colour named"
is the pretrained model, not finetuned, asked for "a [colour] [class noun] [scene]" (what the
base model knows without the photo). Whichever way the numbers come out is the finding.

    python benchmarks/toy_quality.py                       # default size (about 20-30 min, 2 cores)
    python benchmarks/toy_quality.py --instances 1 --steps 4 --scenes 2 --images-per-scene 1 \\
        --priors 4 --variants dreambooth comfusion         # seconds: checks it runs

Writes results.csv (one row per instance and row of the table), table.md, samples.png (one
instance: a column per scene, a row per table row) and results.json under --out.
"""
from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from comfusion.toy import world  # noqa: E402
from comfusion.config import VARIANTS, ConfigError, JobConfig, SubjectSpec, from_dict, load_config, to_dict  # noqa: E402
from comfusion.data import check_subject  # noqa: E402
from comfusion.metrics import Scorer, clip_i_score, clip_t_score, dino_score, eval_seed  # noqa: E402
from comfusion.prompts import DEFAULT_IDENTIFIER, class_scene_text, instance_scene_text  # noqa: E402

IDENTIFIER = DEFAULT_IDENTIFIER  # a reserved single token of the toy tokenizer, shared with no caption word
N_REFERENCE_PHOTOS = 4  # real photos of an instance the image metrics compare against
BOTH_THRESHOLD = 1.6  # instance_distance below which "both" counts the object as the instance
REAL, BASE = "real", "base"
LABELS = {REAL: "Real Images", BASE: "Base, colour named", **{k: label for k, label, _ in VARIANTS}}
COLUMNS = ("dino", "clip_i", "clip_t", "scene", "inst", "both")
HEADERS = ("DINO", "CLIP-I", "CLIP-T", "scene (exact)", "inst dist (exact)", "both (exact)")


def say(msg: str) -> None:
    print(f"[toy_quality {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------
# subjects: held-out instances, one photo each


def held_out_instances(n: int) -> list[world.Instance]:
    """`n` instances pretraining never saw, cycling through the class nouns."""
    return [world.make_instance(world.HELD_OUT_SEED_START + 100 + k, world.CLASS_NOUNS[k % len(world.CLASS_NOUNS)])
            for k in range(n)]


def subject_id(inst: world.Instance) -> str:
    return f"{inst.colour}-{inst.class_noun}-{inst.seed - world.HELD_OUT_SEED_START}"


def write_photos(instances: list[world.Instance], folder: Path, size: int) -> dict[str, list[str]]:
    """<folder>/<subject id>/<k>.png: the instance's real photos; the first is the training photo."""
    paths = {}
    for inst in instances:
        d = folder / subject_id(inst)
        d.mkdir(parents=True, exist_ok=True)
        paths[subject_id(inst)] = []
        for k, photo in enumerate(world.instance_photos(inst, N_REFERENCE_PHOTOS, size=size)):
            Image.fromarray(photo).save(d / f"{k}.png")
            paths[subject_id(inst)].append(str(d / f"{k}.png"))
    return paths


# ---------------------------------------------------------------------------------------
# the work items: priors per (class, plan), and train + sample per (instance, row)


@dataclass(frozen=True)
class Task:
    kind: str  # "priors", "train" (a VARIANTS row) or "base"
    cfg: dict  # the run's JobConfig as a dict (picklable across processes)
    class_noun: str
    key: str = ""  # the row key
    instance_seed: int = 0
    photo: str = ""


def _init_worker() -> None:
    torch.set_num_threads(1)  # one core per worker: the workers share the machine


def run_task(task: Task) -> dict:
    """Run one task; returns what the table needs (images, seconds, final loss terms)."""
    from comfusion.train import Priors, SubjectTrainer, obtain_priors  # noqa: PLC0415

    cfg = from_dict(task.cfg)
    t0 = time.perf_counter()
    if task.kind == "priors":
        from comfusion.priors import ensure_priors  # noqa: PLC0415

        ensure_priors(task.class_noun, cfg, cfg.job.storage, method=cfg.method, progress=None)
        return {"task": task, "seconds": time.perf_counter() - t0}
    inst = world.make_instance(task.instance_seed, task.class_noun)
    scenes = list(cfg.data.scenes)
    seeds = [eval_seed(cfg.eval.seed, s, i) for s in range(len(scenes)) for i in range(cfg.eval.images_per_prompt)]
    if task.kind == "base":
        from comfusion.models import load_base  # noqa: PLC0415

        components, terms, train_s = load_base(cfg.model.base), {}, 0.0
        prompts = [inst.caption(s) for s in scenes]  # "a [colour] [class noun] [scene]"
    else:
        spec = SubjectSpec(id=subject_id(inst), images=(task.photo,), class_noun=inst.class_noun,
                           identifier=IDENTIFIER, scenes=tuple(scenes))
        subject = check_subject(spec, cfg.data, cfg.model.resolution)
        found = obtain_priors(cfg, subject, device="cpu")  # from the cache the priors tasks filled
        trainer = SubjectTrainer(cfg, subject, Priors(found.latents, list(found.prompts), list(found.scenes)),
                                 device="cpu")
        terms = trainer.run()
        train_s = time.perf_counter() - t0
        components = trainer.components
        prompts = [instance_scene_text(IDENTIFIER, inst.class_noun, s) for s in scenes]
    from comfusion.sampling import sample  # noqa: PLC0415

    n = cfg.eval.images_per_prompt
    with torch.no_grad():
        out = sample(components, [p for p in prompts for _ in range(n)], seeds, steps=cfg.sampler.steps,
                     guidance_scale=cfg.sampler.guidance_scale, height=cfg.model.resolution,
                     width=cfg.model.resolution, batch_size=cfg.eval.batch_size)
    images = out.images.reshape(len(scenes), n, *out.images.shape[1:])  # (S, n, H, W, 3)
    return {"task": task, "images": images, "terms": terms, "train_seconds": train_s,
            "seconds": time.perf_counter() - t0}


def relative_cost(task: Task) -> int:
    """Rough cost of a train + sample task: UNet calls per step (1 + tau with the fusion stream)."""
    if task.kind != "train":
        return 0
    cfg = from_dict(task.cfg)
    fusion = cfg.method == "comfusion" and cfg.loss.fusion
    return 1 + (cfg.loss.tau if fusion else 0)


def real_images(inst: world.Instance, scenes: list[str], n: int, size: int) -> np.ndarray:
    """The world's own renders of the instance in each scene: (S, n, H, W, 3)."""
    return np.stack([np.stack([world.render(inst, s, 70_000 + i, size) for i in range(n)]) for s in scenes])


# ---------------------------------------------------------------------------------------
# scoring


def score(scorer: Scorer, images: np.ndarray, inst: world.Instance, scenes: list[str],
          reference: tuple[torch.Tensor, torch.Tensor], scene_texts: dict[str, torch.Tensor]) -> dict[str, float]:
    """The six columns for one instance and one row; images (S, n, H, W, 3); reference: the real
    photos' DINO and CLIP embeddings; scene_texts: CLIP text embedding (1, P) of each scene's T^CS."""
    s, n = images.shape[:2]
    flat = images.reshape(s * n, *images.shape[2:])
    ref_dino, ref_clip = reference
    gen = scorer.embed_images(flat)
    judge = scorer.clip_names[0]
    clip_t = np.mean([clip_t_score(gen.clip[judge][k * n:(k + 1) * n], scene_texts[sc]) for k, sc in enumerate(scenes)])
    found = [world.scene_of(im)[0] for im in flat]
    asked = [sc for sc in scenes for _ in range(n)]
    dist = np.array([world.instance_distance(im, inst) for im in flat])
    right = np.array([f == a for f, a in zip(found, asked)])
    return {"dino": dino_score(gen.dino, ref_dino), "clip_i": clip_i_score(gen.clip[judge], ref_clip),
            "clip_t": float(clip_t), "scene": float(right.mean()), "inst": float(dist.mean()),
            "both": float((right & (dist < BOTH_THRESHOLD)).mean())}


def table_markdown(rows: list[str], means: dict[str, dict[str, float]], seconds: dict[str, float]) -> str:
    lines = ["| Methods | " + " | ".join(HEADERS) + " | train s (x DB) |", "|---" * (len(HEADERS) + 2) + "|"]
    db = seconds.get("dreambooth")
    for key in rows:
        m = means[key]
        cells = [f"{m[c]:.3f}" for c in COLUMNS]
        t = seconds.get(key)
        timing = f"{t:.0f} ({t / db:.2f})" if t and db else "-"
        lines.append(f"| {LABELS[key]} | " + " | ".join(cells) + f" | {timing} |")
    return "\n".join(lines)


def samples_grid(images: dict[str, np.ndarray], rows: list[str], scale: int = 2) -> Image.Image:
    """One image per scene (columns) for each table row (rows) of one instance, upscaled, with
    the row labels on the left."""
    from PIL import ImageDraw  # noqa: PLC0415

    from comfusion.sampling import image_grid  # noqa: PLC0415

    stacked = np.concatenate([images[k][:, 0] for k in rows])  # (R*S, H, W, 3)
    grid = Image.fromarray(image_grid(stacked, cols=images[rows[0]].shape[0]))
    grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    margin, cell = 120, grid.height // len(rows)
    out = Image.new("RGB", (grid.width + margin, grid.height), (255, 255, 255))
    out.paste(grid, (margin, 0))
    draw = ImageDraw.Draw(out)
    for i, k in enumerate(rows):
        draw.text((4, i * cell + cell // 2 - 6), LABELS[k], fill=(0, 0, 0))
    return out


# ---------------------------------------------------------------------------------------
# the run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    keys = [k for k, _, _ in VARIANTS]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs" / "toy_quality.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, e.g. --set train.lr=1e-4 (repeatable)")
    ap.add_argument("--instances", type=int, default=5, help="held-out instances (one per class noun, cycling)")
    ap.add_argument("--variants", nargs="+", default=keys, choices=keys, metavar="KEY",
                    help=f"rows to train, from {', '.join(keys)} (default: all)")
    ap.add_argument("--steps", type=int, help="train.steps for every method (default: the config's)")
    ap.add_argument("--priors", type=int, help="priors.count per class and plan (default: the config's)")
    ap.add_argument("--scenes", type=int, help="use the first N scenes of data.scenes (default: all)")
    ap.add_argument("--images-per-scene", type=int, help="eval.images_per_prompt (default: the config's)")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                    help="processes, one torch thread each (default: min(2, cores))")
    ap.add_argument("--out", default=str(REPO / "outputs" / "toy_quality"), help="output folder")
    args = ap.parse_args(argv)
    if args.instances < 1:
        ap.error("--instances must be >= 1")
    if args.workers < 1:
        ap.error("--workers must be >= 1")
    for name in ("steps", "priors", "scenes", "images_per_scene"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def build_config(args: argparse.Namespace) -> JobConfig:
    cfg = load_config(args.config, args.overrides)
    over = {"job.storage": str(Path(args.out) / "storage")}
    if args.steps:
        over["train.steps"] = args.steps
    if args.priors:
        over["priors.count"] = args.priors
    if args.scenes:
        over["data.scenes"] = list(cfg.data.scenes[:args.scenes])
    if args.images_per_scene:
        over["eval.images_per_prompt"] = args.images_per_scene
    cfg = cfg.replace(**over)
    unknown = [s for s in cfg.data.scenes if s not in world.SCENE_SPECS]
    if unknown:
        raise ConfigError("data.scenes", f"{unknown} are not scenes the world draws; known: {list(world.SCENE_SPECS)}")
    return cfg


def run_all(tasks: list[Task], workers: int, what: str) -> list[dict]:
    """Run tasks (in `workers` processes when > 1), printing progress; results in task order."""
    results: list[dict] = []
    if workers == 1:
        _init_worker()
        for i, t in enumerate(tasks):
            results.append(run_task(t))
            say(f"{what} {i + 1}/{len(tasks)} done ({results[-1]['seconds']:.1f} s)")
        return results
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch threads
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker) as pool:
        futures = [pool.submit(run_task, t) for t in tasks]
        for i, f in enumerate(futures):
            results.append(f.result())
            say(f"{what} {i + 1}/{len(tasks)} done ({results[-1]['seconds']:.1f} s)")
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = build_config(args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scenes, n, res = list(cfg.data.scenes), cfg.eval.images_per_prompt, cfg.model.resolution
    instances = held_out_instances(args.instances)
    photos = write_photos(instances, out / "photos", res)
    variants = [k for k, _, _ in VARIANTS if k in args.variants]
    overrides = {k: o for k, _, o in VARIANTS}
    say(f"{len(instances)} instances ({', '.join(photos)}), rows {variants}, {cfg.train.steps} steps at lr "
        f"{cfg.train.lr}, {cfg.priors.count} priors per class and plan, {len(scenes)} scenes x {n} images, "
        f"{args.workers} workers")

    classes = sorted({i.class_noun for i in instances})
    methods = sorted({cfg.replace(**overrides[k]).method for k in variants})
    prior_tasks = [Task("priors", to_dict(cfg.replace(method=m)), c) for c in classes for m in methods]
    run_all(prior_tasks, args.workers, "priors")
    t_priors = time.perf_counter() - t_start

    tasks = [Task("base", to_dict(cfg), inst.class_noun, BASE, inst.seed) for inst in instances]
    tasks += [Task("train", to_dict(cfg.replace(**overrides[k])), inst.class_noun, k, inst.seed,
                   photos[subject_id(inst)][0]) for inst in instances for k in variants]
    tasks.sort(key=relative_cost, reverse=True)  # longest first, so the workers finish together
    done = run_all(tasks, args.workers, "train + sample")
    results = {(r["task"].instance_seed, r["task"].key): r for r in done}

    say("scoring with the toy judges and the exact judges")
    scorer = Scorer.load(cfg.model.dino, [cfg.model.clip])
    judge = scorer.clip_names[0]
    rows = [REAL, BASE] + variants
    per_instance: list[dict] = []
    grids: dict[str, np.ndarray] = {}
    for inst in instances:
        refs = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in photos[subject_id(inst)]])
        ref_emb = scorer.embed_images(refs)
        reference = (ref_emb.dino, ref_emb.clip[judge])
        emb = scorer.clip_text_embed([class_scene_text(inst.class_noun, s) for s in scenes], judge)  # (S, P)
        texts = {s: emb[k:k + 1] for k, s in enumerate(scenes)}
        images = {REAL: real_images(inst, scenes, n, res)}
        images.update({k: results[(inst.seed, k)]["images"] for k in rows if k != REAL})
        for k in rows:
            r = results.get((inst.seed, k), {})
            per_instance.append({"instance": subject_id(inst), "row": k, "label": LABELS[k],
                                 **score(scorer, images[k], inst, scenes, reference, texts),
                                 "train_seconds": r.get("train_seconds", 0.0),
                                 **{f"loss_{t}": v for t, v in r.get("terms", {}).items()}})
        if inst is instances[0]:
            grids = images
    means = {k: {c: float(np.mean([p[c] for p in per_instance if p["row"] == k])) for c in COLUMNS} for k in rows}
    seconds = {k: float(np.mean([p["train_seconds"] for p in per_instance if p["row"] == k])) for k in variants}

    md = table_markdown(rows, means, seconds)
    total = time.perf_counter() - t_start
    header = (f"toy world, {len(instances)} held-out instances x 1 photo, {cfg.train.steps} steps at lr {cfg.train.lr}, "
              f"{len(scenes)} scenes x {n} images, judges: toy DINO / toy CLIP + exact; "
              f"priors {t_priors:.0f} s, total {total / 60:.1f} min on {args.workers} workers")
    (out / "table.md").write_text(header + "\n\n" + md + "\n")
    fields = sorted({k for p in per_instance for k in p}, key=lambda k: (k.startswith("loss_"), k))
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(per_instance)
    samples_grid(grids, rows).save(out / "samples.png")
    (out / "results.json").write_text(json.dumps({"header": header, "rows": rows, "labels": LABELS, "means": means,
                                                   "train_seconds": seconds, "config": to_dict(cfg),
                                                   "instances": list(photos)}, indent=1))
    print(header)
    print(md)
    say(f"wrote {out / 'table.md'}, results.csv, samples.png (rows: {', '.join(LABELS[k] for k in rows)}; "
        f"columns: {', '.join(scenes)}), results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
