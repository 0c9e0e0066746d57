"""LoRA subjects: low-rank adapters on the UNet (and text encoder) instead of full finetuned weights.

Training adds PEFT adapters the way diffusers does (`LoraConfig`, `model.add_adapter`) and trains
only them. A LoRA subject checkpoint is diffusers' LoRA file plus `subject.json`:

    <folder>/pytorch_lora_weights.safetensors   # `save_lora_weights` layout: unet.* and text_encoder.*
                                                # keys, the LoraConfig (rank, alpha) in its metadata
    <folder>/subject.json                       # SubjectMeta, kind "lora", with rank, alpha, checksums

so a plain `StableDiffusionPipeline` of the base model loads it with `load_lora_weights(folder)`.
The project's sampler uses the same diffusers loaders (`activate_lora`) on its components.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers, recurse_remove_peft_layers
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file

from comfusion.checkpoint import (DTYPES, LORA_WEIGHTS, META_FILE, SubjectMeta, load_subject_weights_,
                                  read_subject_weights, snapshot_weights, verify_checkpoint)
from comfusion.config import LoraSettings
from comfusion.fsutil import atomic_dir, sha256_file

TRAIN_ADAPTER = "default"  # the adapter's name inside the models while training
METADATA_KEY = "lora_adapter_metadata"  # where diffusers' save_lora_weights keeps the LoraConfig


def peft_config(settings: LoraSettings, targets: tuple[str, ...]) -> LoraConfig:
    """The PEFT config of one model's adapters. Gaussian A, zero B (as diffusers' LoRA recipes):
    the adapted model starts as the base model exactly."""
    return LoraConfig(r=settings.rank, lora_alpha=settings.alpha, target_modules=list(targets),
                      init_lora_weights="gaussian", lora_dropout=0.0)


def check_targets(model: torch.nn.Module, targets: tuple[str, ...], key: str) -> None:
    """ValueError naming `key` when a target suffix matches no module of `model` (PEFT's rule:
    the module name equals the target or ends with `.target`)."""
    names = [n for n, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ValueError(f"config key '{key}': {missing} match no module of the {type(model).__name__} "
                         f"(e.g. {', '.join(sorted({n.rsplit('.', 1)[-1] for n in names if n})[:8])})")


def add_adapters(unet, text_encoder, settings: LoraSettings, train_text_encoder: bool,
                 seed: int = 0) -> list[torch.nn.Parameter]:
    """Freeze the base weights, add trainable LoRA adapters; returns the adapter parameters.

    PEFT draws the initial A matrices from the global RNG: here from one seeded by `seed`, so a
    run (and a resumed one) is reproducible, and the caller's global RNG is left as it was."""
    check_targets(unet, settings.unet_targets, "train.lora.unet_targets")
    if train_text_encoder:
        check_targets(text_encoder, settings.text_encoder_targets, "train.lora.text_encoder_targets")
    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    models = [unet] + ([text_encoder] if train_text_encoder else [])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(peft_config(settings, settings.unet_targets), adapter_name=TRAIN_ADAPTER)
        if train_text_encoder:
            _inject_text_adapter(text_encoder, peft_config(settings, settings.text_encoder_targets), TRAIN_ADAPTER)
    params = [p for m in models for n, p in m.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return params


def _inject_text_adapter(text_encoder, config: LoraConfig, name: str) -> None:
    """PEFT's own injection: transformers' `add_adapter` wants a newer peft than this stack has.
    The config is kept in `peft_config`, as transformers keeps it."""
    inject_adapter_in_model(config, text_encoder, adapter_name=name)
    configs = dict(getattr(text_encoder, "peft_config", None) or {})
    configs[name] = config
    text_encoder.peft_config = configs


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights by parameter name (for resumable training state)."""
    return {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if "lora_" in n}


def load_adapter_state_(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Copy `adapter_state` output back into the same parameters; ValueError when keys differ."""
    own = {n: p for n, p in model.named_parameters() if "lora_" in n}
    if set(own) != set(state):
        raise ValueError(f"{where}: adapter keys do not match the model's "
                         f"(missing {sorted(set(own) - set(state))[:3]}, unexpected {sorted(set(state) - set(own))[:3]})")
    with torch.no_grad():
        for n, p in own.items():
            p.copy_(state[n])


# ---------------------------------------------------------------------------------------
# the checkpoint


def _layers(model, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(model, adapter_name=TRAIN_ADAPTER))
    return {k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}


def _config_dict(model) -> dict:
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in model.peft_config[TRAIN_ADAPTER].to_dict().items()}


