"""Pretrain the `toy` base model on the procedural world (issue 8), on a CPU.

    python -m comfusion.toy.pretrain --out comfusion/presets/toy --minutes 45 --seed 0
    python -m comfusion.toy.pretrain --out /tmp/toy --steps 20 --vae-steps 20 --pool 256  # quick run
    python -m comfusion.toy.pretrain --out comfusion/presets/toy --identifiers-only  # no training

The components have SD 1.5's types (AutoencoderKL, UNet2DConditionModel, CLIPTextModel with
the project's byte tokenizer, DDIM with SD 1.5's betas), so everything downstream runs
unchanged; only the shapes are small (TOY_PRESET). Two stages:
1. the autoencoder (downsample factor 2: 32x32x3 pixels <-> 16x16x4 latents) learns to
   reconstruct world pictures; its `scaling_factor` is then set so latents have unit std;
2. the UNet and text encoder learn eps-prediction on the latents of captioned pictures,
   with 10% empty captions for classifier-free guidance; the saved weights are an EMA.
Both train on one pool of pictures rendered at the start (`--pool`). Afterwards it samples
"a [colour] [class noun] [scene]" for every scene, prints how often the exact judge
`world.scene_of` finds the asked scene, and writes the pictures to preview.png.

The tokenizer reserves the identifier tokens (`comfusion.prompts.IDENTIFIER_TOKENS`); no caption
uses them, so their embedding rows keep the values `models.add_identifier_tokens` draws (up to
weight decay). `--identifiers-only` adds them to an already trained folder (the committed preset
was pretrained before they existed): tokenizer and text-encoder rows, nothing else changes.

Reproducible: the same seed and step counts give the same weights (on the same torch build
and thread count). `--minutes` times a few probe steps first and turns the budget into
step counts, which are printed and written to `pretrain_log.json` together with the
command that repeats the run exactly.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler
from PIL import Image

from comfusion.losses import add_noise
from comfusion.models import (
    BasePreset,
    add_identifier_tokens,
    build_base_components,
    build_byte_tokenizer,
    save_base,
    sd15_scheduler_config,
)
from comfusion.prompts import IDENTIFIER_TOKENS
from comfusion.sampling import image_grid, sample
from comfusion.toy import world

# Shapes of the `toy` base model, in the form of `comfusion.models.BasePreset(**TOY_PRESET)`.
# 3.79M parameters (UNet 3.38M, VAE 0.22M, text encoder 0.19M): 15.2 MB as fp32 safetensors,
# which leaves room for the toy judges (2.2 MB) under 20 MB. The UNet works on 16x16x4 latents
# and puts attention only at 8x8 and 4x4, where it is cheap; its 16x16 level has 32 channels,
# because that level costs most of the compute on a CPU.
TOY_PRESET: dict = dict(
    unet=dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 112),
              down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
              up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
              cross_attention_dim=64, attention_head_dim=4, norm_num_groups=16),
    vae=dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32),
             down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
             up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), layers_per_block=1,
             norm_num_groups=16, sample_size=32),
    text=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
              max_position_embeddings=77, projection_dim=64, hidden_act="quick_gelu"),
    resolution=32,
)


@dataclass(frozen=True)
class PretrainConfig:
    """One pretraining run. Step counts of None are planned from `minutes`."""

    seed: int = 0
    minutes: float = 45.0  # wall-clock budget for both stages, data rendering included
    steps: int | None = None  # UNet steps
    vae_steps: int | None = None  # autoencoder steps
    vae_share: float = 0.15  # share of the training time given to the autoencoder
    pool: int = 40_000  # captioned pictures rendered once and trained on
    batch_size: int = 32
    lr: float = 1e-3  # UNet + text encoder peak learning rate (cosine decay to 10%)
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6  # weight of the autoencoder's KL term (per-picture sum), as in SD
    p_uncond: float = 0.1  # share of empty captions (classifier-free guidance)
    ema_decay: float = 0.999
    log_every: int = 50
    eval_per_scene: int = 5  # pictures sampled per scene after training, judged by `world.scene_of`
    sample_steps: int = 30  # DDIM steps of those pictures
    guidance_scale: float = 7.5
    init: str | None = None  # continue from this trained base folder (its EMA weights) instead of random ones

    def __post_init__(self):
        if self.pool < self.batch_size:
            raise ValueError(f"pool ({self.pool}) must hold at least one batch ({self.batch_size})")
        if not 0 < self.vae_share < 1:
            raise ValueError("vae_share must lie in (0, 1)")


def build_toy_components(seed: int = 0, preset: dict = TOY_PRESET) -> dict:
    """Seeded random toy components (same seed, same weights), as `models.build_base_components`
    builds any preset: the tokenizer reserves the identifier tokens, whose embedding rows no
    caption trains (see `models.add_identifier_tokens` for how they start)."""
    return build_base_components(BasePreset(**preset), seed)


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def render_pool(n: int, size: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """n captioned world pictures: (n, size, size, 3) uint8 and their captions."""
    rng = np.random.default_rng([seed, 11])
    examples = [world.random_caption_image(rng, size) for _ in range(n)]
    return np.stack([im for im, _ in examples]), [c for _, c in examples]


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def cosine_lr(step: int, total: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def seconds_per_step(step: Callable[[int], float], probe: int = 8) -> float:
    """Mean wall time of `step`, over `probe` calls after one warm-up call.

    Probes train throwaway copies, so callers rebuild their models from the seed afterwards.
    """
    step(0)
    start = time.perf_counter()
    for i in range(probe):
        step(i + 1)
    return (time.perf_counter() - start) / probe


# ---------------------------------------------------------------------------------------
# stage 1: the autoencoder


def vae_step(vae: AutoencoderKL, opt: torch.optim.Optimizer, x: torch.Tensor, kl_weight: float) -> float:
    """One autoencoder step on x (B, 3, H, W): L1 + MSE reconstruction + KL. Returns the loss."""
    posterior = vae.encode(x).latent_dist
    recon = vae.decode(posterior.sample()).sample  # (B, 3, H, W)
    loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + kl_weight * posterior.kl().mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def train_vae(vae: AutoencoderKL, images: np.ndarray, cfg: PretrainConfig, steps: int, log=print) -> list[float]:
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(cfg.seed + 21)
    losses = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, cfg.vae_lr, warmup=min(50, steps // 10 + 1))
        idx = torch.randint(len(images), (cfg.batch_size,), generator=g).numpy()
        losses.append(vae_step(vae, opt, to_pixels(images[idx]), cfg.kl_weight))
        if step % cfg.log_every == 0 or step == steps - 1:
            log(f"vae  step {step:5d}/{steps}  loss {np.mean(losses[-cfg.log_every:]):.4f}")
    vae.eval()
    return losses


@torch.no_grad()
def encode_pool(vae: AutoencoderKL, images: np.ndarray, batch: int = 256) -> torch.Tensor:
    """Posterior means of all pictures, (N, 4, h, w), unscaled."""
    return torch.cat([vae.encode(to_pixels(images[i:i + batch])).latent_dist.mean
                      for i in range(0, len(images), batch)])


@torch.no_grad()
def reconstruction_psnr(vae: AutoencoderKL, images: np.ndarray) -> float:
    x = to_pixels(images)
    recon = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    mse = F.mse_loss((recon + 1) / 2, (x + 1) / 2)
    return float(10 * torch.log10(1 / mse))


# ---------------------------------------------------------------------------------------
# stage 2: the UNet and text encoder


def unet_step(parts: dict, opt: torch.optim.Optimizer, z0: torch.Tensor, ids: torch.Tensor,
              alphas_cumprod: torch.Tensor, g: torch.Generator) -> float:
    """One eps-prediction step on scaled latents z0 (B, 4, h, w) with token ids (B, 77)."""
    t = torch.randint(len(alphas_cumprod), (len(z0),), generator=g)  # (B,) in 0..999
    eps = torch.randn(z0.shape, generator=g)
    z_t = add_noise(z0, eps, t, alphas_cumprod)
    cond = parts["text_encoder"](ids)[0]  # (B, 77, D)
    loss = F.mse_loss(parts["unet"](z_t, t, encoder_hidden_states=cond).sample, eps)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for group in opt.param_groups for p in group["params"]], 1.0)
    opt.step()
    return float(loss.detach())


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def train_unet(parts: dict, latents: torch.Tensor, captions: list[str], cfg: PretrainConfig, steps: int,
               log=print) -> tuple[dict, list[float]]:
    """Train UNet + text encoder on (latents, captions); returns EMA copies and the losses."""
    ids = tokenize(parts["tokenizer"], captions)  # (N, 77)
    empty = tokenize(parts["tokenizer"], [""])[0]  # (77,)
    trained = {k: parts[k].train() for k in ("unet", "text_encoder")}
    ema = {k: copy.deepcopy(m).eval().requires_grad_(False) for k, m in trained.items()}
    params = [p for m in trained.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2)
    alphas_cumprod = DDIMScheduler(**sd15_scheduler_config()).alphas_cumprod  # (1000,)
    g = torch.Generator().manual_seed(cfg.seed + 31)
    losses = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, cfg.lr, warmup=min(200, steps // 10 + 1))
        idx = torch.randint(len(latents), (cfg.batch_size,), generator=g)
        batch_ids = ids[idx].clone()
        batch_ids[torch.rand(len(idx), generator=g) < cfg.p_uncond] = empty  # CFG: empty captions
        losses.append(unet_step(parts, opt, latents[idx], batch_ids, alphas_cumprod, g))
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))  # short runs: EMA warms up
        for k in trained:
            ema_update(ema[k], trained[k], decay)
        if step % cfg.log_every == 0 or step == steps - 1:
            log(f"unet step {step:5d}/{steps}  loss {np.mean(losses[-cfg.log_every:]):.4f}  "
                f"lr {opt.param_groups[0]['lr']:.2e}")
    return ema, losses


@torch.no_grad()
def evaluate_samples(parts: dict, cfg: PretrainConfig) -> tuple[dict, np.ndarray]:
    """Sample "a [colour] [class noun] [scene]" `eval_per_scene` times per scene and let the
    exact judge say which scene each picture shows. Returns the accuracies and a grid
    (one row per scene)."""
    rng = np.random.default_rng([cfg.seed, 91])
    scenes = [s for s in world.WORLD_SCENES for _ in range(cfg.eval_per_scene)]
    prompts = [world.caption(world.CLASS_NOUNS[i % len(world.CLASS_NOUNS)], str(rng.choice(list(world.COLOURS))), s)
               for i, s in enumerate(scenes)]
    images = sample(parts, prompts, list(range(len(prompts))), steps=cfg.sample_steps,
                    guidance_scale=cfg.guidance_scale, batch_size=32).images
    right = np.array([world.scene_of(im)[0] == s for im, s in zip(images, scenes)])
    per_scene = {s: float(right[i * cfg.eval_per_scene:(i + 1) * cfg.eval_per_scene].mean())
                 for i, s in enumerate(world.WORLD_SCENES)}
    result = dict(scene_accuracy=float(right.mean()), per_scene=per_scene, chance=1 / len(world.WORLD_SCENES),
                  sample_steps=cfg.sample_steps, guidance_scale=cfg.guidance_scale)
    return result, image_grid(images, cfg.eval_per_scene)


# ---------------------------------------------------------------------------------------
# the run


def _probe_vae(cfg: PretrainConfig, images: np.ndarray) -> tuple[Callable[[int], float], AutoencoderKL]:
    vae = build_toy_components(cfg.seed)["vae"].train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr)
    return (lambda i: vae_step(vae, opt, to_pixels(images[:cfg.batch_size]), cfg.kl_weight)), vae


def _probe_unet_step(cfg: PretrainConfig) -> Callable[[int], float]:
    parts = build_toy_components(cfg.seed)
    params = list(parts["unet"].parameters()) + list(parts["text_encoder"].parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    h = TOY_PRESET["unet"]["sample_size"]
    z0, ids = torch.randn(cfg.batch_size, 4, h, h), tokenize(parts["tokenizer"], ["a red ball"] * cfg.batch_size)
    acp, g = parts["scheduler"].alphas_cumprod, torch.Generator().manual_seed(0)
    return lambda i: unet_step(parts, opt, z0, ids, acp, g)


RESERVE_SECONDS = 60.0  # sampling the evaluation pictures and saving


def plan(cfg: PretrainConfig, images: np.ndarray, seconds_left: float, log=print) -> tuple[int, int]:
    """(vae_steps, unet_steps). Given counts are kept; with no UNet count, the steps are
    planned from probe timings to fill `seconds_left` (less encoding the pool and RESERVE_SECONDS),
    the autoencoder taking `vae_share` of the training time unless its count is given."""
    if cfg.steps is not None:
        return (cfg.vae_steps if cfg.vae_steps is not None else cfg.steps), cfg.steps
    vae_probe, vae = _probe_vae(cfg, images)
    vae_s = seconds_per_step(vae_probe)
    start = time.perf_counter()
    encode_pool(vae, images[:256])
    encode_s = (time.perf_counter() - start) * len(images) / min(256, len(images))
    train_s = max(1.0, seconds_left - encode_s - RESERVE_SECONDS)
    vae_steps = cfg.vae_steps if cfg.vae_steps is not None else max(1, int(cfg.vae_share * train_s / vae_s))
    unet_steps = max(1, int((train_s - vae_steps * vae_s) / seconds_per_step(_probe_unet_step(cfg))))
    log(f"planned {vae_steps} autoencoder steps and {unet_steps} UNet steps for {train_s / 60:.1f} min of training")
    return vae_steps, unet_steps


def load_toy_base(folder: str) -> dict:
    """The trained toy base in `folder`, to continue pretraining from; another model is refused."""
    from comfusion.models import load_base  # noqa: PLC0415

    parts = load_base(folder)
    if list(parts["unet"].config.block_out_channels) != list(TOY_PRESET["unet"]["block_out_channels"]):
        raise ValueError(f"--init {folder}: not a toy base "
                         f"(UNet channels {parts['unet'].config.block_out_channels})")
    return parts


def pretrain(cfg: PretrainConfig, out: str | Path, log=print) -> dict:
    """Render the pool, train both stages, save the toy base model into `out`; returns the log.

    With `cfg.init` the run continues a trained base: a fresh pool (rendered from `cfg.seed`), the
    autoencoder trained further only if `vae_steps` > 0 (its `scaling_factor` is then kept), and the
    UNet and text encoder from their saved EMA weights with a new warm-up and cosine decay."""
    t0 = time.perf_counter()
    size = TOY_PRESET["resolution"]
    parts = load_toy_base(cfg.init) if cfg.init else None  # a bad --init folder fails before any work
    images, captions = render_pool(cfg.pool, size, cfg.seed)
    t_pool = time.perf_counter() - t0
    log(f"rendered {cfg.pool} pictures in {t_pool:.1f} s")
    vae_steps, unet_steps = plan(cfg, images, cfg.minutes * 60 - t_pool, log)
    parts = parts or build_toy_components(cfg.seed)  # after planning, so the probes leave no trace

    t1 = time.perf_counter()
    vae_losses = train_vae(parts["vae"], images, cfg, vae_steps, log) if vae_steps else [float("nan")]
    t_vae = time.perf_counter() - t1
    latents = encode_pool(parts["vae"], images)  # (N, 4, 16, 16)
    if cfg.init is None:
        scaling = float(1 / latents.std())
        parts["vae"].register_to_config(scaling_factor=scaling)  # SD 1.5's 0.18215, measured here
    else:
        scaling = float(parts["vae"].config.scaling_factor)
    psnr = reconstruction_psnr(parts["vae"], render_pool(256, size, cfg.seed + 1)[0])
    log(f"autoencoder: {vae_steps} steps in {t_vae:.0f} s, held-out PSNR {psnr:.1f} dB, scaling {scaling:.4f}")

    t2 = time.perf_counter()
    ema, unet_losses = train_unet(parts, latents * scaling, captions, cfg, unet_steps, log)
    t_unet = time.perf_counter() - t2
    parts.update(ema)
    save_base(parts, out)
    samples = None
    if cfg.eval_per_scene > 0:
        samples, grid = evaluate_samples(parts, cfg)
        Image.fromarray(grid).save(Path(out) / "preview.png")
        log(f"samples: the exact judge finds the asked scene in {samples['scene_accuracy']:.0%} "
            f"(chance {samples['chance']:.0%}); grid in {Path(out) / 'preview.png'}")
    summary = dict(
        config=asdict(cfg), vae_steps=vae_steps, unet_steps=unet_steps,
        repeat=(f"python -m comfusion.toy.pretrain --out OUT --seed {cfg.seed} --pool {cfg.pool} "
                f"--batch-size {cfg.batch_size} --vae-steps {vae_steps} --steps {unet_steps} --lr {cfg.lr:g}"
                + (f" --init {cfg.init}" if cfg.init else "")),
        seconds=dict(render=t_pool, vae=t_vae, unet=t_unet, total=time.perf_counter() - t0),
        steps_per_second=dict(vae=vae_steps / max(t_vae, 1e-9), unet=unet_steps / max(t_unet, 1e-9)),
        parameters={k: parameter_count(parts[k]) for k in ("unet", "vae", "text_encoder")},
        vae_psnr_db=psnr, scaling_factor=scaling, samples=samples, torch_threads=torch.get_num_threads(),
        final_loss=dict(vae=float(np.mean(vae_losses[-100:])), unet=float(np.mean(unet_losses[-100:]))))
    (Path(out) / "pretrain_log.json").write_text(json.dumps(summary, indent=2))
    log(f"saved to {out} in {summary['seconds']['total'] / 60:.1f} min; to repeat: {summary['repeat']}")
    return summary


def reserve_identifiers(folder: str | Path, seed: int = 0, log=print) -> list[int]:
    """Add the identifier tokens to the trained base model in `folder` (tokenizer and text
    encoder rows, drawn as `models.add_identifier_tokens` says) and save both in place.

    The tokenizer is rebuilt (the byte tokenizer the folder was trained with, checked to be the
    same) rather than loaded, so its saved config holds no loading options."""
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: PLC0415

    folder = Path(folder)
    tokenizer = build_byte_tokenizer(identifiers=())
    trained = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    if {k: v for k, v in trained.get_vocab().items() if v < len(tokenizer)} != tokenizer.get_vocab():
        raise ValueError(f"{folder / 'tokenizer'} is not the project's byte tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder")
    ids = add_identifier_tokens(tokenizer, text_encoder, seed=seed)
    tokenizer.save_pretrained(folder / "tokenizer")
    text_encoder.save_pretrained(folder / "text_encoder")
    reserved = dict(zip(IDENTIFIER_TOKENS, tokenizer.convert_tokens_to_ids(list(IDENTIFIER_TOKENS))))
    log(f"reserved identifier tokens {reserved} in {folder} ({len(ids)} new rows)")
    return ids


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m comfusion.toy.pretrain", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder to write unet/ vae/ text_encoder/ tokenizer/ scheduler/ into")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--minutes", type=float, default=45.0, help="budget, when step counts are not given")
    p.add_argument("--steps", type=int, help="UNet steps (also the autoencoder's unless --vae-steps)")
    p.add_argument("--vae-steps", type=int, help="autoencoder steps")
    p.add_argument("--pool", type=int, default=PretrainConfig.pool, help="pictures rendered to train on")
    p.add_argument("--batch-size", type=int, default=PretrainConfig.batch_size)
    p.add_argument("--lr", type=float, default=PretrainConfig.lr, help="UNet and text encoder peak learning rate")
    p.add_argument("--init", help="continue from the trained base in this folder (e.g. comfusion/presets/toy) "
                                  "instead of random weights; use another --seed for a fresh pool")
    p.add_argument("--log-every", type=int, default=PretrainConfig.log_every)
    p.add_argument("--eval-per-scene", type=int, default=PretrainConfig.eval_per_scene,
                   help="pictures sampled per scene after training and judged (0: none)")
    p.add_argument("--sample-steps", type=int, default=PretrainConfig.sample_steps)
    p.add_argument("--guidance-scale", type=float, default=PretrainConfig.guidance_scale)
    p.add_argument("--identifiers-only", action="store_true",
                   help="no training: add the identifier tokens to the trained model in --out")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = _parse_args(argv)
    if a.identifiers_only:
        reserve_identifiers(a.out, a.seed, log=lambda msg: print(msg, flush=True))
        return 0
    cfg = PretrainConfig(seed=a.seed, minutes=a.minutes, steps=a.steps, vae_steps=a.vae_steps, pool=a.pool,
                         batch_size=a.batch_size, lr=a.lr, init=a.init, log_every=a.log_every,
                         eval_per_scene=a.eval_per_scene,
                         sample_steps=a.sample_steps, guidance_scale=a.guidance_scale)
    pretrain(cfg, a.out, log=lambda msg: print(msg, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
