"""Subject checkpoints: the fine-tuned UNet and text encoder of one subject, plus `subject.json`.

Layout (the diffusers / transformers folder layout, so `from_pretrained(folder, subfolder=...)`
loads each part and `StableDiffusionPipeline(..., unet=..., text_encoder=...)` takes them):

    <folder>/unet/config.json
    <folder>/unet/diffusion_pytorch_model.safetensors
    <folder>/text_encoder/config.json
    <folder>/text_encoder/model.safetensors
    <folder>/subject.json            # SubjectMeta, with the sha256 of every file above

A checkpoint is written into a hidden sibling folder and swapped into place when complete
(`comfusion.fsutil.atomic_dir`), so readers never see a half-written one, nor a moment without one. Weights are safetensors only; nothing is pickled.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel

from comfusion.fsutil import atomic_dir, sha256_file  # noqa: F401  (sha256_file: re-exported)

META_FILE = "subject.json"
UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
TEXT_WEIGHTS = "text_encoder/model.safetensors"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # a LoRA subject (comfusion.lora), diffusers' file name
KINDS = ("full", "lora")
REQUIRED_FILES = {"full": (UNET_WEIGHTS, TEXT_WEIGHTS), "lora": (LORA_WEIGHTS,)}
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


class CheckpointError(ValueError):
    """A subject checkpoint folder is missing a file, or a file is corrupt or does not fit."""

    def __init__(self, folder: str | Path, file: str, problem: str):
        self.folder, self.file, self.problem = str(folder), file, problem
        super().__init__(f"subject checkpoint '{folder}': {file}: {problem}")

    def __reduce__(self):  # so the error crosses process boundaries (Ray) intact
        return (type(self), (self.folder, self.file, self.problem))


def utc_now() -> str:
    """The current time as an ISO 8601 string in UTC, e.g. `2025-01-31T12:00:00+00:00`."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class SubjectMeta:
    """What `subject.json` records about one trained subject."""

    id: str  # subject id, also the model-registry name Serve resolves
    identifier: str  # the rare token bound to the subject, e.g. "sks"
    class_noun: str  # the subject's class, e.g. "dog"
    base_model: str  # preset, folder or hub id of the base model the subject was trained from
    base_revision: str | None = None  # hub revision of the base model, when it has one
    method: str = "comfusion"  # the training method
    created: str = field(default_factory=utc_now)  # ISO time, UTC
    config: dict = field(default_factory=dict)  # the job config, as a nested dict
    metrics: dict = field(default_factory=dict)  # final metrics, name -> float
    dtype: str = "fp16"  # dtype of the stored weights: "fp16" or "fp32"
    files: dict = field(default_factory=dict)  # relative path -> sha256 hex; filled on save
    kind: str = "full"  # "full": unet/ + text_encoder/ folders; "lora": diffusers' LoRA file (comfusion.lora)
    lora: dict = field(default_factory=dict)  # kind "lora": rank, alpha, unet_targets, text_encoder_targets

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {list(KINDS)}, got {self.kind!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        for name in ("config", "metrics", "files", "lora"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"{name} must be a dict, got {type(getattr(self, name)).__name__}")
        object.__setattr__(self, "metrics", {str(k): float(v) for k, v in self.metrics.items()})

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SubjectMeta:
        """Parse `to_json` output; ValueError for invalid JSON, a missing field or a bad value."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("subject metadata must be a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in names})
        except TypeError as e:  # a required field is missing
            raise ValueError(str(e)) from None


# ---------------------------------------------------------------------------------------
# writing


def _cpu_state(module: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A CPU copy of the module's state dict in `dtype` (float tensors only); the module is untouched."""
    return {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
            for k, v in module.state_dict().items()}


def _write_unet(unet: UNet2DConditionModel, folder: Path, dtype: torch.dtype) -> None:
    (folder / "unet").mkdir(parents=True)
    unet.save_config(folder / "unet")
    save_file(_cpu_state(unet, dtype), folder / UNET_WEIGHTS, metadata={"format": "pt"})


def _write_text_encoder(text_encoder: CLIPTextModel, folder: Path, dtype: torch.dtype) -> None:
    (folder / "text_encoder").mkdir(parents=True)
    config = copy.deepcopy(text_encoder.config)  # the live module's config stays as it is
    config.architectures = [type(text_encoder).__name__]
    config.dtype = dtype
    config.save_pretrained(folder / "text_encoder")
    save_file(_cpu_state(text_encoder, dtype), folder / TEXT_WEIGHTS, metadata={"format": "pt"})


def save_subject_checkpoint(folder: str | Path, unet: UNet2DConditionModel, text_encoder: CLIPTextModel,
                            meta: SubjectMeta, dtype: str = "fp16") -> Path:
    """Write a subject checkpoint to `folder` atomically, weights in `dtype` ("fp16" or "fp32").

    The modules passed in keep their dtype and device. `meta.files` and `meta.dtype` are
    filled here. An existing `folder` is replaced only once the new checkpoint is complete.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    with atomic_dir(folder) as tmp:
        _write_unet(unet, tmp, DTYPES[dtype])
        _write_text_encoder(text_encoder, tmp, DTYPES[dtype])
        files = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        meta = dataclasses.replace(meta, dtype=dtype, files=files)
        (tmp / META_FILE).write_text(meta.to_json())
    return Path(folder)


# ---------------------------------------------------------------------------------------
# reading


def _read_meta(folder: Path) -> SubjectMeta:
    path = folder / META_FILE
    if not path.is_file():
        raise CheckpointError(folder, META_FILE, "missing")
    try:
        return SubjectMeta.from_json(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(folder, META_FILE, f"not valid subject metadata ({e})") from None


def verify_checkpoint(folder: str | Path) -> SubjectMeta:
    """The checkpoint's metadata, once every listed file is present with its recorded sha256."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(folder, ".", "no such checkpoint folder")
    meta = _read_meta(folder)
    for rel in REQUIRED_FILES[meta.kind]:
        if rel not in meta.files:
            raise CheckpointError(folder, META_FILE, f"does not list {rel}")
    root = folder.resolve()
    for rel, digest in meta.files.items():
        path = (folder / rel).resolve()
        if not path.is_relative_to(root):
            raise CheckpointError(folder, rel, "lies outside the checkpoint folder")
        if not path.is_file():
            raise CheckpointError(folder, rel, "missing")
        if sha256_file(path) != digest:
            raise CheckpointError(folder, rel, "sha256 does not match subject.json (corrupt or modified)")
    return meta


def load_subject_checkpoint(folder: str | Path, *, device: str | torch.device = "cpu",
                            dtype: torch.dtype = torch.float32
                            ) -> tuple[UNet2DConditionModel, CLIPTextModel, SubjectMeta]:
    """Verify, then load the UNet and text encoder with the ordinary `from_pretrained` (eval mode)."""
    meta = verify_checkpoint(folder)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype)
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", torch_dtype=dtype)
    return unet.to(device).eval(), text_encoder.to(device).eval(), meta


