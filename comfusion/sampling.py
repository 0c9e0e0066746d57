"""The one sampler: DDIM with classifier-free guidance, a seed per image, batches of prompts.

Prior generation, validation, evaluation and serving all call `sample`.
"""
from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DDIMScheduler
from PIL import Image


class SamplingCancelled(RuntimeError):
    """The caller's `cancel` check returned True; sampling stopped before the next UNet call."""


@dataclass
class SampleOutput:
    images: np.ndarray  # (B, H, W, 3) uint8
    latents: torch.Tensor  # (B, 4, H/f, W/f) final denoised latents, VAE-scaled, float32 on CPU


def default_device(name: str | None = None) -> str:
    """The device to compute on: `name` when it names one ("cpu", "cuda", "cuda:1"); None or
    "auto": "cuda" when a GPU is visible, else "cpu"."""
    if name and name != "auto":
        return str(name)
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: torch.device | str) -> torch.dtype:
    """fp32 on the CPU; bf16 on CUDA where supported, else fp16."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def latent_size(components: dict, height: int, width: int) -> tuple[int, int]:
    factor = 2 ** (len(components["vae"].config.block_out_channels) - 1)
    if height % factor or width % factor:
        raise ValueError(f"height and width must be multiples of {factor}, got {height}x{width}")
    return height // factor, width // factor


def encode_text(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    """CLIP text embeddings (B, 77, D) of `prompts`, padded and truncated to 77 tokens."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids.to(text_encoder.device))[0]


def initial_noise(seeds: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """One CPU generator per image, so an image depends on its seed alone, not on its batch."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> np.ndarray:
    """VAE-scaled latents (B, 4, h, w) -> uint8 images (B, H, W, 3)."""
    x = vae.decode(latents.to(vae.device, vae.dtype) / vae.config.scaling_factor).sample
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (B, 3, H, W)
    return x.permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def _sample_batch(components: dict, prompts: list[str], seeds: list[int], steps: int,
                  guidance_scale: float, height: int, width: int,
                  cancel: Callable[[], bool] | None = None) -> torch.Tensor:
    unet, text_encoder, tokenizer = components["unet"], components["text_encoder"], components["tokenizer"]
    device, dtype = unet.device, unet.dtype
    # A fresh scheduler per call: set_timesteps mutates it, and Serve calls this concurrently.
    scheduler = DDIMScheduler.from_config(components["scheduler"].config)
    scheduler.set_timesteps(steps, device=device)
    cond = encode_text(tokenizer, text_encoder, prompts)  # (B, 77, D)
    guided = guidance_scale > 1.0
    if guided:
        uncond = encode_text(tokenizer, text_encoder, [""] * len(prompts))
        cond = torch.cat([uncond, cond])  # (2B, 77, D)
    h, w = latent_size(components, height, width)
    latents = initial_noise(seeds, (unet.config.in_channels, h, w)).to(device, dtype)
    latents = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        if cancel is not None and cancel():  # checked once per denoising step; no effect on the numbers
            raise SamplingCancelled(f"cancelled before timestep {int(t)}")
        model_in = torch.cat([latents] * 2) if guided else latents
        eps = unet(model_in, t, encoder_hidden_states=cond).sample
        if guided:
            eps_uncond, eps_cond = eps.chunk(2)
            eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
        latents = scheduler.step(eps, t, latents, eta=0.0).prev_sample
    return latents


def sample(components: dict, prompts: list[str], seeds: list[int], *, steps: int = 30,
           guidance_scale: float = 7.5, height: int | None = None, width: int | None = None,
           batch_size: int = 8, cancel: Callable[[], bool] | None = None) -> SampleOutput:
    """Generate one image per prompt, image i from `seeds[i]` (deterministic DDIM, eta = 0).

    `components` holds unet, vae, text_encoder, tokenizer and scheduler (as `load_base` gives);
    their device and dtype decide where and how it runs. Height and width default to the
    VAE's sample size. `cancel`, when given, is called before every denoising step and before
    decoding; when it returns True, `SamplingCancelled` is raised (Serve stops abandoned requests
    with it). Without a cancel the outputs are unchanged.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    if not prompts:
        raise ValueError("no prompts to sample")
    size = components["vae"].config.sample_size
    size = size[0] if isinstance(size, (list, tuple)) else size
    height, width = height or size, width or size
    latents = []
    for i in range(0, len(prompts), batch_size):
        latents.append(_sample_batch(components, list(prompts[i:i + batch_size]), list(seeds[i:i + batch_size]),
                                     steps, guidance_scale, height, width, cancel).float().cpu())
    if cancel is not None and cancel():
        raise SamplingCancelled("cancelled before decoding")
    z = torch.cat(latents)
    images = np.concatenate([decode_latents(components["vae"], z[i:i + batch_size])
                             for i in range(0, len(z), batch_size)])
    return SampleOutput(images=images, latents=z)


def to_pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(image, mode="RGB")


def png_bytes(image: np.ndarray) -> bytes:
    """PNG encoding of one (H, W, 3) uint8 image; deterministic for the same pixels."""
    buf = io.BytesIO()
    to_pil(image).save(buf, format="PNG")
    return buf.getvalue()


def image_grid(images: np.ndarray, cols: int | None = None) -> np.ndarray:
    """(B, H, W, 3) -> one (rows*H, cols*W, 3) grid image."""
    b, h, w, c = images.shape
    cols = cols or b
    rows = (b + cols - 1) // cols
    grid = np.zeros((rows * h, cols * w, c), dtype=images.dtype)
    for i, im in enumerate(images):
        r, k = divmod(i, cols)
        grid[r * h:(r + 1) * h, k * w:(k + 1) * w] = im
    return grid