def save_lora_subject(folder: str | Path, unet, text_encoder, meta: SubjectMeta, settings: LoraSettings,
                      dtype: str = "fp16") -> Path:
    """Write a LoRA subject atomically: diffusers' LoRA file (text-encoder adapters when it has
    them) and `subject.json` with kind "lora", the LoRA settings and the file's sha256."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    text_trained = TRAIN_ADAPTER in (getattr(text_encoder, "peft_config", None) or {})
    with atomic_dir(folder) as tmp:
        StableDiffusionPipeline.save_lora_weights(
            tmp, unet_lora_layers=_layers(unet, DTYPES[dtype]),
            text_encoder_lora_layers=_layers(text_encoder, DTYPES[dtype]) if text_trained else None,
            unet_lora_adapter_metadata=_config_dict(unet),
            text_encoder_lora_adapter_metadata=_config_dict(text_encoder) if text_trained else None)
        lora = dict(rank=settings.rank, alpha=settings.alpha, unet_targets=list(settings.unet_targets),
                    text_encoder_targets=list(settings.text_encoder_targets) if text_trained else [])
        meta = dataclasses.replace(meta, kind="lora", lora=lora, dtype=dtype,
                                   files={LORA_WEIGHTS: sha256_file(tmp / LORA_WEIGHTS)})
        (tmp / META_FILE).write_text(meta.to_json())
    return Path(folder)


@dataclasses.dataclass
class LoraWeights:
    """A LoRA subject in host memory: the file's tensors and its adapter metadata."""

    state: dict[str, torch.Tensor]  # unet.* and text_encoder.* keys, as in the file
    metadata: dict | None  # diffusers' packed LoraConfig (unet.r, unet.lora_alpha, ...)
    meta: SubjectMeta

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state.values())


def read_lora_subject(folder: str | Path, dtype: torch.dtype | None = None) -> LoraWeights:
    """Verify, then read a LoRA subject's tensors (cast to `dtype` when given) and metadata."""
    folder = Path(folder)
    meta = verify_checkpoint(folder)
    if meta.kind != "lora":
        raise ValueError(f"subject checkpoint '{folder}' is kind {meta.kind!r}, not 'lora'")
    path = folder / LORA_WEIGHTS
    state = load_file(path)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    with safe_open(path, framework="pt") as f:
        raw = (f.metadata() or {}).get(METADATA_KEY)
    return LoraWeights(state, json.loads(raw) if raw else None, meta)


def activate_lora(components: dict, weights: LoraWeights, name: str, *, hotswap: bool = False) -> None:
    """Load a LoRA subject into the components' UNet (diffusers' loader, as `load_lora_weights` does
    with the file) and text encoder as adapter `name`, and make it the active adapter.
    With `hotswap`, the UNet's loaded adapter `name` (same targets) gets the new weights in place."""
    pipe = _pipeline(components)
    state, alphas = pipe.lora_state_dict(dict(weights.state))
    unet_state = {k: v for k, v in state.items() if k.startswith("unet.")}
    pipe.load_lora_into_unet(unet_state, alphas, unet=components["unet"], adapter_name=name, _pipeline=pipe,
                             metadata=weights.metadata, hotswap=hotswap)
    components["unet"].set_adapters([name])
    text_state = {k.removeprefix("text_encoder."): v for k, v in state.items() if k.startswith("text_encoder.")}
    _delete(components["text_encoder"], name)
    if text_state:
        _load_text_adapter(components["text_encoder"], text_state, weights, name)


def _load_text_adapter(text_encoder, state: dict, weights: LoraWeights, name: str) -> None:
    """Inject adapter `name` into the text encoder with the subject's LoraConfig and copy its weights."""
    prefix = "text_encoder."
    packed = {k.removeprefix(prefix): v for k, v in (weights.metadata or {}).items() if k.startswith(prefix)}
    known = set(LoraConfig.__dataclass_fields__)
    config = LoraConfig(**{k: v for k, v in packed.items() if k in known})
    _inject_text_adapter(text_encoder, config, name)
    params = dict(text_encoder.named_parameters())
    with torch.no_grad():
        for key, value in _peft_keys(state).items():
            target = key.replace(".lora_A.", f".lora_A.{name}.").replace(".lora_B.", f".lora_B.{name}.")
            if target not in params:
                raise ValueError(f"LoRA subject {weights.meta.id!r}: text-encoder key {key!r} fits no adapter weight")
            params[target].copy_(value)
    for module in text_encoder.modules():
        if isinstance(module, BaseTunerLayer):
            module.set_adapter(name)
            module.requires_grad_(False)


def deactivate_lora(components: dict, name: str) -> None:
    """Remove adapter `name` from the UNet and text encoder (the base model is left)."""
    for key in ("unet", "text_encoder"):
        _delete(components[key], name)


def _delete(model, name: str) -> None:
    configs = getattr(model, "peft_config", None) or {}
    if name not in configs:
        return
    if hasattr(model, "delete_adapters"):  # diffusers models
        model.delete_adapters(name)
        return
    for module in model.modules():  # text encoders: through PEFT's layers
        if isinstance(module, BaseTunerLayer) and name in module.lora_A:
            module.delete_adapter(name)
    model.peft_config = {k: v for k, v in configs.items() if k != name}