def read_subject_weights(folder: str | Path, *, device: str | torch.device = "cpu",
                         dtype: torch.dtype | None = None) -> tuple[dict, dict, SubjectMeta]:
    """Verify, then read the UNet and text-encoder state dicts (cast to `dtype` when given)."""
    folder = Path(folder)
    meta = verify_checkpoint(folder)
    if meta.kind != "full":
        raise CheckpointError(folder, META_FILE, f"is a {meta.kind} subject, not full weights (see comfusion.lora)")

    def read(rel: str) -> dict[str, torch.Tensor]:
        state = load_file(folder / rel, device=str(device))
        return {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v for k, v in state.items()}

    return read(UNET_WEIGHTS), read(TEXT_WEIGHTS), meta


def checkpoint_sizes(folder: str | Path) -> dict[str, float]:
    """Size figures of a verified checkpoint of either kind, for logging: bytes of its weight
    files and the number of values they hold (for a LoRA subject: the adapter parameters)."""
    folder = Path(folder)
    meta = verify_checkpoint(folder)
    weights = [folder / rel for rel in meta.files if rel.endswith(".safetensors")]
    values = 0
    for path in weights:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                values += math.prod(f.get_slice(key).get_shape())
    return {"checkpoint/bytes": float(sum(p.stat().st_size for p in weights)), "checkpoint/params": float(values)}


# ---------------------------------------------------------------------------------------
# swapping weights in place


def _check_state(module: torch.nn.Module, state: dict, where: str, name: str) -> None:
    """CheckpointError unless `state` has exactly the module's keys and shapes."""
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(where, name, f"keys do not match the {type(module).__name__}: "
                                           f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    wrong = [k for k, v in own.items() if tuple(state[k].shape) != tuple(v.shape)]
    if wrong:
        raise CheckpointError(where, name, f"shapes do not match the {type(module).__name__}: {wrong[:5]}")


def load_subject_weights_(components: dict, folder_or_state: str | Path | tuple) -> SubjectMeta | None:
    """Load a subject's weights into `components["unet"]` and `["text_encoder"]` in place.

    `folder_or_state` is a checkpoint folder, the tuple `read_subject_weights` returns, or the
    pair `snapshot_weights` returns (to restore the base; then None is returned). The modules
    and their parameter tensors stay the same objects; only their data changes.
    """
    if isinstance(folder_or_state, (str, os.PathLike)):
        where = str(folder_or_state)
        unet_state, text_state, meta = read_subject_weights(folder_or_state)
    else:
        where = "<in-memory weights>"
        unet_state, text_state, *rest = folder_or_state
        meta = rest[0] if rest else None
    unet, text_encoder = components["unet"], components["text_encoder"]
    _check_state(unet, unet_state, where, UNET_WEIGHTS)  # check both first: never half a subject
    _check_state(text_encoder, text_state, where, TEXT_WEIGHTS)
    with torch.no_grad():  # load_state_dict copy_()s into the existing tensors, casting dtype/device
        unet.load_state_dict(unet_state, strict=True)
        text_encoder.load_state_dict(text_state, strict=True)
    return meta


def snapshot_weights(components: dict) -> tuple[dict, dict]:
    """CPU copies of the UNet and text-encoder state dicts, to restore with `load_subject_weights_`."""
    def clone(module: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}

    return clone(components["unet"]), clone(components["text_encoder"])
