"""What limits the toy base? Small measured DreamBooth runs on a few held-out instances (issue 16).

The toy study found no finetune closer to a held-out instance than the untuned model told the
instance's colour. This asks why, with the exact judges only (`world.scene_of`,
`world.instance_distance`), for each row trained on one instance photo (taken "in the room",
`world.PHOTO_SCENE`) and scored at checkpoints along training:

1. learning or composition? samples "a sks [class] [scene]" in the photo's own scene and in the
   11 other scenes: instance distance in the photo scene against the others;
2. the identifier? the same prompts with the instance's colour word added ("a sks red ball ..."),
   how far the identifier's embedding row moved from its initialisation (relative to its norm),
   and whether the text encoder reads "a sks ball ..." like "a red ball ..." (cosine of pooled
   outputs with the instance's colour against the mean over the other colours);
3. the recipe? rows: DreamBooth as in the study, prior loss weight 0, UNet only (text encoder
   frozen), lr 5e-4, UNet only at lr 5e-4; checkpoints up to 300 steps (the study stopped at 150).

Reference rows (no training): the world's renders of the instance, another instance of its class,
those renders through the autoencoder (its floor), those renders noised to 60% of the schedule and
redrawn by the base with their colour named (what the base draws once given the instance's layout:
its rendering ceiling), and the untuned model asked "a [colour] [class] [scene]" and "a sks [class] [scene]".
`--photos N` trains on the instance's first N room photos instead of one (task files "--pN").

    python benchmarks/toy_base.py                     # 3 instances x 5 rows, checkpoints 50 150 300
    python benchmarks/toy_base.py --rows db prior0 --prompts sks  # two rows, one prompt kind: a third of the time
    python benchmarks/toy_base.py --instances 4 --rows prior0_lr1e-4 --checkpoints 150 300 450 --prompts sks \\
        --photos 3 --priors 44 --images-per-scene 2 --set sampler.steps=10  # the study's DreamBooth-0, 3 photos
    python benchmarks/toy_base.py --instances 1 --rows db --checkpoints 2 --scenes 1 \\
        --images-per-scene 1 --priors 2               # seconds: checks it runs

One process, one torch thread. Each (instance, row) is written to <out>/tasks/<id>.json when done
(a rerun skips it); <out>/table.md is the mean over instances.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import toy_quality as tq  # noqa: E402
from comfusion.config import ConfigError, JobConfig  # noqa: E402
from comfusion.prompts import instance_scene_text  # noqa: E402
from comfusion.toy import world  # noqa: E402

ID = tq.IDENTIFIER
ROWS: dict[str, tuple[str, dict]] = {  # key: (label, config overrides on top of configs/toy_quality.yaml)
    "db": ("DreamBooth (study recipe: lr 2e-4, prior 1, text encoder trained)", {}),
    "prior0": ("prior loss weight 0", {"loss.lambda_class_scene": 0.0}),
    "unet_only": ("UNet only (text encoder frozen)", {"train.train_text_encoder": False}),
    "lr5e-4": ("lr 5e-4 (UNet and text encoder)", {"train.lr": 5e-4}),
    "unet_lr5e-4": ("UNet only, lr 5e-4", {"train.train_text_encoder": False, "train.lr": 5e-4}),
    "prior0_lr1e-4": ("prior loss weight 0, lr 1e-4 (the study's DreamBooth-0)",
                      {"loss.lambda_class_scene": 0.0, "train.lr": 1e-4}),
    "prior0_lr3e-4": ("prior loss weight 0, lr 3e-4", {"loss.lambda_class_scene": 0.0, "train.lr": 3e-4}),
}
REFS = {"real": "Real Images (the instance rendered)", "other": "another instance of its class",
        "vae": "the renders through the autoencoder (encode, decode)",
        "redraw": "the renders noised to 60% and denoised, 'a [colour] [class] [scene]'",
        "base_colour": "untuned, 'a [colour] [class] [scene]'", "base_sks": "untuned, 'a sks [class] [scene]'"}
REDRAW_STRENGTH = 0.6  # share of the DDIM schedule the "redraw" reference runs from the noised render
PROMPTS = {"sks": "a sks [class] [scene]", "sks+colour": "a sks [colour] [class] [scene]"}
COLUMNS = (("scene_other", "scene acc (other scenes)"), ("inst", "inst dist, all"),
           ("inst_photo", "inst dist, photo scene"), ("inst_other", "inst dist, other scenes"),
           ("inst_other|ok", "inst dist, other scenes, scene ok"), ("both_other", "both (other scenes)"),
           ("scene_photo", "scene acc (photo scene)"))


def say(msg: str) -> None:
    print(f"[toy_base {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------
# scoring: exact judges, photo scene against the others


def prompt_texts(kind: str, inst: world.Instance, scenes: list[str]) -> list[str]:
    """The prompts of one kind (PROMPTS, or the untuned references) for every scene."""
    if kind == "sks":
        return [instance_scene_text(ID, inst.class_noun, s) for s in scenes]
    if kind == "sks+colour":
        return [instance_scene_text(ID, f"{inst.colour} {inst.class_noun}", s) for s in scenes]
    if kind == "colour":
        return [inst.caption(s) for s in scenes]
    raise ValueError(f"unknown prompt kind {kind!r}")


def exact_split(images: np.ndarray, inst: world.Instance, scenes: list[str]) -> dict[str, float]:
    """(S, n, H, W, 3) pictures asked in `scenes` (the first is PHOTO_SCENE): exact scores over all,
    over the photo's scene and over the other scenes."""
    n = images.shape[1]
    asked = np.repeat(np.array(scenes), n)
    flat = images.reshape(-1, *images.shape[2:])
    right = np.array([world.scene_of(im)[0] for im in flat]) == asked
    dist = np.array([world.instance_distance(im, inst) for im in flat])
    photo = asked == world.PHOTO_SCENE
    other = ~photo
    ok = other & right
    return {"scene_photo": float(right[photo].mean()), "scene_other": float(right[other].mean()),
            "inst": float(dist.mean()), "inst_photo": float(dist[photo].mean()),
            "inst_other": float(dist[other].mean()),
            "inst_other|ok": float(dist[ok].mean()) if ok.any() else float("nan"),
            "both_other": float((ok & (dist < tq.toy_scores.BOTH_THRESHOLD)).mean() / other.mean())}


