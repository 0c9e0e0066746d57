"""Train the toy judges of the procedural world (issue 8): a CLIP and a DINO-role instance encoder.

    python -m comfusion.toy.judges --out comfusion/presets/toy --minutes 20 --seed 0
    python -m comfusion.toy.judges --out /tmp/judges --steps 5 --pool 128 --eval 32  # quick run
    python -m comfusion.toy.judges --out comfusion/presets/toy-heldout --seed 1 --save-dtype fp16 ...  # held out

* CLIP (`transformers.CLIPModel`, tiny towers, the byte tokenizer): contrastive on world
  pictures and captions. Captions may leave out the colour or the scene, so a batch holds
  several true captions per picture; the targets say which (a caption matches a picture when
  every word it has is true of it).
* DINO's role (`transformers.ViTModel`, CLS token): contrastive over instance ids, two views
  of each instance per batch (different scene, position, scale), so one instance's
  pictures embed close and other instances' apart, whatever the background.

Both train through `comfusion.judges.Judges`, the same preprocessing the fusion losses and
the metrics use, on pictures that are sometimes blurred and noised like a small model's
samples. Another seed gives other initial weights, other training pictures and another data order:
the committed `toy-heldout` judges (seed 1, saved in fp16 to fit the preset budget) are such a
pair, which no loss uses, so they score without having been optimised against. The script prints
held-out retrieval accuracy for each and saves them in the layout
`comfusion.models.load_judges` reads (dino/ and clip/), plus judges_log.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from comfusion.judges import Judges
from comfusion.models import build_judge_components, save_judges
from comfusion.toy import world
from comfusion.toy.pretrain import cosine_lr, parameter_count, seconds_per_step, to_pixels

# Shapes in the form of `comfusion.models.JUDGE_PRESETS` (32x32 inputs, 4x4 patches).
TOY_JUDGE_PRESET: dict = dict(
    dino=dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256,
              image_size=32, patch_size=4),
    clip_text=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4),
    clip_vision=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                     image_size=32, patch_size=4),
    projection_dim=64,
)
EVAL_SEED_OFFSET = 1_000_000  # held-out instances: HELD_OUT_SEED_START + this + k


@dataclass(frozen=True)
class JudgesConfig:
    """One judges run. Step counts of None are planned from `minutes` (split evenly)."""

    seed: int = 0
    minutes: float = 20.0
    clip_steps: int | None = None
    dino_steps: int | None = None
    pool: int = 12_000  # CLIP: captioned pictures; DINO: pool // 4 instances x 4 views
    batch_size: int = 128  # CLIP pictures, or DINO instances x 2 views
    lr: float = 1e-3
    temperature: float = 0.1  # of the instance contrastive loss
    p_degrade: float = 0.5  # share of training pictures blurred and noised
    eval_size: int = 400  # held-out pictures (CLIP) and instances (DINO)
    log_every: int = 50
    save_dtype: str = "fp32"  # "fp16" halves the files; loading upcasts (load_judges' dtype)


def build_toy_judges(seed: int = 0, preset: dict = TOY_JUDGE_PRESET) -> Judges:
    """Seeded random toy judges; trainable (the `Judges` wrapper freezes them, this unfreezes)."""
    parts = build_judge_components(preset, seed)
    return Judges(parts["dino"], parts["clip"], parts["clip_tokenizer"]).requires_grad_(True)


def degrade(x: torch.Tensor, p: float, g: torch.Generator) -> torch.Tensor:
    """Blur (2x down and up) and noise a random share p of the pictures x (B, 3, H, W) in [-1, 1]."""
    pick = (torch.rand(len(x), generator=g) < p).view(-1, 1, 1, 1)
    h = x.shape[-1]
    blurred = F.interpolate(F.avg_pool2d(x, 2), size=(h, h), mode="bilinear", align_corners=False)
    noisy = blurred + torch.rand(len(x), 1, 1, 1, generator=g) * 0.1 * torch.randn(x.shape, generator=g)
    return torch.where(pick, noisy, x)


def _step(opt: torch.optim.Optimizer, loss: torch.Tensor) -> float:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def _train(name: str, loss_fn: Callable[[int], torch.Tensor], params, cfg: JudgesConfig, steps: int,
           log) -> list[float]:
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.05)
    losses = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, cfg.lr, warmup=min(100, steps // 10 + 1))
        losses.append(_step(opt, loss_fn(step)))
        if step % cfg.log_every == 0 or step == steps - 1:
            log(f"{name} step {step:5d}/{steps}  loss {np.mean(losses[-cfg.log_every:]):.4f}")
    return losses


# ---------------------------------------------------------------------------------------
# CLIP


def caption_matches(texts: list[str], truths: list[tuple[str, str, str]]) -> torch.Tensor:
    """(B_images, B_texts) bool: every word of text j is true of picture i (colour, class, scene)."""
    attrs = [world.parse_caption(t) for t in texts]
    return torch.tensor([[a[1] == cls and a[0] in (None, col) and a[2] in (None, scn) for a in attrs]
                         for col, cls, scn in truths])


def clip_loss(judges: Judges, x: torch.Tensor, texts: list[str], match: torch.Tensor) -> torch.Tensor:
    """Symmetric contrastive loss with soft targets spread over all true captions / pictures."""
    img = F.normalize(judges.clip_image_embed(x), dim=-1)  # (B, P)
    txt = F.normalize(judges.clip_text_embed(texts), dim=-1)  # (B, P)
    logits = judges.clip.logit_scale.exp().clamp(max=100) * img @ txt.T  # (B, B)
    m = match.float()
    return 0.5 * (F.cross_entropy(logits, m / m.sum(1, keepdim=True))
                  + F.cross_entropy(logits.T, m.T / m.T.sum(1, keepdim=True)))


def clip_pool(n: int, seed: int, p_no_colour: float = 0.3, p_no_scene: float = 0.15):
    rng = np.random.default_rng([seed, 41])
    examples = [world.random_example(rng, p_no_colour=p_no_colour, p_no_scene=p_no_scene) for _ in range(n)]
    truths = [(e.instance.colour, e.instance.class_noun, e.scene) for e in examples]
    return np.stack([e.image for e in examples]), [e.caption for e in examples], truths


def clip_loss_fn(judges: Judges, pool, cfg: JudgesConfig) -> Callable[[int], torch.Tensor]:
    images, texts, truths = pool
    g = torch.Generator().manual_seed(cfg.seed + 51)

    def loss(step: int) -> torch.Tensor:
        idx = torch.randperm(len(images), generator=g)[: cfg.batch_size].numpy()
        batch_texts = [texts[i] for i in idx]
        match = caption_matches(batch_texts, [truths[i] for i in idx])
        return clip_loss(judges, degrade(to_pixels(images[idx]), cfg.p_degrade, g), batch_texts, match)
    return loss


ALL_CAPTIONS = tuple(world.caption(noun, colour, scene) for noun in world.CLASS_NOUNS
                     for colour in world.COLOURS for scene in world.WORLD_SCENES)


@torch.no_grad()
def clip_retrieval(judges: Judges, n: int, seed: int) -> dict[str, float]:
    """Held-out picture -> caption retrieval among all full captions: top-1 and per-word accuracy."""
    images, _, truths = clip_pool(n, seed + 99, p_no_colour=0.0, p_no_scene=0.0)
    txt = F.normalize(judges.clip_text_embed(list(ALL_CAPTIONS)), dim=-1)  # (C, P)
    img = F.normalize(torch.cat([judges.clip_image_embed(to_pixels(images[i:i + 256]))
                                 for i in range(0, n, 256)]), dim=-1)  # (n, P)
    best = [world.parse_caption(ALL_CAPTIONS[j]) for j in (img @ txt.T).argmax(1).tolist()]  # (colour, class, scene)
    right = np.array([[b[k] == t[k] for k in range(3)] for b, t in zip(best, truths)])  # (n, 3)
    return dict(caption_top1=float(right.all(1).mean()), colour=float(right[:, 0].mean()),
                class_noun=float(right[:, 1].mean()), scene=float(right[:, 2].mean()), chance=1 / len(ALL_CAPTIONS))


# ---------------------------------------------------------------------------------------
# the instance encoder (DINO's role)


def instance_pool(n_instances: int, views: int, seed: int) -> np.ndarray:
    """(n_instances, views, H, W, 3): random training instances, each in `views` different scenes."""
    rng = np.random.default_rng([seed, 61])
    out = []
    for _ in range(n_instances):
        obj = world.make_instance(int(rng.integers(world.HELD_OUT_SEED_START)))
        scenes = rng.choice(len(world.WORLD_SCENES), size=views, replace=False)
        out.append(np.stack([world.render(obj, world.WORLD_SCENES[s], int(rng.integers(2**31))) for s in scenes]))
    return np.stack(out)


def instance_loss(judges: Judges, a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent over instance ids: a[i] and b[i] (B, 3, H, W) show instance i; all else are negatives."""
    z = F.normalize(judges.dino_embed(torch.cat([a, b])), dim=-1)  # (2B, D)
    logits = z @ z.T / temperature
    logits = logits.masked_fill(torch.eye(len(z), dtype=torch.bool), float("-inf"))
    n = len(a)
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(logits, target)


