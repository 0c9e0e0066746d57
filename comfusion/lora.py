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

import collections
import dataclasses
import json
import logging
import re
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
log = logging.getLogger(__name__)


class SubjectSlot:
    """Puts one subject at a time, full or LoRA, into one set of base components.

    A full subject's weights are copied in place (`load_subject_weights_`); the base weights are
    snapshotted (host memory) before the first full subject replaces them, and restored before a
    LoRA subject is activated. A LoRA subject goes into one adapter named `ACTIVE`:

    - with `max_rank` > 0, a *padded* adapter: rank `max_rank` on the union of the modules LoRA
      subjects adapted so far. A subject of rank r <= `max_rank` is copied in (A's first r rows,
      B's first r columns, the rest zero; modules it does not adapt zero) and each layer's r and
      alpha set to the subject's, so the scale alpha / r and the image are the unpadded adapter's.
      Only a subject adapting a module not seen before rebuilds the adapter (once, to the union).
    - otherwise (no padding, a rank above `max_rank`, DoRA, rsLoRA, rank/alpha patterns) an
      adapter of the subject's own shape: the next subject of the same rank, alpha and modules is
      copied into it, any other replaces it (unload, then diffusers' loader: ~100x slower).

    `current` names what is in the components (None: the base); `swaps` counts each kind of swap.
    """

    def __init__(self, components: dict, max_rank: int = 0):
        if max_rank < 0:
            raise ValueError(f"max_rank must be >= 0 (0: no padding), got {max_rank}")
        self.components, self.max_rank = components, max_rank
        self.current: str | None = None
        self.swaps = collections.Counter()  # "in_place", "padded_build", "unpadded_load", "full"
        self._base: tuple[dict, dict] | None = None  # the base weights, once a full subject displaced them
        self._full_in = False  # a full subject's weights are in the modules
        self._adapter_shape: tuple | None = None  # (rank, alpha, keys) of a loaded unpadded adapter
        self._adapter_params: dict[str, torch.Tensor] = {}  # its parameters, "unet.<name>" / "text_encoder.<name>"
        self._padded: dict[str, BaseTunerLayer] | None = None  # the loaded padded adapter's layers by module
        self._pad_modules: set[str] = set()  # every module a padded subject adapted (the next build's targets)
        self._warned = False

    def use_full(self, key: str, state: tuple) -> None:
        """Copy a full subject's `(unet_state, text_state, ...)` in place."""
        if self.current == key:
            return
        self.current = None  # unknown until the copy completes
        self._unload_adapter()
        if self._base is None:
            self._base = snapshot_weights(self.components)
        self._full_in = True
        load_subject_weights_(self.components, state)
        self.swaps["full"] += 1
        self.current = key

    def use_lora(self, key: str, weights: LoraWeights) -> None:
        """Activate a LoRA subject (on the base weights)."""
        if self.current == key:
            return
        self.current = None
        if self._full_in:
            load_subject_weights_(self.components, self._base)
            self._full_in = False
        modules = self._paddable(weights)
        if modules is not None:
            self._use_padded(modules)
        else:
            self._use_unpadded(weights)
        self.current = key

    def use_folder(self, folder: str | Path, dtype: torch.dtype | None = None) -> SubjectMeta:
        """Read a verified checkpoint of either kind and put it in; returns its metadata."""
        meta = verify_checkpoint(folder)
        if meta.kind == "lora":
            self.use_lora(str(folder), read_lora_subject(folder, dtype=dtype))
        else:
            self.use_full(str(folder), read_subject_weights(folder, dtype=dtype))
        return meta

    def _paddable(self, weights: LoraWeights) -> dict[str, tuple] | None:
        """The subject's `lora_modules`, or None (logged once) when it must load unpadded."""
        if self.max_rank == 0:
            return None
        try:
            modules = lora_modules(weights)
            rank = max(a.shape[0] for a, _, _ in modules.values())
            if rank > self.max_rank:
                raise ValueError(f"rank {rank} is above lora_max_rank {self.max_rank}")
        except ValueError as e:
            if not self._warned:
                log.warning("LoRA subject %r: %s; such subjects are loaded unpadded (unload + load, about "
                            "100x slower than an in-place swap). Logged once.", weights.meta.id, e)
                self._warned = True
            return None
        return modules

    def _use_padded(self, modules: dict[str, tuple]) -> None:
        if self._padded is None or not modules.keys() <= self._padded.keys():
            self._pad_modules |= modules.keys()
            self._unload_adapter()
            self._padded = add_padded_adapter(self.components, self._pad_modules, self.max_rank)
            self.swaps["padded_build"] += 1
        else:
            self.swaps["in_place"] += 1
        copy_padded_(self._padded, modules)

    def _use_unpadded(self, weights: LoraWeights) -> None:
        shape = _adapter_shape(weights)
        same = shape == self._adapter_shape
        self._adapter_shape = None  # unknown while loading
        if same:  # hot-swap: the new tensors into the loaded adapter's own, in place
            _copy_into_adapter(self._adapter_params, weights)
            self.swaps["in_place"] += 1
        else:
            self._unload_adapter()
            activate_lora(self.components, weights, ACTIVE)
            self._adapter_params = {f"{part}.{n}": p for part in ("unet", "text_encoder")
                                    for n, p in self.components[part].named_parameters() if "lora_" in n}
            self.swaps["unpadded_load"] += 1
        self._adapter_shape = shape

    def _unload_adapter(self) -> None:
        unload_lora(self.components)  # also after a load that failed half-way
        self._adapter_shape, self._padded, self._adapter_params = None, None, {}


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


