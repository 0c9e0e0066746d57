"""Finetune one subject: the ComFusion objective (paper sections 3.1 to 3.4, Eq. 6) or DreamBooth's.

Reads top to bottom: what a trainer takes (`Priors`, callbacks), the trainer (set-up, one
step, the loop, resumable state, the published checkpoint), `train_subject`, and the CLI:

    python -m comfusion.train --config configs/demo.yaml --subject yellow-ball --set train.steps=4

Every random draw of training (which instance image, which prior, timesteps, noise) comes
from one seeded CPU `torch.Generator`, saved with the state, so a run is reproducible and a
resumed run continues exactly where the saved one stopped. Jobs log through the callbacks:
this module knows nothing of Ray or MLflow.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from comfusion.checkpoint import SubjectMeta, save_subject_checkpoint
from comfusion.config import ConfigError, JobConfig, load_config, to_dict
from comfusion.data import Subject, SubjectError, check_subject
from comfusion.fsutil import atomic_dir
from comfusion.lora import adapter_state, add_adapters, load_adapter_state_, save_lora_subject
from comfusion.losses import (
    add_noise,
    class_scene_loss,
    coarse_denoise,
    fusion_losses,
    instance_loss,
    sample_fusion_timesteps,
    sample_timesteps,
    total_loss,
)
from comfusion.models import ModelNotFoundError, load_base, load_judges, noise_schedule
from comfusion.prompts import instance_scene_text, instance_text
from comfusion.sampling import default_device, encode_text, sample  # noqa: F401 - default_device: train.default_device

STATE_FORMAT = 1  # bump when the layout of `save_state` changes


# ---------------------------------------------------------------------------------------
# what a trainer takes


@dataclass
class Priors:
    """Prior images as the trainer needs them (`comfusion.priors.PriorSet` has the same fields).

    comfusion: prompts are T^CS = "a [class noun] [scene]" (Eq. 3) and scenes their scenes.
    dreambooth: prompts are T^C = "a [class noun]" (Eq. 2); scenes are not used.
    """

    latents: Tensor  # (N, 4, h, w) VAE-scaled latents of the prior images
    prompts: list[str]  # (N,) the prompt each image was sampled from
    scenes: list[str]  # (N,) the scene of each prompt ("" when it has none)


class NonFiniteLossError(ValueError):
    """A loss term (or the gradient norm) is NaN or inf; raised before the optimizer step."""

    def __init__(self, step: int, term: str, value: float):
        self.step, self.term, self.value = step, term, value
        super().__init__(f"step {step}: loss term '{term}' is {value}, not finite; the optimizer step "
                         f"was skipped, so the weights (and the last checkpoint) are those of step {step - 1}")


class TrainCallbacks:
    """No-op base for callbacks; any object with some of these methods will do.

    on_step(step, terms, lr): after each step (steps count from 1); terms holds the floats
        instance, class_scene, fusion_instance, fusion_scene, total.
    on_validation(step, images): scene -> one (H, W, 3) uint8 image sampled with T^IS by the
        current weights; every `train.validate_every` steps (if > 0) and at `train.steps`.
    on_checkpoint(step, trainer): every `train.checkpoint_every` steps, after the step; a job
        calls `trainer.save_state(...)` here and reports the folder.
    on_grad_norms(step, norms): every `train.grad_norm_every` steps (if > 0), after on_step;
        norms holds the gradient L2 norm of each weighted term of that step (the terms the
        method has) and "total", before clipping. Jobs log them as `grad_norm/<term>`.
    """

    def on_step(self, step: int, terms: dict[str, float], lr: float) -> None: ...

    def on_validation(self, step: int, images: dict[str, np.ndarray]) -> None: ...

    def on_checkpoint(self, step: int, trainer: "SubjectTrainer") -> None: ...

    def on_grad_norms(self, step: int, norms: dict[str, float]) -> None: ...


# ---------------------------------------------------------------------------------------
# the trainer


class SubjectTrainer:
    """Finetunes the UNet (and text encoder) of a base model on one subject; fp32 master weights."""

    def __init__(self, cfg: JobConfig, subject: Subject, priors: Priors, *,
                 device: str | torch.device | None = None, callbacks: Any = None):
        self.cfg, self.subject = cfg, subject
        self.device = torch.device(device or default_device())
        self.callbacks = _as_list(callbacks)
        self.step, self.last_terms, self.last_grad_norms = 0, {}, {}
        self.generator = torch.Generator().manual_seed(cfg.train.seed)  # CPU: same draws on any device
        self.use_fusion = (cfg.method == "comfusion" and cfg.loss.fusion
                           and (cfg.loss.use_fusion_instance or cfg.loss.use_fusion_scene))
        self.instance_text = instance_text(subject.identifier, subject.class_noun)  # T^I
        self._check_inputs(priors)  # before any loading

        base = load_base(cfg.model.base, revision=cfg.model.revision, seed=cfg.model.preset_seed,
                         device=self.device, dtype=torch.float32)
        self.unet, self.vae, self.text_encoder = base["unet"], base["vae"], base["text_encoder"]
        self.tokenizer, self.scheduler = base["tokenizer"], base["scheduler"]
        schedule = noise_schedule(self.scheduler)
        self.alphas_cumprod = schedule.alphas_cumprod.to(self.device)  # (T,)
        self.num_train_timesteps = schedule.config.num_train_timesteps
        self.judges = (load_judges(cfg.model.dino, cfg.model.clip, seed=cfg.model.preset_seed, device=self.device)
                       if self.use_fusion else None)

        self.instance_latents = self._encode_instances()  # (N^I, 4, h, w), cached once
        if tuple(priors.latents.shape[1:]) != tuple(self.instance_latents.shape[1:]):
            raise ValueError(f"prior latents are {tuple(priors.latents.shape[1:])} but instance latents "
                             f"{tuple(self.instance_latents.shape[1:])}: priors of another model or resolution")
        self.prior_latents = priors.latents.to(self.device, torch.float32)  # (N, 4, h, w)
        self.prior_prompts, self.prior_scenes = list(priors.prompts), list(priors.scenes)
        self.instance_dino, self.scene_text_clip = self._judge_targets()
        self.trainable = self._set_trainable()
        self.optimizer = self._make_optimizer()

    # -- set-up ---------------------------------------------------------------------

    def _check_inputs(self, priors: Priors) -> None:
        n, pixels, res = self.cfg.train.num_instance_images, self.subject.pixels, self.cfg.model.resolution
        if len(pixels) < n:
            raise ValueError(f"subject '{self.subject.id}' has {len(pixels)} image(s) but "
                             f"train.num_instance_images={n}")
        if tuple(pixels.shape[-2:]) != (res, res):
            raise ValueError(f"subject '{self.subject.id}' pixels are {tuple(pixels.shape[-2:])}, "
                             f"but model.resolution={res}")
        if not len(priors.latents) == len(priors.prompts) == len(priors.scenes) >= 1:
            raise ValueError(f"priors need N >= 1 latents, prompts and scenes alike; got "
                             f"{len(priors.latents)}, {len(priors.prompts)}, {len(priors.scenes)}")
        if self.use_fusion and not all(s.strip() for s in priors.scenes):
            raise ValueError("the fusion stream needs a scene for every prior (T^IS is built from it)")

    @torch.no_grad()
    def _encode_instances(self) -> Tensor:
        """The first N^I photos through the frozen VAE encoder, once: (N^I, 4, h, w)."""
        n, pixels = self.cfg.train.num_instance_images, self.subject.pixels  # (N, 3, R, R)
        self.vae.requires_grad_(False).eval()
        posterior = self.vae.encode(pixels[:n].to(self.device, torch.float32)).latent_dist
        return posterior.mean * self.vae.config.scaling_factor  # the mean: no sampling noise

    @torch.no_grad()
    def _judge_targets(self) -> tuple[Tensor | None, Tensor | None]:
        """DINO of the instance photos (N^I, D) and CLIP text of each prior's T^CS (N, P), once."""
        if not self.use_fusion:
            return None, None
        dino = clip = None
        if self.cfg.loss.use_fusion_instance:
            n = self.cfg.train.num_instance_images
            dino = self.judges.dino_embed(self.subject.pixels[:n].to(self.device))  # (N^I, D)
        if self.cfg.loss.use_fusion_scene:
            unique = sorted(set(self.prior_prompts))  # 200 priors share 15 prompts
            emb = self.judges.clip_text_embed(unique)  # (U, P)
            row = {p: i for i, p in enumerate(unique)}
            clip = emb[torch.tensor([row[p] for p in self.prior_prompts], device=emb.device)]  # (N, P)
        return dino, clip

    def _set_trainable(self) -> list[torch.nn.Parameter]:
        """The parameters the optimizer updates: every UNet (and text-encoder) weight, or with
        `train.adapter: lora` only the LoRA adapters added to them (the base stays frozen)."""
        tc = self.cfg.train
        modules = [self.unet] + ([self.text_encoder] if tc.trains_text_encoder else [])
        if tc.adapter == "lora":
            params = add_adapters(self.unet, self.text_encoder, tc.lora, tc.trains_text_encoder, seed=tc.seed)
        else:
            self.unet.requires_grad_(True)
            self.text_encoder.requires_grad_(tc.trains_text_encoder)
            params = [p for m in modules for p in m.parameters()]
        self.unet.train()
        self.text_encoder.train(tc.trains_text_encoder)
        if tc.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            self.vae.enable_gradient_checkpointing()  # frozen, but f_theta backprops through its decoder
            if tc.trains_text_encoder:  # transformers checkpoints only in train mode
                _enable_text_checkpointing(self.text_encoder)
        return params

    def _make_optimizer(self) -> torch.optim.Optimizer:
        tc = self.cfg.train
        if tc.optimizer == "adamw8bit":
            import bitsandbytes as bnb  # noqa: PLC0415  (only when chosen: it is slow to import)

            return bnb.optim.AdamW8bit(self.trainable, lr=tc.lr, weight_decay=tc.weight_decay)
        return torch.optim.AdamW(self.trainable, lr=tc.lr, weight_decay=tc.weight_decay)

    @property
    def components(self) -> dict:
        """The current model as `comfusion.sampling.sample` takes it."""
        return dict(unet=self.unet, vae=self.vae, text_encoder=self.text_encoder,
                    tokenizer=self.tokenizer, scheduler=self.scheduler)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # -- one step -------------------------------------------------------------------

    def train_step(self) -> dict[str, float]:
        """One optimizer step on Eq. 6; returns the loss terms as floats (the 5 keys of `total_loss`)."""
        step = self.step + 1
        with self._autocast():
            terms = self.loss_terms()
        total, logs = total_loss(terms, self.cfg.loss)
        _check_finite(step, logs)  # before backward: weights, grads and optimizer state untouched
        every = self.cfg.train.grad_norm_every
        if every and step % every == 0:
            self.last_grad_norms = self._backward_per_term(terms)
        else:
            total.backward()
        self._clip_gradients(step)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step, self.last_terms = step, logs
        return logs

    def loss_terms(self) -> dict[str, Tensor]:
        """Draw a batch (B instance images, B priors) and compute the enabled terms, with graph."""
        b = self.cfg.train.batch_size
        inst_idx = self._randint(len(self.instance_latents), b)  # (B,)
        prior_idx = self._randint(len(self.prior_latents), b)  # (B,)
        terms = self.composite_terms(inst_idx, prior_idx)
        if self.use_fusion:
            terms.update(self.fusion_terms(prior_idx))  # the same priors feed the fusion stream
        return terms

    def composite_terms(self, inst_idx: Tensor, prior_idx: Tensor) -> dict[str, Tensor]:
        """Eq. 1 (instance, T^I) and Eq. 3 / Eq. 2 (prior, its own prompt) in one UNet batch."""
        b = len(inst_idx)
        z0 = torch.cat([self.instance_latents[inst_idx], self.prior_latents[prior_idx]])  # (2B, 4, h, w)
        texts = [self.instance_text] * b + [self.prior_prompts[i] for i in prior_idx.tolist()]
        t = sample_timesteps(2 * b, self.num_train_timesteps, self.generator, self.device)  # (2B,) in 0..T-1
        eps = self._randn(z0.shape)
        z_t = add_noise(z0, eps, t, self.alphas_cumprod)
        cond = encode_text(self.tokenizer, self.text_encoder, texts)  # (2B, 77, E)
        eps_pred = self.unet(z_t, t, encoder_hidden_states=cond).sample  # (2B, 4, h, w)
        return {"instance": instance_loss(eps_pred[:b], eps[:b]),
                "class_scene": class_scene_loss(eps_pred[b:], eps[b:])}

    def fusion_terms(self, prior_idx: Tensor) -> dict[str, Tensor]:
        """Eq. 4-5: noise the priors' latents, coarse-denoise them with T^IS, decode, judge.

        Gradients reach the UNet (all tau calls, or the last with `loss.fusion_backprop: last`)
        and the text encoder (which encodes T^IS) through the frozen VAE decoder and judges.
        """
        lc = self.cfg.loss
        z0 = self.prior_latents[prior_idx]  # (B, 4, h, w)
        t = sample_fusion_timesteps(len(prior_idx), lc.fusion_t_min, lc.fusion_t_max, self.generator, self.device)
        z_t = add_noise(z0, self._randn(z0.shape), t, self.alphas_cumprod)  # z_t^CS
        texts = [instance_scene_text(self.subject.identifier, self.subject.class_noun, self.prior_scenes[i])
                 for i in prior_idx.tolist()]  # T^IS: T^CS with the identifier
        cond = encode_text(self.tokenizer, self.text_encoder, texts)  # (B, 77, E)
        z_is = coarse_denoise(self.unet, z_t, t, cond, self.alphas_cumprod, lc.tau,
                              backprop=lc.fusion_backprop)  # (B, 4, h, w)
        x_is = self.vae.decode(z_is / self.vae.config.scaling_factor).sample  # (B, 3, H, W) in ~[-1, 1]
        scene_clip = None if self.scene_text_clip is None else self.scene_text_clip[prior_idx.to(self.device)]
        return fusion_losses(x_is, self.instance_dino, scene_clip, self.judges,
                             use_instance=lc.use_fusion_instance, use_scene=lc.use_fusion_scene)

    def _backward_per_term(self, terms: dict[str, Tensor]) -> dict[str, float]:
        """Backward of Eq. 6 one weighted term at a time: the same summed gradient as
        `total.backward()`, plus the L2 norm of each term's own gradient over the trainable
        parameters (before clipping) and of their sum ("total")."""
        summed: list[Tensor | None] = [None] * len(self.trainable)
        norms: dict[str, float] = {}
        names = list(terms)
        for k, name in enumerate(names):
            weighted = total_loss({name: terms[name]}, self.cfg.loss)[0]
            grads = torch.autograd.grad(weighted, self.trainable, retain_graph=k < len(names) - 1,
                                        allow_unused=True)
            norms[name] = _norm(grads)
            summed = [s if g is None else (g if s is None else s + g) for s, g in zip(summed, grads)]
        norms["total"] = _norm(summed)
        for p, g in zip(self.trainable, summed):
            p.grad = g
        return norms

    def _clip_gradients(self, step: int) -> float:
        """Clip to `train.grad_clip` (0: no clipping); a NaN/inf gradient raises before the update."""
        max_norm = self.cfg.train.grad_clip or float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_(self.trainable, max_norm))
        if not np.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(step, "grad_norm", norm)
        return norm

    def _randint(self, high: int, n: int) -> Tensor:
        return torch.randint(0, high, (n,), generator=self.generator)  # (n,) on the CPU

    def _randn(self, shape: Sequence[int]) -> Tensor:
        return torch.randn(tuple(shape), generator=self.generator).to(self.device)

    def _autocast(self):
        if self.device.type == "cuda" and self.cfg.train.mixed_precision == "bf16":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # -- the loop -------------------------------------------------------------------

    def run(self, until: int | None = None) -> dict[str, float]:
        """Train from the current step to `until` (default `train.steps`); returns the last terms."""
        tc = self.cfg.train
        until = tc.steps if until is None else until
        while self.step < until:
            terms = self.train_step()
            self._emit("on_step", self.step, terms, self.lr)
            if tc.grad_norm_every and self.step % tc.grad_norm_every == 0:
                self._emit("on_grad_norms", self.step, self.last_grad_norms)
            if self._validation_due():
                self._emit("on_validation", self.step, self.validation_images())
            if self.step % tc.checkpoint_every == 0:
                self._emit("on_checkpoint", self.step, self)
        return self.last_terms

    def _emit(self, name: str, *args) -> None:
        for cb in self.callbacks:
            if _hook(cb, name):
                getattr(cb, name)(*args)

    def _validation_due(self) -> bool:
        tc = self.cfg.train
        wanted = any(_hook(cb, "on_validation") for cb in self.callbacks)  # else sampling is wasted
        due = self.step == tc.steps or (tc.validate_every > 0 and self.step % tc.validate_every == 0)
        return wanted and tc.validation_scenes > 0 and due

    @torch.no_grad()
    def validation_images(self) -> dict[str, np.ndarray]:
        """One image per scene (the first `train.validation_scenes`) from T^IS, same seed for all."""
        scenes = list(self.subject.scenes[: self.cfg.train.validation_scenes])
        prompts = [instance_scene_text(self.subject.identifier, self.subject.class_noun, s) for s in scenes]
        res, sc = self.cfg.model.resolution, self.cfg.sampler
        self.unet.eval()
        self.text_encoder.eval()
        try:
            with self._autocast():
                out = sample(self.components, prompts, [self.cfg.train.seed] * len(prompts), steps=sc.steps,
                             guidance_scale=sc.guidance_scale, height=res, width=res, batch_size=sc.batch_size)
        finally:
            self.unet.train()
            self.text_encoder.train(self.cfg.train.trains_text_encoder)
        return dict(zip(scenes, out.images))  # scene -> (H, W, 3) uint8

    # -- resumable state ------------------------------------------------------------

    def save_state(self, folder: str | os.PathLike) -> Path:
        """Everything needed to resume exactly: fp32 weights (safetensors), optimizer, step, RNGs.

        Written to a temporary sibling and renamed into place (an older state there is replaced).
        """
        with atomic_dir(folder) as tmp:  # flushed to disk before it becomes visible
            save_file(self._weights_state(self.unet), tmp / "unet.safetensors")
            if self.cfg.train.trains_text_encoder:  # a frozen text encoder is the base's: not saved
                save_file(self._weights_state(self.text_encoder), tmp / "text_encoder.safetensors")
            torch.save({"step": self.step, "terms": dict(self.last_terms), "optimizer": self.optimizer.state_dict(),
                        "generator": self.generator.get_state(), "rng": _global_rng_states()}, tmp / "trainer.pt")
            meta = {"format": STATE_FORMAT, "step": self.step, "subject": self.subject.id, "method": self.cfg.method,
                    "adapter": self.cfg.train.adapter}
            (tmp / "state.json").write_text(json.dumps(meta, indent=2))
        return Path(folder)

    def load_state(self, folder: str | os.PathLike) -> None:
        """Restore what `save_state` wrote; the next step is the one the saved run would have taken."""
        folder = Path(folder)
        meta = json.loads((folder / "state.json").read_text())
        want = {"format": STATE_FORMAT, "subject": self.subject.id, "method": self.cfg.method,
                "adapter": self.cfg.train.adapter}
        got = {k: meta.get(k, "full" if k == "adapter" else None) for k in want}  # states before LoRA: full
        if got != want:
            raise ValueError(f"state '{folder}' was saved by {got}; this trainer is {want}")
        device = str(self.device)
        unet = load_file(folder / "unet.safetensors", device=device)  # read everything, then apply
        text = (load_file(folder / "text_encoder.safetensors", device=device)
                if self.cfg.train.trains_text_encoder else None)
        state = torch.load(folder / "trainer.pt", map_location="cpu", weights_only=True)
        self._load_weights_state(self.unet, unet, folder)
        if text is not None:
            self._load_weights_state(self.text_encoder, text, folder)
        self.optimizer.load_state_dict(state["optimizer"])  # moves its tensors to the params' device
        self.generator.set_state(state["generator"])
        _set_global_rng_states(state["rng"])
        self.step, self.last_terms = int(state["step"]), dict(state["terms"])

    def _weights_state(self, module: torch.nn.Module) -> dict[str, Tensor]:
        """What a resumable state keeps of a module: all of it, or with LoRA its adapters."""
        return adapter_state(module) if self.cfg.train.adapter == "lora" else _cpu_state(module)

    def _load_weights_state(self, module: torch.nn.Module, state: dict[str, Tensor], folder: Path) -> None:
        """Copy into the same tensors, so the optimizer keeps its references."""
        if self.cfg.train.adapter == "lora":
            load_adapter_state_(module, state, str(folder))
            return
        with torch.no_grad():
            module.load_state_dict(state)

    def publish(self, folder: str | os.PathLike, metrics: dict[str, float] | None = None) -> Path:
        """The subject checkpoint (DESIGN.md) in `train.checkpoint_dtype`; metrics default to the
        last step's loss terms as `loss/<term>`, and given `metrics` are added to them."""
        cfg, s = self.cfg, self.subject
        meta = SubjectMeta(id=s.id, identifier=s.identifier, class_noun=s.class_noun, base_model=cfg.model.base,
                           base_revision=cfg.model.revision, method=cfg.method, config=to_dict(cfg),
                           metrics={**{f"loss/{k}": v for k, v in self.last_terms.items()}, **(metrics or {})})
        if cfg.train.adapter == "lora":
            return save_lora_subject(folder, self.unet, self.text_encoder, meta, cfg.train.lora,
                                     dtype=cfg.train.checkpoint_dtype)
        return save_subject_checkpoint(folder, self.unet, self.text_encoder, meta, dtype=cfg.train.checkpoint_dtype)