# ---------------------------------------------------------------------------------------
# the identifier: its embedding row and how the text encoder reads it


def pooled(tokenizer, text_encoder, texts: list[str]) -> torch.Tensor:
    """(B, D) pooled (end-of-text) outputs of the text encoder."""
    ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        return text_encoder(ids).pooler_output


def identifier_stats(tokenizer, text_encoder, row0: torch.Tensor, inst: world.Instance,
                     scenes: list[str]) -> dict[str, float]:
    """emb_moved: |row - row0| / |row0| of the identifier's embedding row; cos_own / cos_others:
    mean cosine of "a sks [class] [scene]" with "a [own colour] [class] [scene]" / other colours."""
    row = text_encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(ID)].detach()
    sks = torch.nn.functional.normalize(pooled(tokenizer, text_encoder, prompt_texts("sks", inst, scenes)), dim=-1)
    cos = {}
    for colour in world.COLOURS:
        texts = [world.caption(inst.class_noun, colour, s) for s in scenes]
        other = torch.nn.functional.normalize(pooled(tokenizer, text_encoder, texts), dim=-1)
        cos[colour] = float((sks * other).sum(-1).mean())
    others = [v for c, v in cos.items() if c != inst.colour]
    return {"emb_moved": float((row - row0).norm() / row0.norm()), "cos_own": cos[inst.colour],
            "cos_others": float(np.mean(others))}


# ---------------------------------------------------------------------------------------
# one training row: DreamBooth with checkpoints