def _pipeline(components: dict) -> StableDiffusionPipeline:
    """A pipeline object around the very modules of `components` (nothing is copied)."""
    return StableDiffusionPipeline(vae=components["vae"], text_encoder=components["text_encoder"],
                                   tokenizer=components["tokenizer"], unet=components["unet"],
                                   scheduler=components["scheduler"], safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def unload_lora(components: dict) -> None:
    """Remove every adapter and PEFT layer: the UNet and text encoder are the plain modules again
    (their state dicts have the base keys, so full subjects load into them)."""
    unet, text_encoder = components["unet"], components["text_encoder"]
    if getattr(unet, "peft_config", None):
        unet.unload_lora()
    if any(isinstance(m, BaseTunerLayer) for m in text_encoder.modules()):
        recurse_remove_peft_layers(text_encoder)
    if hasattr(text_encoder, "peft_config"):
        del text_encoder.peft_config


# ---------------------------------------------------------------------------------------
# one subject at a time in one base model


ACTIVE = "subject"  # the adapter name a SubjectSlot loads LoRA subjects under


class SubjectSlot:
    """Puts one subject at a time, full or LoRA, into one set of base components.

    A full subject's weights are copied in place (`load_subject_weights_`); the base weights are
    snapshotted (host memory) before the first full subject replaces them, and restored before a
    LoRA subject is activated. A LoRA subject is one adapter named `ACTIVE`: the next LoRA subject
    with the same rank, alpha and adapted modules is hot-swapped into it (its tensors copied in), any
    other replaces it (unload, then diffusers' loader). `current` names what is in the components (None: the base).
    """

    def __init__(self, components: dict):
        self.components = components
        self.current: str | None = None
        self._base: tuple[dict, dict] | None = None  # the base weights, once a full subject displaced them
        self._full_in = False  # a full subject's weights are in the modules
        self._adapter_shape: tuple | None = None  # (rank, alpha, keys) of the loaded adapter
        self._adapter_params: dict[str, torch.Tensor] = {}  # its parameters, "unet.<name>" / "text_encoder.<name>"

    def use_full(self, key: str, state: tuple) -> None:
        """Copy a full subject's `(unet_state, text_state, ...)` in place."""
        if self.current == key:
            return
        self.current = None  # unknown until the copy completes
        if self._adapter_shape is not None:
            unload_lora(self.components)
            self._adapter_shape = None
        if self._base is None:
            self._base = snapshot_weights(self.components)
        self._full_in = True
        load_subject_weights_(self.components, state)
        self.current = key

    def use_lora(self, key: str, weights: LoraWeights) -> None:
        """Activate a LoRA subject (on the base weights)."""
        if self.current == key:
            return
        self.current = None
        if self._full_in:
            load_subject_weights_(self.components, self._base)
            self._full_in = False
        shape = _adapter_shape(weights)
        same = shape == self._adapter_shape
        self._adapter_shape = None  # unknown while loading
        if same:  # hot-swap: the new tensors into the loaded adapter's own, in place
            _copy_into_adapter(self._adapter_params, weights)
        else:
            unload_lora(self.components)
            activate_lora(self.components, weights, ACTIVE)
            self._adapter_params = {f"{part}.{n}": p for part in ("unet", "text_encoder")
                                    for n, p in self.components[part].named_parameters() if "lora_" in n}
        self._adapter_shape = shape
        self.current = key

    def use_folder(self, folder: str | Path, dtype: torch.dtype | None = None) -> SubjectMeta:
        """Read a verified checkpoint of either kind and put it in; returns its metadata."""
        meta = verify_checkpoint(folder)
        if meta.kind == "lora":
            self.use_lora(str(folder), read_lora_subject(folder, dtype=dtype))
        else:
            self.use_full(str(folder), read_subject_weights(folder, dtype=dtype))
        return meta


def _adapter_shape(weights: LoraWeights) -> tuple:
    """What must match for an in-place hot-swap: rank, alpha and the adapted modules."""
    lora = weights.meta.lora
    return lora.get("rank"), lora.get("alpha"), tuple(sorted(weights.state))


_TO_PEFT = ((".lora.down.", ".lora_A."), (".lora.up.", ".lora_B."),  # diffusers' names -> PEFT's
            (".lora_linear_layer.down.", ".lora_A."), (".lora_linear_layer.up.", ".lora_B."))


def _peft_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Diffusers-format LoRA keys (`to_q.lora.down.weight`) in PEFT's form (`to_q.lora_A.weight`)."""
    out = {}
    for key, value in state.items():
        for old, new in _TO_PEFT:
            key = key.replace(old, new)
        out[key] = value
    return out


def _copy_into_adapter(params: dict[str, torch.Tensor], weights: LoraWeights) -> None:
    """Copy a LoRA subject's tensors into the loaded adapter's parameters (same keys, rank and
    alpha), as PEFT's hot-swap does, without its walk over every module of the model: the cost
    is the adapter's few MB, not the size of the UNet's module tree."""
    with torch.no_grad():
        for part in ("unet", "text_encoder"):
            prefix = part + "."
            own = {k[len(prefix):]: v for k, v in weights.state.items() if k.startswith(prefix)}
            for key, value in _peft_keys(own).items():
                name = key.replace(".lora_A.", f".lora_A.{ACTIVE}.").replace(".lora_B.", f".lora_B.{ACTIVE}.")
                params[prefix + name].copy_(value)