def _as_list(callbacks: Any) -> list:
    if callbacks is None:
        return []
    return list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]


def _hook(callback: Any, name: str) -> bool:
    """Whether `callback` has method `name` of its own (not `TrainCallbacks`' no-op)."""
    fn = getattr(callback, name, None)
    return fn is not None and getattr(fn, "__func__", None) is not getattr(TrainCallbacks, name)


def _norm(grads: Sequence[Tensor | None]) -> float:
    """L2 norm over a list of gradients (None: no gradient)."""
    return sum(float(g.float().square().sum()) for g in grads if g is not None) ** 0.5


def _check_finite(step: int, terms: dict[str, float]) -> None:
    for name, value in terms.items():  # instance, class_scene, fusion_*, then total
        if not np.isfinite(value):
            raise NonFiniteLossError(step, name, value)


def _enable_text_checkpointing(text_encoder) -> None:
    kwargs = {"use_reentrant": False}  # reentrant checkpoints drop grads when inputs need none
    if hasattr(text_encoder, "activation_checkpointing_enable"):  # transformers >= 5
        text_encoder.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _cpu_state(module: torch.nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}


def _global_rng_states() -> dict:
    """torch / CUDA / numpy / python RNG states as tensors and plain types (loads with weights_only)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
            "python": random.getstate()}


def _set_global_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))


# ---------------------------------------------------------------------------------------
# one subject, start to finish


def train_subject(cfg: JobConfig, subject: Subject, priors: Priors, out_dir: str | os.PathLike, *,
                  device: str | torch.device | None = None, callbacks: Any = None) -> Path:
    """Train `subject` for `train.steps` and publish its checkpoint to `out_dir`."""
    trainer = SubjectTrainer(cfg, subject, priors, device=device or default_device(), callbacks=callbacks)
    trainer.run()
    return trainer.publish(out_dir)


def obtain_priors(cfg: JobConfig, subject: Subject, device: str | torch.device | None = None) -> Priors:
    """The subject's class priors for `cfg.method` from the prior cache under `job.storage`,
    generating only what is missing in-process (the no-Ray path; jobs use Ray Data).

    ComFusion gets "a [class noun] [scene]" over the subject's scenes; DreamBooth gets "a [class noun]".
    """
    from comfusion.priors import ensure_priors, read_priors  # noqa: PLC0415

    device = str(device or default_device())
    report = ensure_priors(subject.class_noun, cfg, cfg.job.storage, device=device, method=cfg.method,
                           scenes=subject.scenes)
    return read_priors(report.folder)


# ---------------------------------------------------------------------------------------
# command line


class ProgressPrinter(TrainCallbacks):
    """Prints the loss terms every `every` steps (and the first and last)."""

    def __init__(self, every: int, total_steps: int, stream=None):
        self.every, self.total, self.stream = max(1, every), total_steps, stream or sys.stdout
        self.start = time.perf_counter()

    def on_step(self, step: int, terms: dict[str, float], lr: float) -> None:
        if step == 1 or step == self.total or step % self.every == 0:
            per_step = (time.perf_counter() - self.start) / step
            losses = "  ".join(f"{k} {v:.4f}" for k, v in terms.items())
            print(f"step {step}/{self.total}  {losses}  lr {lr:.2e}  {per_step:.2f} s/step",
                  file=self.stream, flush=True)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m comfusion.train",
                                description="Finetune one subject of a job config (ComFusion or DreamBooth) "
                                            "and publish its checkpoint.")
    p.add_argument("--config", required=True, help="job config YAML, e.g. configs/demo.yaml")
    p.add_argument("--subject", required=True, help="id of the subject in the config's data.subjects")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, repeatable, e.g. --set train.steps=4 --set method=dreambooth")
    p.add_argument("--out", help="checkpoint folder (default <job.storage>/checkpoints/<subject>/<method>)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--log-every", type=int, default=10, help="print the loss terms every N steps")
    return p.parse_args(argv)


def _select_subject(cfg: JobConfig, subject_id: str) -> Subject:
    """The named subject, fully checked (photos decoded); SubjectError before any compute."""
    specs = [s for s in cfg.data.subjects if s.id == subject_id]
    if not specs:
        known = ", ".join(s.id for s in cfg.data.subjects) or "none"
        raise SubjectError(subject_id, [f"no subject with this id in the config (known: {known})"])
    return check_subject(specs[0], cfg.data, cfg.model.resolution)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        subject = _select_subject(cfg, args.subject)
    except (ConfigError, SubjectError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(cfg.job.storage) / "checkpoints" / subject.id / cfg.method
    device = args.device or default_device()
    print(f"training '{subject.id}' ({cfg.method}, {cfg.train.steps} steps, base {cfg.model.base}) on {device}")
    try:
        priors = obtain_priors(cfg, subject, device)
        path = train_subject(cfg, subject, priors, out, device=device,
                             callbacks=ProgressPrinter(args.log_every, cfg.train.steps))
    except (NonFiniteLossError, ModelNotFoundError, ValueError, OSError, RuntimeError) as e:
        print(f"error: training '{subject.id}' failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"published {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
