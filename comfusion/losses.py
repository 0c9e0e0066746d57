"""The ComFusion objective (paper sections 3.1 to 3.4, supplement A) as pure tensor functions.

Timesteps are 0-indexed (0..T-1) and `alphas_cumprod` (T,) is the scheduler's cumulative
product of (1 - beta), written alpha_t in the paper.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from comfusion.config import LossConfig
from comfusion.judges import Judges

FUSION_BACKPROP = ("all", "last")  # which UNet calls of f_theta carry gradients

# Eq. 6: the weight of each term, read from LossConfig; L_C^I has weight 1.
_WEIGHT_FIELDS = {
    "instance": None,
    "class_scene": "lambda_class_scene",
    "fusion_instance": "lambda_fusion_instance",
    "fusion_scene": "lambda_fusion_scene",
}


def _alpha(alphas_cumprod: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """alpha_t per batch element, shaped to broadcast against `like` (B, ...)."""
    a = alphas_cumprod[t].to(like.dtype)  # (B,)
    return a.view(-1, *([1] * (like.ndim - 1)))  # (B, 1, 1, 1)


def add_noise(z0: Tensor, eps: Tensor, t: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Forward process (supplement Eq. 2): z_t = sqrt(alpha_t) z_0 + sqrt(1 - alpha_t) eps.

    z0, eps: (B, C, H, W); t: (B,) integer timesteps, one per element; alphas_cumprod: (T,).
    Returns z_t (B, C, H, W).
    """
    a = _alpha(alphas_cumprod, t, z0)
    return a.sqrt() * z0 + (1 - a).sqrt() * eps


def instance_loss(eps_pred: Tensor, eps: Tensor) -> Tensor:
    """Eq. 1, instance finetune loss L_C^I: ||eps - eps_theta(z_t^I, t, Gamma(T^I))||^2.

    eps_pred, eps: (B, C, H, W). Returns the mean over all elements, a scalar (fp32).
    """
    return F.mse_loss(eps_pred.float(), eps.float())


def class_scene_loss(eps_pred: Tensor, eps: Tensor) -> Tensor:
    """Eq. 3, class-scene prior loss L_C^S: ||eps - eps_theta(z_t^CS, t, Gamma(T^CS))||^2.

    eps_pred, eps: (B, C, H, W). Returns the mean over all elements, a scalar (fp32).
    """
    return F.mse_loss(eps_pred.float(), eps.float())


def coarse_denoise(unet, z_t: Tensor, t: Tensor, encoder_hidden_states: Tensor,
                   alphas_cumprod: Tensor, tau: int, backprop: str = "all") -> Tensor:
    """Eq. 4 / supplement Eq. 8: the coarse denoising f_theta(z_t, T, tau), tau DDIM (eta=0) steps.

    Each level predicts eps = eps_theta(z_t, t, Gamma(T)) and the x0-prediction
    h = (z_t - sqrt(1 - alpha_t) eps) / sqrt(alpha_t) (supplement Eq. 6). With tau = 1 it
    returns h; otherwise it moves to t' = r(tau, t) = ceil(nu t / tau), nu = tau - 1,
    z_t' = sqrt(alpha_t') h + sqrt(1 - alpha_t') eps, and recurses with tau - 1. So t = 600,
    tau = 3 calls the UNet at 600, 400, 200.

    backprop: "all" keeps the graph through all tau calls (the design's reading of the paper);
    "last" runs the first tau - 1 calls without a graph, so the gradient reaches the UNet and
    the text embedding through the last call only (the same forward values, a cheaper backward:
    an ablation, `loss.fusion_backprop`).

    unet: called as `unet(sample, timestep, encoder_hidden_states).sample` (diffusers
    UNet2DConditionModel). z_t: (B, C, h, w); t: (B,) integer timesteps, may differ per
    element; encoder_hidden_states: (B, L, E) from T^IS; alphas_cumprod: (T,), same device.
    Returns the x0-prediction of the last call, (B, C, h, w).
    """
    if tau < 1:
        raise ValueError(f"tau must be >= 1, got {tau}")
    if t.dtype.is_floating_point:
        raise ValueError(f"t must be an integer tensor, got {t.dtype}")
    if backprop not in FUSION_BACKPROP:
        raise ValueError(f"backprop must be one of {FUSION_BACKPROP}, got {backprop!r}")
    for level in range(tau, 0, -1):  # level: the paper's tau at this depth of the recursion
        if level < tau:  # move to t' = r(level + 1, t) with the previous call's (h, eps)
            t = (level * t + level) // (level + 1)  # ceil(nu t / (nu + 1)), nu = level, exact integers
            z_t = add_noise(h, eps, t, alphas_cumprod)  # DDIM step to t' (eta = 0)
        graph = backprop == "all" or level == 1
        with torch.set_grad_enabled(graph and torch.is_grad_enabled()):
            h, eps = _predict_x0(unet, z_t, t, encoder_hidden_states, alphas_cumprod)
    return h