class Probe:
    """Trainer callback: at each checkpoint, sample every prompt kind in every scene and score."""

    def __init__(self, cfg: JobConfig, inst: world.Instance, scenes: list[str], checkpoints: tuple[int, ...],
                 prompts: tuple[str, ...] = tuple(PROMPTS)):
        self.cfg, self.inst, self.scenes, self.checkpoints, self.prompts = cfg, inst, scenes, checkpoints, prompts
        self.trainer, self.row0, self.records, self.eval_seconds = None, None, [], 0.0

    def on_step(self, step: int, terms: dict, lr: float) -> None:
        if step not in self.checkpoints:
            return
        t0, tr = time.perf_counter(), self.trainer
        tr.unet.eval()
        tr.text_encoder.eval()
        ident = identifier_stats(tr.tokenizer, tr.text_encoder, self.row0, self.inst, self.scenes)
        for kind in self.prompts:
            images = tq._sample(tr.components, self.cfg, prompt_texts(kind, self.inst, self.scenes),
                                self.cfg.sampler.guidance_scale)
            self.records.append({"step": step, "prompt": kind, **ident,
                                 **exact_split(images, self.inst, self.scenes)})
        tr.unet.train()
        tr.text_encoder.train(self.cfg.train.train_text_encoder)
        self.eval_seconds += time.perf_counter() - t0


def train_row(cfg: JobConfig, inst: world.Instance, photos: tuple[str, ...], scenes: list[str],
              checkpoints: tuple[int, ...], prompts: tuple[str, ...] = tuple(PROMPTS)) -> dict:
    from comfusion.config import SubjectSpec  # noqa: PLC0415
    from comfusion.data import check_subject  # noqa: PLC0415
    from comfusion.train import Priors, SubjectTrainer, obtain_priors  # noqa: PLC0415

    t0 = time.perf_counter()
    spec = SubjectSpec(id=tq.subject_id(inst), images=photos, class_noun=inst.class_noun, identifier=ID,
                       scenes=tuple(cfg.data.scenes))
    subject = check_subject(spec, cfg.data, cfg.model.resolution)
    found = obtain_priors(cfg, subject, device="cpu")
    probe = Probe(cfg, inst, scenes, checkpoints, prompts)
    trainer = SubjectTrainer(cfg, subject, Priors(found.latents, list(found.prompts), list(found.scenes)),
                             device="cpu", callbacks=probe)
    probe.trainer = trainer
    probe.row0 = trainer.text_encoder.get_input_embeddings().weight[trainer.tokenizer.convert_tokens_to_ids(ID)]
    probe.row0 = probe.row0.detach().clone()
    terms = trainer.run()
    return {"records": probe.records, "terms": terms,
            "train_seconds": time.perf_counter() - t0 - probe.eval_seconds, "eval_seconds": probe.eval_seconds}


@torch.no_grad()
def redraw(base: dict, z0: torch.Tensor, prompts: list[str], strength: float, steps: int, guidance: float,
           seed: int = 0) -> np.ndarray:
    """Scaled latents (N, 4, h, w) of pictures, noised to `strength` of a `steps`-step DDIM schedule and
    denoised with `prompts`, as (N, H, W, 3) pictures: what the base draws once it is given an instance's
    layout and colours (its rendering ceiling, as against what it can be told in words)."""
    from diffusers import DDIMScheduler  # noqa: PLC0415

    from comfusion.sampling import decode_latents, encode_text  # noqa: PLC0415

    vae, unet = base["vae"], base["unet"]
    sched = DDIMScheduler.from_config(base["scheduler"].config)
    sched.set_timesteps(steps)
    timesteps = sched.timesteps[steps - max(1, round(strength * steps)):]
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(seed))
    z = sched.add_noise(z0, noise, timesteps[:1].repeat(len(z0)))
    cond = torch.cat([encode_text(base["tokenizer"], base["text_encoder"], [""] * len(prompts)),
                      encode_text(base["tokenizer"], base["text_encoder"], prompts)])
    for t in timesteps:
        eps_u, eps_c = unet(torch.cat([z, z]), t, encoder_hidden_states=cond).sample.chunk(2)
        z = sched.step(eps_u + guidance * (eps_c - eps_u), t, z).prev_sample
    return decode_latents(vae, z)