def dino_loss_fn(judges: Judges, pool: np.ndarray, cfg: JudgesConfig) -> Callable[[int], torch.Tensor]:
    g = torch.Generator().manual_seed(cfg.seed + 71)
    n_inst, views = pool.shape[:2]
    b = min(cfg.batch_size // 2, n_inst)

    def loss(step: int) -> torch.Tensor:
        idx = torch.randperm(n_inst, generator=g)[:b].numpy()
        va = torch.randint(views, (b,), generator=g).numpy()
        vb = (va + torch.randint(1, views, (b,), generator=g).numpy()) % views  # another view
        x_a = degrade(to_pixels(pool[idx, va]), cfg.p_degrade, g)
        x_b = degrade(to_pixels(pool[idx, vb]), cfg.p_degrade, g)
        return instance_loss(judges, x_a, x_b, cfg.temperature)
    return loss


@torch.no_grad()
def dino_retrieval(judges: Judges, n: int) -> dict[str, float]:
    """Held-out instances: a picture in a random scene -> the instance's photo (PHOTO_SCENE) among n photos."""
    first = world.HELD_OUT_SEED_START + EVAL_SEED_OFFSET
    instances = [world.make_instance(first + k) for k in range(n)]
    gallery = np.stack([world.instance_photos(obj, 1)[0] for obj in instances])
    rng = np.random.default_rng(first)
    others = [s for s in world.WORLD_SCENES if s != world.PHOTO_SCENE]
    queries = np.stack([world.render(obj, others[int(rng.integers(len(others)))], int(rng.integers(2**31)))
                        for obj in instances])
    embed = lambda x: F.normalize(judges.dino_embed(to_pixels(x)), dim=-1)  # noqa: E731
    sim = embed(queries) @ embed(gallery).T  # (n, n)
    classes = np.array([obj.class_noun for obj in instances])
    same_class = torch.from_numpy(classes[:, None] == classes[None])
    return dict(top1=float((sim.argmax(1) == torch.arange(n)).float().mean()),
                top1_same_class=float((sim.masked_fill(~same_class, -2).argmax(1) == torch.arange(n)).float().mean()),
                chance=1 / n)


# ---------------------------------------------------------------------------------------
# the run


def _plan(cfg: JudgesConfig, clip_data, dino_data, seconds: float, log) -> tuple[int, int]:
    """(clip_steps, dino_steps): given ones kept, missing ones share the time left evenly."""
    steps = [cfg.clip_steps, cfg.dino_steps]
    missing = [i for i, s in enumerate(steps) if s is None]
    for i in missing:  # probes train throwaway judges; the real ones are built after
        probe = build_toy_judges(cfg.seed)
        fn = clip_loss_fn(probe, clip_data, cfg) if i == 0 else dino_loss_fn(probe, dino_data, cfg)
        opt = torch.optim.AdamW(probe.parameters(), lr=cfg.lr)
        steps[i] = max(1, int(seconds / len(missing) / seconds_per_step(lambda k: _step(opt, fn(k)))))
    if missing:
        log(f"planned {steps[0]} CLIP steps and {steps[1]} instance-encoder steps for {seconds / 60:.1f} min")
    return steps[0], steps[1]


def train_judges(cfg: JudgesConfig, out: str | Path, log=print) -> dict:
    """Render the pools, train both judges, print held-out retrieval, save into `out`."""
    t0 = time.perf_counter()
    clip_data = clip_pool(cfg.pool, cfg.seed)
    dino_data = instance_pool(max(2, cfg.pool // 4), 4, cfg.seed)
    t_pool = time.perf_counter() - t0
    log(f"rendered {cfg.pool} captioned pictures and {len(dino_data)} instances x 4 views in {t_pool:.1f} s")
    clip_steps, dino_steps = _plan(cfg, clip_data, dino_data, max(1.0, cfg.minutes * 60 - t_pool - 30), log)
    judges = build_toy_judges(cfg.seed)
    t1 = time.perf_counter()
    clip_losses = _train("clip", clip_loss_fn(judges, clip_data, cfg), judges.clip.parameters(), cfg, clip_steps, log)
    t2 = time.perf_counter()
    dino_losses = _train("dino", dino_loss_fn(judges, dino_data, cfg), judges.dino.parameters(), cfg, dino_steps, log)
    t3 = time.perf_counter()
    judges.requires_grad_(False)
    clip_acc, dino_acc = clip_retrieval(judges, cfg.eval_size, cfg.seed), dino_retrieval(judges, cfg.eval_size)
    log("CLIP held-out picture -> caption retrieval: " + ", ".join(f"{k} {v:.3f}" for k, v in clip_acc.items()))
    log("instance encoder held-out retrieval: " + ", ".join(f"{k} {v:.3f}" for k, v in dino_acc.items()))
    dtype = {"fp32": torch.float32, "fp16": torch.float16}[cfg.save_dtype]
    save_judges(dict(dino=judges.dino.to(dtype), clip=judges.clip.to(dtype), clip_tokenizer=judges.clip_tokenizer), out)
    summary = dict(
        config=asdict(cfg), clip_steps=clip_steps, dino_steps=dino_steps, clip_retrieval=clip_acc,
        dino_retrieval=dino_acc,
        repeat=(f"python -m comfusion.toy.judges --out OUT --seed {cfg.seed} --pool {cfg.pool} "
                f"--batch-size {cfg.batch_size} --clip-steps {clip_steps} --dino-steps {dino_steps} "
                f"--save-dtype {cfg.save_dtype}"),
        seconds=dict(render=t_pool, clip=t2 - t1, dino=t3 - t2, total=time.perf_counter() - t0),
        steps_per_second=dict(clip=clip_steps / max(t2 - t1, 1e-9), dino=dino_steps / max(t3 - t2, 1e-9)),
        parameters=dict(dino=parameter_count(judges.dino), clip=parameter_count(judges.clip)),
        final_loss=dict(clip=float(np.mean(clip_losses[-100:])), dino=float(np.mean(dino_losses[-100:]))),
        torch_threads=torch.get_num_threads())
    (Path(out) / "judges_log.json").write_text(json.dumps(summary, indent=2))
    log(f"saved to {out} in {summary['seconds']['total'] / 60:.1f} min; to repeat: {summary['repeat']}")
    return summary


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m comfusion.toy.judges", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder to write dino/ and clip/ into")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--minutes", type=float, default=JudgesConfig.minutes,
                   help="budget, when step counts are not given")
    p.add_argument("--steps", type=int, help="steps of each judge (unless --clip-steps / --dino-steps)")
    p.add_argument("--clip-steps", type=int)
    p.add_argument("--dino-steps", type=int)
    p.add_argument("--pool", type=int, default=JudgesConfig.pool, help="pictures rendered to train on")
    p.add_argument("--batch-size", type=int, default=JudgesConfig.batch_size)
    p.add_argument("--eval", type=int, default=JudgesConfig.eval_size, help="held-out pictures / instances")
    p.add_argument("--log-every", type=int, default=JudgesConfig.log_every)
    p.add_argument("--save-dtype", choices=("fp32", "fp16"), default=JudgesConfig.save_dtype,
                   help="dtype of the saved weights (training is fp32)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = _parse_args(argv)
    pick = lambda own: own if own is not None else a.steps  # noqa: E731
    cfg = JudgesConfig(seed=a.seed, minutes=a.minutes, clip_steps=pick(a.clip_steps), dino_steps=pick(a.dino_steps),
                       pool=a.pool, batch_size=a.batch_size, eval_size=a.eval, log_every=a.log_every,
                       save_dtype=a.save_dtype)
    train_judges(cfg, a.out, log=lambda msg: print(msg, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