def _predict_x0(unet, z_t: Tensor, t: Tensor, encoder_hidden_states: Tensor,
                alphas_cumprod: Tensor) -> tuple[Tensor, Tensor]:
    """Supplement Eq. 6: one UNet call -> (h, eps), both (B, C, h, w)."""
    eps = unet(z_t, t, encoder_hidden_states).sample  # (B, C, h, w)
    a = _alpha(alphas_cumprod, t, z_t)
    return (z_t - (1 - a).sqrt() * eps) / a.sqrt(), eps


def _randint(low: int, high_inclusive: int, batch: int, generator: torch.Generator | None,
             device: torch.device | str) -> Tensor:
    # Draw on the generator's own device (a CPU generator cannot draw on CUDA), then move.
    gen_device = generator.device if generator is not None else "cpu"
    t = torch.randint(low, high_inclusive + 1, (batch,), generator=generator, device=gen_device)
    return t.to(device)


def sample_timesteps(batch: int, num_train_timesteps: int, generator: torch.Generator | None,
                     device: torch.device | str) -> Tensor:
    """t for Eq. 1 and Eq. 3: uniform integers in 0..T-1. Returns (batch,) int64."""
    return _randint(0, num_train_timesteps - 1, batch, generator, device)


def sample_fusion_timesteps(batch: int, t_min: int, t_max: int, generator: torch.Generator | None,
                            device: torch.device | str) -> Tensor:
    """t for f_theta (supplement A): uniform integers in [t_min, t_max], both inclusive
    (the paper's [ceil(0.2T), ceil(0.8T)] = [200, 800]). Returns (batch,) int64."""
    if not 0 <= t_min <= t_max:
        raise ValueError(f"need 0 <= t_min <= t_max, got {t_min}, {t_max}")
    return _randint(t_min, t_max, batch, generator, device)


def _cosine(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise cosine similarity: (B, D), (N, D) -> (B, N)."""
    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T


def fusion_losses(decoded: Tensor, instance_dino: Tensor, scene_text_clip: Tensor, judges: Judges,
                  *, use_instance: bool = True, use_scene: bool = True) -> dict[str, Tensor]:
    """Eq. 5, the visual-textual fusion losses on the coarse denoised images x~^IS.

    L_F^I = -mean_{k, i} cos(DINO(x~_k^IS), DINO(x_i^I)): averaged over the batch and over
            the N^I instance images.
    L_F^S = -mean_k cos(CLIP_image(x~_k^IS), CLIP_text(T_k^CS)): each element against its
            own class-scene text.

    decoded: (B, 3, H, W) in [-1, 1], the VAE decoding of `coarse_denoise`'s output.
    instance_dino: (N^I, D) precomputed DINO embeddings of the instance images.
    scene_text_clip: (B, P) precomputed CLIP text embeddings of each element's T^CS.
    Returns {"fusion_instance": scalar, "fusion_scene": scalar}, holding only the enabled
    terms; a disabled term's judge is not run.
    """
    out: dict[str, Tensor] = {}
    if use_instance:
        image_dino = judges.dino_embed(decoded)  # (B, D)
        out["fusion_instance"] = -_cosine(image_dino, instance_dino.to(image_dino.device)).mean()
    if use_scene:
        image_clip = judges.clip_image_embed(decoded)  # (B, P)
        text_clip = scene_text_clip.to(image_clip.device)  # (B, P)
        out["fusion_scene"] = -F.cosine_similarity(image_clip.float(), text_clip.float(), dim=-1).mean()
    return out


def total_loss(terms: dict[str, Tensor], cfg: LossConfig) -> tuple[Tensor, dict[str, float]]:
    """Eq. 6: L = L_C^I + lambda_C^S L_C^S + lambda_F^I L_F^I + lambda_F^S L_F^S.

    terms: scalars under "instance", "class_scene", "fusion_instance", "fusion_scene"; a
    missing key contributes nothing (DreamBooth has no fusion terms, ablations drop one).
    Returns the total (scalar, with graph) and python floats for logging under all four
    keys plus "total". A missing term is logged as 0.0 rather than left out, so every
    method and ablation logs the same metric names and runs line up in MLflow.
    """
    unknown = set(terms) - set(_WEIGHT_FIELDS)
    if unknown:
        raise ValueError(f"unknown loss terms {sorted(unknown)}; known: {list(_WEIGHT_FIELDS)}")
    if not terms:
        raise ValueError("total_loss needs at least one term")
    total = sum(_weight(cfg, name) * value for name, value in terms.items())
    logs = {name: float(terms[name].detach()) if name in terms else 0.0 for name in _WEIGHT_FIELDS}
    logs["total"] = float(total.detach())
    return total, logs


def _weight(cfg: LossConfig, name: str) -> float:
    field = _WEIGHT_FIELDS[name]
    return 1.0 if field is None else getattr(cfg, field)