def reference_rows(cfg: JobConfig, inst: world.Instance, scenes: list[str]) -> dict[str, dict]:
    """The rows without training, one record each."""
    from comfusion.models import load_base  # noqa: PLC0415
    from comfusion.sampling import decode_latents  # noqa: PLC0415
    from comfusion.toy.pretrain import encode_pool  # noqa: PLC0415

    n, res = cfg.eval.images_per_prompt, cfg.model.resolution
    other = world.make_instance(inst.seed + 7_777, inst.class_noun)
    render = {k: np.stack([np.stack([world.render(obj, s, 70_000 + i, res) for i in range(n)]) for s in scenes])
              for k, obj in (("real", inst), ("other", other))}
    base = load_base(cfg.model.base)
    g = cfg.sampler.guidance_scale
    z = encode_pool(base["vae"], render["real"].reshape(-1, res, res, 3)) * base["vae"].config.scaling_factor
    render["vae"] = decode_latents(base["vae"], z).reshape(render["real"].shape)
    colour_prompts = [p for p in prompt_texts("colour", inst, scenes) for _ in range(n)]
    render["redraw"] = redraw(base, z, colour_prompts, REDRAW_STRENGTH, cfg.sampler.steps, g).reshape(
        render["real"].shape)
    render["base_colour"] = tq._sample(base, cfg, prompt_texts("colour", inst, scenes), g)
    render["base_sks"] = tq._sample(base, cfg, prompt_texts("sks", inst, scenes), g)
    return {k: exact_split(v, inst, scenes) for k, v in render.items()}


# ---------------------------------------------------------------------------------------
# driving it: tasks written as they finish, then the table


def run(args, cfg: JobConfig, out: Path) -> None:
    instances = tq.held_out_instances(args.instances, args.instance_offset)
    photos = tq.write_photos(instances, out / "photos", cfg.model.resolution, args.photos)
    scenes = [world.PHOTO_SCENE] + [s for s in cfg.data.scenes if s != world.PHOTO_SCENE]
    for inst in instances:
        sid = tq.subject_id(inst)
        path = out / "tasks" / f"{sid}--refs.json"
        if not path.exists():
            _write(path, {"instance": sid, "refs": reference_rows(cfg, inst, scenes)})
            say(f"{sid}: reference rows done")
        for row in args.rows:
            path = out / "tasks" / f"{sid}--{row}{task_suffix(args.photos)}.json"
            if path.exists():
                continue
            rcfg = cfg.replace(**ROWS[row][1], **{"train.steps": max(args.checkpoints)})
            result = train_row(rcfg, inst, photos[sid], scenes, tuple(args.checkpoints), tuple(args.prompts))
            _write(path, {"instance": sid, "row": row, "photos": rcfg.train.num_instance_images, **result})
            say(f"{sid} {row}: train {result['train_seconds']:.0f} s, sampling and scoring "
                f"{result['eval_seconds']:.0f} s")


def task_suffix(photos: int) -> str:
    """Task files of runs on more than one photo are kept apart ("--p3"); one photo keeps the old names."""
    return "" if photos == 1 else f"--p{photos}"