# ---------------------------------------------------------------------------------------
# the padded adapter: one layout for every LoRA subject up to a rank


_AB_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<AB>[AB])\.weight$")
# LoraConfig entries a plain padded adapter cannot express (their "off" values)
_UNPADDABLE = {"use_dora": False, "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {}, "lora_bias": False}


def _part_config(weights: LoraWeights, part: str) -> dict:
    """The subject's LoraConfig entries for `part` ("unet" / "text_encoder"): from the file's
    metadata, else rank and alpha from subject.json."""
    prefix = part + "."
    packed = {k[len(prefix):]: v for k, v in (weights.metadata or {}).items() if k.startswith(prefix)}
    if not packed:
        lora = weights.meta.lora or {}
        packed = {"r": lora.get("rank"), "lora_alpha": lora.get("alpha")}
    if packed.get("r") is None or packed.get("lora_alpha") is None:
        raise ValueError(f"no rank and alpha recorded for its {part} adapters")
    for key, off in _UNPADDABLE.items():
        if packed.get(key, off) not in (off, None):
            raise ValueError(f"its {part} LoraConfig sets {key}={packed[key]!r}")
    return packed


def lora_modules(weights: LoraWeights) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """A LoRA subject by adapted module ("unet.<module>", "text_encoder.<module>"): (A (r, in, ...),
    B (out, r, ...), alpha). ValueError with the reason when it is not plain LoRA: a key that is no
    A/B weight, a rank that differs from its config, DoRA, rsLoRA, per-module patterns."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in _peft_keys(weights.state).items():
        match = _AB_KEY.match(key)
        if match is None:
            raise ValueError(f"key {key!r} is not a LoRA A/B weight")
        pairs.setdefault(match["module"], {})[match["AB"]] = value
    configs = {part: _part_config(weights, part) for part in {m.split(".", 1)[0] for m in pairs}}
    out = {}
    for module, ab in pairs.items():
        config = configs[module.split(".", 1)[0]]
        if set(ab) != {"A", "B"} or ab["A"].shape[0] != config["r"] or ab["B"].shape[1] != config["r"]:
            raise ValueError(f"module {module!r}: A/B do not form a rank-{config['r']} pair")
        out[module] = (ab["A"], ab["B"], float(config["lora_alpha"]))
    return out


def add_padded_adapter(components: dict, modules: set[str], rank: int) -> dict[str, BaseTunerLayer]:
    """Add adapter `ACTIVE` of rank `rank` on exactly `modules` ("unet.<name>" / "text_encoder.<name>")
    and make it active; returns its layers by module. Its weights are set by `copy_padded_`."""
    layers = {}
    with torch.random.fork_rng(devices=[]):  # PEFT initialises from the global RNG: leave the caller's as it was
        for part in ("unet", "text_encoder"):
            names = sorted(m.split(".", 1)[1] for m in modules if m.split(".", 1)[0] == part)
            if not names:
                continue
            model = components[part]
            config = LoraConfig(r=rank, lora_alpha=rank, target_modules=names, lora_dropout=0.0,
                                init_lora_weights=False)
            if part == "unet":
                model.add_adapter(config, adapter_name=ACTIVE)
                model.set_adapters([ACTIVE])
            else:
                _inject_text_adapter(model, config, ACTIVE)
            for name, module in model.named_modules():
                if isinstance(module, BaseTunerLayer) and ACTIVE in getattr(module, "lora_A", {}):
                    module.set_adapter(ACTIVE)
                    module.requires_grad_(False)
                    layers[f"{part}.{name}"] = module
    if layers.keys() != modules:
        misfits = sorted(modules ^ layers.keys())[:3]
        raise ValueError(f"padded LoRA adapter: modules {misfits} do not fit the base model")
    return layers


def copy_padded_(layers: dict[str, BaseTunerLayer], modules: dict[str, tuple]) -> None:
    """Copy a subject's `lora_modules` into the padded layers, zero-padded to the layers' rank; set
    each layer's r and alpha to the subject's, so its scale is the subject's own alpha / r (and
    stays so if something recomputes it). Layers the subject does not adapt are zeroed."""
    with torch.no_grad():
        for name, layer in layers.items():
            lora_a, lora_b = layer.lora_A[ACTIVE].weight, layer.lora_B[ACTIVE].weight  # (R, in), (out, R)
            if name not in modules:
                lora_a.zero_()
                lora_b.zero_()
                continue
            a, b, alpha = modules[name]
            r = a.shape[0]
            lora_a[:r].copy_(a)
            lora_a[r:].zero_()
            lora_b[:, :r].copy_(b)
            lora_b[:, r:].zero_()
            layer.r[ACTIVE], layer.lora_alpha[ACTIVE] = r, alpha
            layer.scaling[ACTIVE] = alpha / r
