"""The paper's claim measured inside the toy world: DreamBooth, ComFusion, the Table 3 ablations and
the levers of issue 16, scored by judges kept apart from training.

For world instances that pretraining never saw (seeds from `world.HELD_OUT_SEED_START`), one photo
each (`--photos N`: the first N, each its own view) on one background (`world.PHOTO_SCENE`), every
row is trained with the same budget (configs/toy_quality.yaml: steps, learning rate, priors) on the
committed `toy` preset, then samples
"a sks [class noun] [scene]" ("sks" is a reserved single token) for every scene of `data.scenes`
from the same seeds. Columns (`comfusion.toy.scores` defines them):

  DINO (train)   toy DINO, the judge L_F^I trains against, vs references in the asked scene
  DINO / CLIP-I / CLIP-T (held-out)   `toy-heldout` judges (another seed and data order, no loss
                 uses them); DINO and CLIP-I vs references rendered in the asked scene (never the
                 training photo), CLIP-T vs "a [class noun] [scene]"
  scene, inst, inst|ok, both   exact judges: asked scene found; instance distance (lower is closer;
                 own instance ~0.2, another of its class ~2.5) over all pictures and over those
                 with the right scene; both at once (distance < 1.6)
  DINO vs photos the old, confounded score (toy DINO vs the room photos, training photo included)

Rows besides the methods: "Real Images" (the world's renders of the instance in each asked scene:
the ceiling) and "Base, colour named" (the untuned model asked "a [colour] [class noun] [scene]").

    python benchmarks/toy_quality.py                       # default size (<= 30 min, 2 cores)
    python benchmarks/toy_quality.py --instances 1 --steps 4 --scenes 2 --images-per-scene 1 \\
        --priors 4 --variants dreambooth comfusion         # seconds: checks it runs
    python benchmarks/toy_quality.py --study --piece 1/4   # the study, a quarter of it (resumable)
    python benchmarks/toy_quality.py --study --report-only # tables and plot from what has run
    python benchmarks/toy_quality.py --study --queue --workers 1 &  # twice: two processes share one queue

`--study` trains every (instance, training seed, learning rate, row), scores checkpoints along
training (every `--every` steps) at the first `--guidance` (the others at the last checkpoint
only), and writes one JSON per task under
<out>/study/tasks/ (a task already there is skipped, so the study runs in pieces and resumes); the
report is paired bootstrap 95% intervals of each row's difference to the `--baseline` row (DreamBooth
unless told) over instances (seeds averaged within an instance) and a trade-off plot (scene accuracy
against instance distance along training, one curve per row; exact and held-out judges) and each row's
gap to the baseline's frontier at equal instance fidelity; a ComFusion row run beside its DreamBooth twin
(same overrides but the method and the fusion stream, e.g. cs0.1 or cs0.1_last and db_cs0.1) is also
compared with that twin, the fair pairing at equal prior weight; and each row's training seconds per step.
`--queue` processes share the task list through claim files.
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
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from comfusion.config import LEVERS, VARIANTS, ConfigError, JobConfig, SubjectSpec, from_dict, load_config, to_dict  # noqa: E402,E501
from comfusion.data import check_subject  # noqa: E402
from comfusion.metrics import eval_seed  # noqa: E402
from comfusion.prompts import DEFAULT_IDENTIFIER, instance_scene_text  # noqa: E402
from comfusion.toy import scores as toy_scores  # noqa: E402
from comfusion.toy import world  # noqa: E402

IDENTIFIER = DEFAULT_IDENTIFIER  # a reserved single token of the toy tokenizer, shared with no caption word
N_REFERENCE_PHOTOS = 4  # room photos of an instance written next to the training photo
REAL, BASE = "real", "base"
# LoRA subjects (issue 15): the same steps, priors and seeds, but only rank-4 UNet adapters train;
# adapters take a larger step than full weights (diffusers' LoRA recipe: 1e-4 against 5e-6)
LORA_LR = 1e-3
LORA_ROWS: tuple[tuple[str, str, dict], ...] = (
    ("dreambooth_lora", "DreamBooth (LoRA)", {"method": "dreambooth", "train.adapter": "lora", "train.lr": LORA_LR}),
    ("comfusion_lora", "ComFusion (LoRA)", {"train.adapter": "lora", "train.lr": LORA_LR}),
)
ROWS = VARIANTS + LEVERS + LORA_ROWS
LABELS = {REAL: "Real Images", BASE: "Base, colour named", **{k: label for k, label, _ in ROWS}}
OVERRIDES = {k: o for k, _, o in ROWS}
H = toy_scores.HELDOUT_JUDGES
T = toy_scores.TRAIN_JUDGES
COLUMNS = ((f"{T}/dino", "DINO (train)"), (f"{H}/dino", "DINO (held-out)"), (f"{H}/clip_i", "CLIP-I (held-out)"),
           (f"{H}/clip_t", "CLIP-T (held-out)"), ("scene", "scene (exact)"), ("inst", "inst dist (exact)"),
           ("inst|ok", "inst dist, scene ok"), ("both", "both (exact)"), (f"{T}/dino_photo", "DINO vs photos (old)"))
STUDY_COLUMNS = (("scene", "scene"), ("inst", "inst dist"), ("inst|ok", "inst, scene ok"), ("both", "both"),
                 (f"{H}/dino", "DINO ho"), (f"{H}/dino|ok", "DINO ho, scene ok"), (f"{H}/clip_t", "CLIP-T ho"),
                 (f"{T}/dino", "DINO train"))


def available_judges() -> tuple[str, ...]:
    """The training judges, and the held-out ones when their preset folder is there (it is made by
    `python -m comfusion.toy.judges --seed 1 --save-dtype fp16 --out comfusion/presets/toy-heldout`)."""
    from comfusion import presets_dir  # noqa: PLC0415

    if (presets_dir() / H / "dino").is_dir():
        return T, H
    say(f"note: no '{H}' judges in {presets_dir()}: the held-out columns stay empty (nan)")
    return (T,)


def say(msg: str) -> None:
    print(f"[toy_quality {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------
# subjects: held-out instances, one photo each


def held_out_instances(n: int, offset: int = 0) -> list[world.Instance]:
    """`n` instances pretraining never saw, cycling through the class nouns (`offset`: another set)."""
    return [world.make_instance(world.HELD_OUT_SEED_START + 100 + offset + k,
                                world.CLASS_NOUNS[k % len(world.CLASS_NOUNS)]) for k in range(n)]


def subject_id(inst: world.Instance) -> str:
    return f"{inst.colour}-{inst.class_noun}-{inst.seed - world.HELD_OUT_SEED_START}"


def write_photos(instances: list[world.Instance], folder: Path, size: int,
                 n_train: int = 1) -> dict[str, tuple[str, ...]]:
    """<folder>/<subject id>/<k>.png: the instance's room photos; returns the first `n_train` of each
    (the training photos)."""
    if not 1 <= n_train <= N_REFERENCE_PHOTOS:
        raise ValueError(f"n_train must lie in 1..{N_REFERENCE_PHOTOS}, not {n_train}")
    paths = {}
    for inst in instances:
        d = folder / subject_id(inst)
        d.mkdir(parents=True, exist_ok=True)
        for k, photo in enumerate(world.instance_photos(inst, N_REFERENCE_PHOTOS, size=size)):
            Image.fromarray(photo).save(d / f"{k}.png")
        paths[subject_id(inst)] = tuple(str(d / f"{k}.png") for k in range(n_train))
    return paths


# ---------------------------------------------------------------------------------------
# the work items: priors per (class, plan), and train + sample + score per (instance, row, seed, lr)


@dataclass(frozen=True)
class Task:
    kind: str  # "priors", "train" (a row of ROWS), "base" or "real"
    cfg: dict  # the run's JobConfig as a dict (picklable across processes)
    class_noun: str
    key: str = ""  # the row key
    instance_seed: int = 0
    photos: tuple[str, ...] = ()  # the training photos
    checkpoints: tuple[int, ...] = ()  # steps at which samples are scored (the last is train.steps)
    guidances: tuple[float, ...] = (7.5,)
    out_file: str = ""  # study: where the result is written (and found when resuming)
    keep_images: bool = True  # default mode: the final images come back for the sample grid
    final_only_extra: bool = False  # study: guidances after the first are sampled at the last checkpoint only


_SCORERS: dict = {}


def _init_worker() -> None:
    torch.set_num_threads(1)  # one core per worker: the workers share the machine


def _scorers(names: tuple[str, ...]) -> dict:
    if names not in _SCORERS:  # once per worker process
        _SCORERS[names] = toy_scores.load_scorers(names)
    return _SCORERS[names]


def _sample(components: dict, cfg: JobConfig, prompts: list[str], guidance: float) -> np.ndarray:
    """(S, n, H, W, 3): n images per prompt, the same seeds for every row."""
    from comfusion.sampling import sample  # noqa: PLC0415

    n, res = cfg.eval.images_per_prompt, cfg.model.resolution
    seeds = [eval_seed(cfg.eval.seed, s, i) for s in range(len(prompts)) for i in range(n)]
    with torch.no_grad():
        out = sample(components, [p for p in prompts for _ in range(n)], seeds, steps=cfg.sampler.steps,
                     guidance_scale=guidance, height=res, width=res, batch_size=cfg.eval.batch_size)
    return out.images.reshape(len(prompts), n, *out.images.shape[1:])


@dataclass
class _Checkpoints:
    """Trainer callbacks: at each checkpoint step, sample every guidance and score (not timed as training)."""

    task: Task
    cfg: JobConfig
    inst: world.Instance
    judges: tuple[str, ...]
    trainer: object = None
    records: list = field(default_factory=list)
    images: dict = field(default_factory=dict)
    grad_norms: list = field(default_factory=list)  # (step, {term: norm}) every train.grad_norm_every steps
    eval_seconds: float = 0.0

    def on_grad_norms(self, step: int, norms: dict) -> None:
        self.grad_norms.append({"step": step, **norms})

    def on_step(self, step: int, terms: dict, lr: float) -> None:
        if step not in self.task.checkpoints:
            return
        t0 = time.perf_counter()
        tr, scenes = self.trainer, list(self.cfg.data.scenes)
        tr.unet.eval()
        tr.text_encoder.eval()
        prompts = [instance_scene_text(IDENTIFIER, self.inst.class_noun, s) for s in scenes]
        final = step == max(self.task.checkpoints)
        for g in self.task.guidances if final or not self.task.final_only_extra else self.task.guidances[:1]:
            images = _sample(tr.components, self.cfg, prompts, g)
            self.records.append({"step": step, "guidance": g, **toy_scores.score_images(
                _scorers(self.judges), images, self.inst, scenes)})
            self.images[(step, g)] = images
        tr.unet.train()
        tr.text_encoder.train(self.cfg.train.train_text_encoder)
        self.eval_seconds += time.perf_counter() - t0


def run_task(task: Task, judges: tuple[str, ...]) -> dict:
    """Run one task; returns its score records (and, unless a study task, its final images)."""
    cfg = from_dict(task.cfg)
    t0 = time.perf_counter()
    if task.kind == "priors":
        from comfusion.priors import ensure_priors  # noqa: PLC0415

        ensure_priors(task.class_noun, cfg, cfg.job.storage, method=cfg.method, progress=None)
        return {"task": task, "seconds": time.perf_counter() - t0}
    inst = world.make_instance(task.instance_seed, task.class_noun)
    scenes = list(cfg.data.scenes)
    if task.kind in (REAL, BASE):
        result = _reference_row(task, cfg, inst, scenes, judges)
    else:
        result = _train_row(task, cfg, inst, scenes, judges)
    result.update(task=task, seconds=time.perf_counter() - t0)
    if task.out_file:
        _write_task_file(task, result)
    if not task.keep_images:
        result["images"] = {}
    return result


def _reference_row(task: Task, cfg: JobConfig, inst: world.Instance, scenes: list[str], judges) -> dict:
    n, res = cfg.eval.images_per_prompt, cfg.model.resolution
    records, images = [], {}
    for g in task.guidances:
        if task.kind == REAL:  # the world's own renders: the ceiling of every column
            imgs = np.stack([np.stack([world.render(inst, s, 70_000 + i, res) for i in range(n)]) for s in scenes])
        else:
            from comfusion.models import load_base  # noqa: PLC0415

            imgs = _sample(load_base(cfg.model.base), cfg, [inst.caption(s) for s in scenes], g)
        records.append({"step": 0, "guidance": g, **toy_scores.score_images(_scorers(judges), imgs, inst, scenes)})
        images[(0, g)] = imgs
    return {"records": records, "images": images, "terms": {}, "train_seconds": 0.0}


def _train_row(task: Task, cfg: JobConfig, inst: world.Instance, scenes: list[str], judges) -> dict:
    from comfusion.train import Priors, SubjectTrainer, obtain_priors  # noqa: PLC0415

    t0 = time.perf_counter()
    spec = SubjectSpec(id=subject_id(inst), images=task.photos, class_noun=inst.class_noun,
                       identifier=IDENTIFIER, scenes=tuple(scenes))
    subject = check_subject(spec, cfg.data, cfg.model.resolution)
    found = obtain_priors(cfg, subject, device="cpu")  # from the cache the priors tasks filled
    ckpt = _Checkpoints(task, cfg, inst, judges)
    trainer = SubjectTrainer(cfg, subject, Priors(found.latents, list(found.prompts), list(found.scenes)),
                             device="cpu", callbacks=ckpt)
    ckpt.trainer = trainer
    terms = trainer.run()
    train_s = time.perf_counter() - t0 - ckpt.eval_seconds
    return {"records": ckpt.records, "images": ckpt.images, "terms": terms, "train_seconds": train_s,
            "grad_norms": ckpt.grad_norms}


def _write_task_file(task: Task, result: dict) -> None:
    cfg = from_dict(task.cfg)
    meta = {"row": task.key, "instance_seed": task.instance_seed, "class_noun": task.class_noun,
            "seed": cfg.train.seed, "lr": cfg.train.lr, "photos": len(task.photos),
            "train_seconds": result["train_seconds"],
            "terms": result["terms"], "records": result["records"], "scenes": list(cfg.data.scenes),
            "grad_norms": result.get("grad_norms", [])}
    path = Path(task.out_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"step{st}_g{g:g}": im for (st, g), im in result["images"].items()}
    np.savez_compressed(path.with_suffix(".npz"), **arrays)  # the pictures: rescored when judges are added
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, path)  # complete or absent: a killed piece leaves no half file


def relative_cost(task: Task) -> int:
    """Rough cost of a task: UNet calls per step (1 + tau with the fusion stream)."""
    if task.kind != "train":
        return 0
    cfg = from_dict(task.cfg)
    fusion = cfg.method == "comfusion" and cfg.loss.fusion
    return 1 + (cfg.loss.tau if fusion else 0)


def run_all(tasks: list[Task], workers: int, what: str, judges: tuple[str, ...]) -> list[dict]:
    """Run tasks (in `workers` processes when > 1), printing progress; results in task order."""
    results: list[dict] = []
    if workers == 1:
        _init_worker()
        for i, t in enumerate(tasks):
            results.append(run_task(t, judges))
            say(f"{what} {i + 1}/{len(tasks)} done ({results[-1]['seconds']:.1f} s)")
        return results
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch threads
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker) as pool:
        futures = [pool.submit(run_task, t, judges) for t in tasks]
        for i, f in enumerate(futures):
            results.append(f.result())
            say(f"{what} {i + 1}/{len(tasks)} done ({results[-1]['seconds']:.1f} s)")
    return results


# ---------------------------------------------------------------------------------------
# the default run: one table


def table_markdown(rows: list[str], means: dict[str, dict[str, float]], seconds: dict[str, float]) -> str:
    lines = ["| Methods | " + " | ".join(h for _, h in COLUMNS) + " | train s (x DB) |",
             "|---" * (len(COLUMNS) + 2) + "|"]
    db = seconds.get("dreambooth")
    for key in rows:
        cells = [f"{means[key].get(c, float('nan')):.3f}" for c, _ in COLUMNS]
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
    margin, cell = 160, grid.height // len(rows)
    out = Image.new("RGB", (grid.width + margin, grid.height), (255, 255, 255))
    out.paste(grid, (margin, 0))
    draw = ImageDraw.Draw(out)
    for i, k in enumerate(rows):
        draw.text((4, i * cell + cell // 2 - 6), LABELS[k], fill=(0, 0, 0))
    return out


def default_tasks(cfg: JobConfig, instances, photos, variants) -> list[Task]:
    g = (cfg.sampler.guidance_scale,)
    tasks = [Task(kind, to_dict(cfg), inst.class_noun, kind, inst.seed, guidances=g)
             for inst in instances for kind in (REAL, BASE)]
    tasks += [Task("train", to_dict(cfg.replace(**OVERRIDES[k])), inst.class_noun, k, inst.seed,
                   photos[subject_id(inst)], checkpoints=(cfg.train.steps,), guidances=g)
              for inst in instances for k in variants]
    return sorted(tasks, key=relative_cost, reverse=True)  # longest first, so the workers finish together


def run_default(args, cfg: JobConfig, out: Path, instances, photos, variants, t_start: float) -> int:
    done = run_all(default_tasks(cfg, instances, photos, variants), args.workers, "train + sample", args.judges)
    rows = [REAL, BASE] + variants
    per_instance = []
    for r in done:
        t = r["task"]
        per_instance.append({"instance": subject_id(world.make_instance(t.instance_seed, t.class_noun)), "row": t.key,
                             "label": LABELS[t.key], **r["records"][-1], "train_seconds": r["train_seconds"],
                             **{f"loss_{k}": v for k, v in r["terms"].items()}})
    per_instance.sort(key=lambda p: (p["instance"], rows.index(p["row"])))
    keys = sorted({k for p in per_instance for k in p if "/" in k or k in ("scene", "inst", "inst|ok", "both")})
    means = {k: {c: float(np.nanmean([p[c] for p in per_instance if p["row"] == k])) for c in keys} for k in rows}
    seconds = {k: float(np.mean([p["train_seconds"] for p in per_instance if p["row"] == k])) for k in variants}
    md = table_markdown(rows, means, seconds)
    header = (f"toy world, {len(instances)} held-out instances x {args.photos} photo{'s' * (args.photos > 1)}, "
              f"{cfg.train.steps} steps at lr {cfg.train.lr}, "
              f"{len(cfg.data.scenes)} scenes x {cfg.eval.images_per_prompt} images, guidance "
              f"{cfg.sampler.guidance_scale}, judges: {' / '.join(args.judges)} + exact; "
              f"total {(time.perf_counter() - t_start) / 60:.1f} min on {args.workers} workers")
    (out / "table.md").write_text(header + "\n\n" + md + "\n")
    fields = sorted({k for p in per_instance for k in p}, key=lambda k: (k.startswith("loss_"), k))
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(per_instance)
    first = instances[0].seed
    grids = {r["task"].key: next(iter(r["images"].values())) for r in done if r["task"].instance_seed == first}
    samples_grid(grids, rows).save(out / "samples.png")
    (out / "results.json").write_text(json.dumps({"header": header, "rows": rows, "labels": LABELS, "means": means,
                                                   "train_seconds": seconds, "config": to_dict(cfg),
                                                   "instances": list(photos)}, indent=1))
    print(header)
    print(md)
    say(f"wrote {out / 'table.md'}, results.csv, samples.png, results.json")
    return 0


# ---------------------------------------------------------------------------------------
# the study: seeds x instances x rows x learning rates, checkpoints along training


def study_tasks(args, cfg: JobConfig, instances, photos, variants, folder: Path) -> list[Task]:
    every = args.every or cfg.train.steps
    checkpoints = tuple(range(every, cfg.train.steps + 1, every))
    g = tuple(args.guidance)
    tasks = [Task(kind, to_dict(cfg), inst.class_noun, kind, inst.seed, guidances=g, keep_images=False,
                  out_file=str(folder / f"{kind}-{subject_id(inst)}.json"))
             for inst in instances for kind in (REAL, BASE)]
    for seed in args.seeds:  # seed-major, then lr: a run cut short keeps every instance of its first lr paired
        for lr in args.lrs:
            for inst in instances:
                for k in variants:
                    run_cfg = cfg.replace(**OVERRIDES[k], **{"train.lr": lr, "train.seed": seed})
                    name = f"{k}-{subject_id(inst)}-lr{lr:g}-seed{seed}.json"
                    tasks.append(Task("train", to_dict(run_cfg), inst.class_noun, k, inst.seed,
                                      photos[subject_id(inst)], checkpoints, g, str(folder / name), False,
                                      final_only_extra=True))
    return tasks


def rescore(folder: Path, judges: tuple[str, ...]) -> int:
    """Add the columns of judges a finished task was not scored by, from its saved pictures."""
    n = 0
    for path in sorted(folder.glob("*.json")):
        meta = json.loads(path.read_text())
        missing = tuple(j for j in judges if any(f"{j}/dino" not in r for r in meta["records"]))
        if not missing or not path.with_suffix(".npz").exists():
            continue
        pictures = np.load(path.with_suffix(".npz"))
        inst = world.make_instance(meta["instance_seed"], meta["class_noun"])
        for rec in meta["records"]:
            images = pictures[f"step{rec['step']}_g{rec['guidance']:g}"]
            _, right = toy_scores.exact_scores(images, inst, meta["scenes"])
            for j in missing:
                rec.update(toy_scores.judge_scores(_scorers((j,))[j], j, images, inst, meta["scenes"], right))
        path.write_text(json.dumps(meta))
        n += 1
    return n


def load_records(folder: Path) -> list[dict]:
    """One flat record per (task file, checkpoint, guidance)."""
    out = []
    for path in sorted(folder.glob("*.json")):
        meta = json.loads(path.read_text())
        base = {k: meta.get(k) for k in ("row", "instance_seed", "seed", "lr", "train_seconds")}
        out += [{**base, **rec} for rec in meta["records"]]
    return out


def _per_instance(records: list[dict], row: str, lr, step: int, guidance: float, col: str) -> dict[int, float]:
    """Instance seed -> the column averaged over training seeds."""
    vals: dict[int, list[float]] = {}
    for r in records:
        if r["row"] == row and r["lr"] == lr and r["step"] == step and r["guidance"] == guidance:
            vals.setdefault(r["instance_seed"], []).append(r.get(col, float("nan")))
    return {k: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan") for k, v in vals.items()}


def study_table(records: list[dict], lr, step: int, guidance: float, rows: list[str],
                baseline: str = "dreambooth") -> str:
    """Means over the instances every row with results here has (a cut-short run compares like with like),
    and each row's difference to `baseline` with a paired bootstrap 95% interval over those instances."""
    head = "| row | n inst | " + " | ".join(h for _, h in STUDY_COLUMNS) + " |"
    lines = [head, "|---" * (len(STUDY_COLUMNS) + 2) + "|"]
    table = {row: {col: _per_instance(records, row, lr, step, guidance, col) for col, _ in STUDY_COLUMNS}
             for row in rows}
    table = {row: cols for row, cols in table.items() if cols[STUDY_COLUMNS[0][0]]}
    common = set.intersection(*(set(cols[STUDY_COLUMNS[0][0]]) for cols in table.values())) if table else set()
    for row, cols in table.items():
        cells = []
        for col, _ in STUDY_COLUMNS:
            mine = {k: v for k, v in cols[col].items() if k in common}
            cell = f"{np.nanmean(list(mine.values())):.3f}" if mine else "-"
            db = table.get(baseline, {}).get(col, {})
            if row != baseline and db and mine:
                d, lo, hi = toy_scores.paired_bootstrap([mine[k] - db[k] for k in mine])
                cell += f" ({d:+.3f} [{lo:+.3f}, {hi:+.3f}])"
            cells.append(cell)
        lines.append(f"| {LABELS.get(row, row)} | {len(common)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


FRONTIERS = (("inst", "scene", "exact: scene accuracy at equal instance distance"),
             (f"{H}/dino", f"{H}/clip_t", "held-out: CLIP-T at equal DINO"))


def _points(records: list[dict], row: str, guidance: float, xc: str, yc: str, inst: list[int]) -> dict:
    """(lr, step) -> (instances, 2) per-instance (x, y), seeds averaged; NaN where an instance is missing."""
    out = {}
    for lr, step in sorted({(r["lr"], r["step"]) for r in records if r["row"] == row and r["guidance"] == guidance}):
        x, y = (_per_instance(records, row, lr, step, guidance, c) for c in (xc, yc))
        out[(lr, step)] = np.array([[x.get(k, np.nan), y.get(k, np.nan)] for k in inst])
    return out


def _x_range(points: dict) -> str:
    xs = [float(np.nanmean(p[:, 0])) for p in points.values()]
    return f"{min(xs):.2f}..{max(xs):.2f}" if xs else "none"


# keys of the fusion stream, which DreamBooth has not: a ComFusion row's twin ignores them
FUSION_KEYS = ("loss.fusion", "loss.tau", "loss.lambda_fusion_", "loss.use_fusion_")


def dreambooth_twin(row: str) -> str | None:
    """The DreamBooth row trained like `row` but for the method and the fusion stream (ComFusion at prior
    weight 0.1, with or without `loss.fusion_backprop: last` -> DreamBooth at prior weight 0.1): the fair
    pairing at equal settings. None for a DreamBooth row, or when no DreamBooth row has those settings."""
    if row not in OVERRIDES or OVERRIDES[row].get("method") == "dreambooth":
        return None
    want = {k: v for k, v in OVERRIDES[row].items() if not k.startswith(FUSION_KEYS)} | {"method": "dreambooth"}
    return next((k for k, o in OVERRIDES.items() if o == want), None)


def frontier_comparisons(rows: list[str], baseline: str = "dreambooth") -> list[tuple[str, tuple[str, ...]]]:
    """(row, baseline rows) pairs for `frontier_table`: every row against `baseline`, and a ComFusion row
    also against its DreamBooth twin (equal settings) when that ran and is not the baseline.
    Each baseline is one row: the points of two rows would zig-zag, not make one frontier."""
    out = [(row, (baseline,)) for row in rows if row != baseline and baseline in rows]
    twins = [(row, dreambooth_twin(row)) for row in rows]
    return out + [(row, (twin,)) for row, twin in twins if twin in rows and twin != baseline]


def frontier_table(records: list[dict], comparisons: list[tuple[str, tuple[str, ...]]], guidance: float) -> str:
    """Each row's points (every lr and checkpoint) against the frontier through every point of its baseline
    rows: the mean gap in y at equal x, with a paired bootstrap 95% interval over the instances all share."""
    have = lambda row: {r["instance_seed"] for r in records if r["row"] == row and r["guidance"] == guidance}  # noqa: E731
    lines = ["| row | against the frontier of | " + " | ".join(t for _, _, t in FRONTIERS) + " |",
             "|---" * (len(FRONTIERS) + 2) + "|"]
    for row, base_rows in comparisons:
        cells, inst = [], sorted(set.intersection(have(row), *(have(b) for b in base_rows)))
        for xc, yc, _ in FRONTIERS if inst else ():
            base = {(b, *k): v for b in base_rows for k, v in _points(records, b, guidance, xc, yc, inst).items()}
            mine = _points(records, row, guidance, xc, yc, inst)
            gap, lo, hi, n = toy_scores.frontier_gap(base, mine) if base and mine else (0, 0, 0, 0)
            cells.append(f"{gap:+.3f} [{lo:+.3f}, {hi:+.3f}] ({n} of {len(mine)} points)" if n else
                         f"- (x {_x_range(mine)}, baseline's {_x_range(base)}: no overlap)")
        against = " + ".join(LABELS.get(b, b) for b in base_rows)
        cells = cells or ["- (no instance in common)"] * len(FRONTIERS)
        lines.append(f"| {LABELS.get(row, row)} | {against} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def grad_norm_table(folder: Path, rows: list[str]) -> str:
    """Per row of `rows` and lr: the mean `train.grad_norm_every` norms of each loss term (how large each is)."""
    terms = ("instance", "class_scene", "fusion_instance", "fusion_scene", "total")
    sums: dict[tuple, list[dict]] = {}
    for path in sorted(folder.glob("*.json")):
        meta = json.loads(path.read_text())
        if meta.get("grad_norms") and meta["row"] in rows:
            sums.setdefault((meta["row"], meta["lr"]), []).extend(meta["grad_norms"])
    lines = ["| row | lr | " + " | ".join(terms) + " |", "|---" * (len(terms) + 2) + "|"]
    for (row, lr), norms in sorted(sums.items(), key=lambda kv: (rows.index(kv[0][0]), kv[0][1])):
        cells = [f"{np.mean([n[t] for n in norms if t in n]):.3g}" if any(t in n for n in norms) else "-"
                 for t in terms]
        lines.append(f"| {LABELS.get(row, row)} | {lr:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) if sums else "(no task logged gradient norms: train.grad_norm_every is 0)"


BASE_COLUMNS = (("scene", "scene"), ("inst", "inst dist"), ("inst|ok", "inst, scene ok"), ("both", "both"),
                (f"{H}/dino", "DINO ho"))


def against_base_table(records: list[dict], rows: list[str], guidance: float) -> str:
    """Each row's last checkpoint of each lr, at every guidance it was sampled at, against the untuned model
    told the colour ("Base, colour named") at `guidance`: mean (difference [paired bootstrap 95% interval])."""
    base = {c: _per_instance(records, BASE, None, 0, guidance, c) for c, _ in BASE_COLUMNS}
    lines = ["| row | lr, step, guidance | " + " | ".join(h for _, h in BASE_COLUMNS) + " |",
             "|---" * (len(BASE_COLUMNS) + 2) + "|"]
    for row in rows:
        mine = [r for r in records if r["row"] == row]
        for lr in sorted({r["lr"] for r in mine}):
            step = max(r["step"] for r in mine if r["lr"] == lr)
            for g in sorted({r["guidance"] for r in mine if r["lr"] == lr and r["step"] == step}, reverse=True):
                cells = []
                for col, _ in BASE_COLUMNS:
                    vals = _per_instance(records, row, lr, step, g, col)
                    diffs = [v - base[col][k] for k, v in vals.items() if k in base[col]]
                    d, lo, hi = toy_scores.paired_bootstrap(diffs)
                    cells.append(f"{np.nanmean(list(vals.values())):.3f} ({d:+.3f} [{lo:+.3f}, {hi:+.3f}])")
                lines.append(f"| {LABELS.get(row, row)} | {lr:g}, {step}, {g:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def train_speed_table(records: list[dict], rows: list[str]) -> str:
    """Per row and lr: training seconds per step (sampling and scoring left out), mean and spread over its
    tasks; both queue processes run every row under the same load, so rows compare, absolute values do not."""
    tasks: dict[tuple, dict] = {}
    for r in records:
        if r["row"] in rows and r.get("train_seconds"):
            key = (r["row"], r["lr"], r["instance_seed"], r["seed"])
            tasks[key] = {"s": r["train_seconds"], "steps": max(r["step"], tasks.get(key, {}).get("steps", 0))}
    lines = ["| row | lr | tasks | train s/step (mean) | median | min |", "|---|---|---|---|---|---|"]
    for row in rows:
        for lr in sorted({k[1] for k in tasks if k[0] == row}):
            per = [t["s"] / t["steps"] for k, t in tasks.items() if k[0] == row and k[1] == lr]
            lines.append(f"| {LABELS.get(row, row)} | {lr:g} | {len(per)} | {np.mean(per):.3f} | "
                         f"{np.median(per):.3f} | {min(per):.3f} |")
    return "\n".join(lines)


def _mean_point(records: list[dict], row: str, lr, step: int, guidance: float, xc: str, yc: str) -> tuple:
    return tuple(np.nanmean(list(_per_instance(records, row, lr, step, guidance, c).values())) for c in (xc, yc))


def tradeoff_plot(records: list[dict], rows: list[str], lrs: list, guidance: float, path: Path) -> None:
    """Scene accuracy against instance distance along training, one curve per row; a column per lr;
    top: exact judges, bottom: held-out judges. A cross in the curve's colour: its last checkpoint
    sampled at another guidance (annotated with it)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    axes_def = (("inst", "scene", "instance distance (exact, lower = closer)", "scene accuracy (exact)"),
                (f"{H}/dino", f"{H}/clip_t", "DINO vs asked-scene references (held-out)", "CLIP-T (held-out)"))
    fig, axes = plt.subplots(2, len(lrs), figsize=(6.5 * len(lrs), 10), squeeze=False)
    colours = plt.get_cmap("tab20" if len(rows) > 10 else "tab10").colors
    for j, lr in enumerate(lrs):
        for i, (xc, yc, xl, yl) in enumerate(axes_def):
            ax = axes[i][j]
            for row in rows:
                mine = [r for r in records if r["row"] == row and r["lr"] == lr]
                steps = sorted({r["step"] for r in mine if r["guidance"] == guidance})
                if not steps:
                    continue
                pts = [_mean_point(records, row, lr, s, guidance, xc, yc) for s in steps]
                dashed = OVERRIDES.get(row, {}).get("method") == "dreambooth"  # DreamBooth rows dashed
                line, = ax.plot(*zip(*pts), marker="o", label=LABELS.get(row, row), ls="--" if dashed else "-",
                                color=colours[rows.index(row) % len(colours)])
                ax.annotate(str(steps[-1]), pts[-1], fontsize=7)
                for g in sorted({r["guidance"] for r in mine if r["step"] == steps[-1]} - {guidance}):
                    p = _mean_point(records, row, lr, steps[-1], g, xc, yc)
                    ax.scatter(*p, marker="x", s=60, color=line.get_color())
                    ax.annotate(f"g {g:g}", p, fontsize=7)
            for ref, colour in ((REAL, "black"), (BASE, "grey")):  # not a curve's colour
                ax.scatter(*_mean_point(records, ref, None, 0, guidance, xc, yc), marker="*", s=110, color=colour,
                           label=LABELS[ref])
            ax.set(xlabel=xl, ylabel=yl, title=f"lr {lr:g}, guidance {guidance:g} (x: last step at another guidance)")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _step_tables(records: list[dict], rows: list[str], g_first: float, baseline: str = "dreambooth",
                 title: str = "") -> list[str]:
    """One `study_table` per (lr, guidance, checkpoint) the rows have, the first guidance first."""
    trained = [r for r in records if r["row"] in rows]
    parts = []
    for lr in sorted({r["lr"] for r in trained}):
        for g in sorted({r["guidance"] for r in trained}, key=lambda x: x != g_first):
            for step in sorted({r["step"] for r in trained if r["lr"] == lr and r["guidance"] == g}):
                parts.append(f"\n### {title}lr {lr:g}, guidance {g:g}, step {step}\n\n"
                             + study_table(records, lr, step, g, rows, baseline))
    return parts


def _seeds_per_row(trained: list[dict], rows: list[str]) -> str:
    return ", ".join(f"{r} {sorted({x['seed'] for x in trained if x['row'] == r})}" for r in rows)


def study_report(args, folder: Path, variants: list[str]) -> int:
    _init_worker()
    fixed = rescore(folder / "tasks", args.judges)
    if fixed:
        say(f"rescored {fixed} finished task(s) with judges they lacked")
    records = load_records(folder / "tasks")
    for r in records:
        if r["row"] in (REAL, BASE):
            r["lr"] = None
    trained = [r for r in records if r["row"] not in (REAL, BASE)]
    if not trained:
        say(f"no finished study tasks under {folder / 'tasks'}")
        return 1
    base = args.baseline
    rows = [k for k in dict.fromkeys([base] + variants) if any(r["row"] == k for r in trained)]
    parts = [f"toy study: {len({r['instance_seed'] for r in trained})} instances, training seeds per row: "
             f"{_seeds_per_row(trained, rows)}; cells: mean over instances (seeds averaged within each), then "
             f"(difference to {LABELS[base]} [paired bootstrap 95% interval over instances])"]
    parts += _step_tables(records, rows, args.guidance[0], base)
    if any(r["row"] in (REAL, BASE) for r in records):
        for g in sorted({r["guidance"] for r in records if r["row"] in (REAL, BASE)}, key=lambda x: x != args.guidance[0]):
            parts.append(f"\n### references, guidance {g:g}\n\n" + study_table(records, None, 0, g, [REAL, BASE]))
    for row in rows:  # the fair pairing: a ComFusion row against DreamBooth at the same settings (prior weight)
        twin = dreambooth_twin(row)
        if twin not in (None, base) and twin in rows:
            parts += _step_tables(records, [twin, row], args.guidance[0], twin,
                                  f"{LABELS[row]} against {LABELS[twin]}: ")
    found = {r["guidance"] for r in trained}
    g_main = args.guidance[0] if args.guidance[0] in found else sorted(found)[0]  # the guidance of every checkpoint
    parts.append(f"\n### at equal instance fidelity (guidance {g_main:g}; every lr and checkpoint of a row against "
                 "the frontier through all of its baseline rows' points; gap [paired bootstrap 95% interval over "
                 "instances])\n\n" + frontier_table(records, frontier_comparisons(rows, base), g_main))
    if any(r["row"] == BASE for r in records):
        parts.append(f"\n### last checkpoint against {LABELS[BASE]} at guidance {g_main:g} (mean (difference "
                     "[paired bootstrap 95% interval over instances]))\n\n" + against_base_table(records, rows, g_main))
    parts.append("\n### gradient norm of each weighted term (mean over tasks and logged steps)\n\n"
                 + grad_norm_table(folder / "tasks", rows))
    parts.append("\n### training speed (seconds per step, without sampling and scoring)\n\n"
                 + train_speed_table(trained, rows))
    text = "\n".join(parts) + "\n"
    (folder / "table.md").write_text(text)
    with open(folder / "records.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=sorted({k for r in records for k in r}))
        w.writeheader()
        w.writerows(records)
    tradeoff_plot(records, rows, sorted({r["lr"] for r in trained}), g_main, folder / "tradeoff.png")
    print(text)
    say(f"wrote {folder / 'table.md'}, records.csv, tradeoff.png")
    return 0


def run_study(args, cfg: JobConfig, out: Path, instances, photos, variants) -> int:
    folder = out / "study"
    tasks = study_tasks(args, cfg, instances, photos, variants, folder / "tasks")
    k, n = args.piece
    mine = [t for i, t in enumerate(tasks) if i % n == k - 1]
    todo = [t for t in mine if not Path(t.out_file).exists()]  # seed-major order: a cut-short run stays paired
    say(f"study: {len(tasks)} tasks, piece {k}/{n} holds {len(mine)}, {len(todo)} still to run")
    if args.queue:
        run_queue(todo, args.judges)
    else:
        run_all(todo, args.workers, "study task", args.judges)
    return study_report(args, folder, variants)


def _claim(task: Task) -> bool:
    """Take a study task for this process: <task>.claim holds the owner's pid; a dead owner's claim is taken over."""
    claim = Path(task.out_file).with_suffix(".claim")
    for _ in range(2):
        try:
            fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                os.kill(int(claim.read_text() or 0), 0)
                return False  # its owner is alive
            except (ProcessLookupError, ValueError, FileNotFoundError):
                claim.unlink(missing_ok=True)  # a killed run's claim
                continue
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return True
    return False


def run_queue(tasks: list[Task], judges: tuple[str, ...]) -> None:
    """One worker over a queue that other `--queue` processes share: each task goes to whichever claims it
    first, in order, so several processes (e.g. one per core) finish the seed-major order together."""
    _init_worker()
    n = 0
    for t in tasks:
        Path(t.out_file).parent.mkdir(parents=True, exist_ok=True)
        if Path(t.out_file).exists() or not _claim(t):
            continue
        try:
            seconds = run_task(t, judges)["seconds"]
            if t.kind == "priors":  # run_task writes no file for a prior set: mark it done
                Path(t.out_file).write_text("{}")
        finally:
            Path(t.out_file).with_suffix(".claim").unlink(missing_ok=True)
        n += 1
        say(f"study task {Path(t.out_file).stem} done ({seconds:.1f} s; {n} by this process)")


# ---------------------------------------------------------------------------------------
# the command line


def _piece(text: str) -> tuple[int, int]:
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--piece must look like K/N, got {text!r}") from None
    if not 1 <= k <= n:
        raise argparse.ArgumentTypeError(f"--piece K/N needs 1 <= K <= N, got {text!r}")
    return k, n


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    keys = [k for k, _, _ in ROWS]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs" / "toy_quality.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, e.g. --set train.lr=1e-4 (repeatable)")
    ap.add_argument("--instances", type=int, help="held-out instances, cycling through the class nouns "
                                                  "(default 5; --study: 10)")
    ap.add_argument("--instance-offset", type=int, default=0,
                    help="take instances from another part of the held-out range (to confirm a choice)")
    ap.add_argument("--variants", nargs="+", choices=keys, metavar="KEY",
                    help=f"rows to train, from {', '.join(keys)} (default: the Table 3 rows; --study: "
                         "dreambooth comfusion)")
    ap.add_argument("--photos", type=int, default=1, choices=range(1, N_REFERENCE_PHOTOS + 1), metavar="N",
                    help=f"training photos per instance, its first N room photos "
                         f"(1 to {N_REFERENCE_PHOTOS}; default 1)")
    ap.add_argument("--steps", type=int, help="train.steps for every method (default: the config's)")
    ap.add_argument("--priors", type=int, help="priors.count per class and plan (default: the config's)")
    ap.add_argument("--scenes", type=int, help="use the first N scenes of data.scenes (default: all)")
    ap.add_argument("--images-per-scene", type=int, help="eval.images_per_prompt (default: the config's)")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                    help="processes, one torch thread each (default: min(2, cores))")
    ap.add_argument("--judges", nargs="+", help=f"judge pairs to score with (default: {T} and, once committed, {H})")
    ap.add_argument("--out", default=str(REPO / "outputs" / "toy_quality"), help="output folder")
    st = ap.add_argument_group("study")
    st.add_argument("--study", action="store_true", help="the study: seeds x instances x rows x lrs, checkpoints")
    st.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds (train.seed)")
    st.add_argument("--lrs", nargs="+", type=float, default=[2e-4, 1e-4], help="learning rates")
    st.add_argument("--every", type=int, default=100, help="score a checkpoint every N steps")
    st.add_argument("--guidance", nargs="+", type=float, default=[7.5],
                    help="guidance scales to sample at: the first at every checkpoint (the curves), the others "
                         "at the last checkpoint only (the guidance lever)")
    st.add_argument("--piece", type=_piece, default=(1, 1), help="run only piece K of N (K/N) of the tasks")
    st.add_argument("--report-only", action="store_true", help="no training: the report from finished tasks")
    st.add_argument("--baseline", default="dreambooth", choices=keys, metavar="KEY",
                    help="the row every other row is compared with in the report (default: dreambooth)")
    st.add_argument("--queue", action="store_true",
                    help="one worker taking tasks from a queue shared with other --queue processes (claim files)")
    args = ap.parse_args(argv)
    args.instances = args.instances if args.instances is not None else (10 if args.study else 5)
    args.variants = args.variants or (["dreambooth", "comfusion"] if args.study else [k for k, _, _ in VARIANTS + LORA_ROWS])
    args.judges = tuple(args.judges) if args.judges else available_judges()
    args.out = str(Path(args.out).resolve())  # photos are named by absolute path (a relative one would be the config's)
    for name in ("instances", "workers", "steps", "priors", "scenes", "images_per_scene", "every"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if any(not 0 < lr < 1 for lr in args.lrs):
        ap.error("--lrs must lie in (0, 1)")
    return args


def build_config(args: argparse.Namespace) -> JobConfig:
    cfg = load_config(args.config, args.overrides)
    over = {"job.storage": str(Path(args.out) / "storage"), "train.num_instance_images": args.photos}
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = build_config(args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t_start, out = time.perf_counter(), Path(args.out)
    if args.study and args.report_only:
        return study_report(args, out / "study", args.variants)
    out.mkdir(parents=True, exist_ok=True)
    instances = held_out_instances(args.instances, args.instance_offset)
    photos = write_photos(instances, out / "photos", cfg.model.resolution, args.photos)
    say(f"{len(instances)} instances ({', '.join(photos)}) x {args.photos} photo(s), rows {args.variants}, "
        f"{cfg.train.steps} steps at lr "
        f"{args.lrs if args.study else cfg.train.lr}, {cfg.priors.count} priors per class and plan, "
        f"{len(cfg.data.scenes)} scenes x {cfg.eval.images_per_prompt} images, {args.workers} workers")
    classes = sorted({i.class_noun for i in instances})
    methods = sorted({cfg.replace(**OVERRIDES[k]).method for k in args.variants})
    priors = [Task("priors", to_dict(cfg.replace(method=m)), c, out_file=str(out / "study" / "priors" / f"{c}-{m}"))
              for c in classes for m in methods]
    if args.study and args.queue:  # queue processes share the prior sets too (a marker file per finished set)
        run_queue(priors, args.judges)
    else:
        run_all(priors, args.workers, "priors", args.judges)
    if args.study:
        return run_study(args, cfg, out, instances, photos, args.variants)
    return run_default(args, cfg, out, instances, photos, args.variants, t_start)


if __name__ == "__main__":
    sys.exit(main())