def _write(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _mean(recs: list[dict], col: str) -> float:
    vals = [r[col] for r in recs if col in r and np.isfinite(r[col])]
    return float(np.mean(vals)) if vals else float("nan")


def table(folder: Path) -> str:
    """Mean over instances: the reference rows, then every (row, step, prompt)."""
    files = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    refs = [f["refs"] for f in files if "refs" in f]
    trained = [f for f in files if "row" in f]
    n_inst = len({f["instance"] for f in files})
    head = ["row", "n", "step", "prompt"] + [h for _, h in COLUMNS] + ["sks emb moved", "cos(sks, own colour)",
                                                                 "cos(sks, other colours)", "train s"]
    lines = [f"{n_inst} instances; mean over the n instances each row ran on", "",
             "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for key, label in REFS.items():
        recs = [r[key] for r in refs if key in r]
        if recs:
            lines.append(f"| {label} | {len(recs)} | - | - | " + " | ".join(f"{_mean(recs, c):.3f}" for c, _ in COLUMNS)
                         + " | - | - | - | - |")
    kept = sorted({(f["row"], f.get("photos", 1)) for f in trained}, key=lambda k: (list(ROWS).index(k[0]), k[1]))
    for row, photos in kept:  # a row per (row, photos): runs on several photos stand apart
        runs = [f for f in trained if f["row"] == row and f.get("photos", 1) == photos]
        label = ROWS[row][0] + (f", {photos} photos" if photos > 1 else "")
        for step in sorted({r["step"] for f in runs for r in f["records"]}):
            for kind in PROMPTS:
                recs = [r for f in runs for r in f["records"] if r["step"] == step and r["prompt"] == kind]
                if not recs:
                    continue
                cells = [f"{_mean(recs, c):.3f}" for c, _ in COLUMNS]
                cells += [f"{_mean(recs, c):.3f}" for c in ("emb_moved", "cos_own", "cos_others")]
                secs = np.mean([f["train_seconds"] for f in runs]) if step == max(r["step"] for f in runs
                                                                                    for r in f["records"]) else None
                cells.append(f"{secs:.0f}" if secs is not None else "")
                lines.append(f"| {label} | {len(recs)} | {step} | {PROMPTS[kind]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs" / "toy_quality.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for every row, e.g. --set sampler.guidance_scale=3 (repeatable)")
    ap.add_argument("--instances", type=int, default=3, help="held-out instances (toy_quality's seeds)")
    ap.add_argument("--instance-offset", type=int, default=0, help="another part of the held-out range")
    ap.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS), metavar="ROW",
                    help=f"rows to train, from {', '.join(ROWS)} (default: all)")
    ap.add_argument("--checkpoints", nargs="+", type=int, default=[50, 150, 300],
                    help="steps at which to sample and score (training runs to the largest)")
    ap.add_argument("--prompts", nargs="+", choices=list(PROMPTS), default=list(PROMPTS),
                    help="prompt kinds sampled at each checkpoint: sks = 'a sks [class] [scene]', sks+colour adds "
                         "the instance's colour word (default: both)")
    ap.add_argument("--photos", type=int, default=1, choices=range(1, tq.N_REFERENCE_PHOTOS + 1), metavar="N",
                    help=f"train on the first N room photos of each instance (1 to {tq.N_REFERENCE_PHOTOS}; default 1)")
    ap.add_argument("--priors", type=int, help="priors.count per class (default: the config's)")
    ap.add_argument("--scenes", type=int, help="use the first N scenes of data.scenes besides the photo's")
    ap.add_argument("--images-per-scene", type=int, help="eval.images_per_prompt (default: the config's)")
    ap.add_argument("--out", default=str(REPO / "outputs" / "toy_base"), help="output folder")
    ap.add_argument("--report-only", action="store_true", help="no training: the table from finished tasks")
    args = ap.parse_args(argv)
    for name in ("instances", "priors", "scenes", "images_per_scene"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if min(args.checkpoints) < 1:
        ap.error("--checkpoints must be >= 1")
    args.out = str(Path(args.out).resolve())
    return args


def build_config(args: argparse.Namespace) -> JobConfig:
    """toy_quality's config (its overrides, scene and prior options and checks), DreamBooth, the
    config's own steps (the checkpoints sample along them)."""
    vars(args).setdefault("steps", None)
    return tq.build_config(args).replace(method="dreambooth")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = build_config(args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    out = Path(args.out)
    if not args.report_only:
        say(f"{args.instances} instances, rows {args.rows}, checkpoints {args.checkpoints}, "
            f"{len(cfg.data.scenes) + 1} scenes x {cfg.eval.images_per_prompt} images")
        run(args, cfg, out)
    if not (out / "tasks").is_dir():
        print(f"error: no finished tasks under {out / 'tasks'}", file=sys.stderr)
        return 1
    text = table(out / "tasks")
    (out / "table.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
