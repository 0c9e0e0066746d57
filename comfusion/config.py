"""Typed, frozen job configuration, loaded from YAML with dotted command-line overrides.

One `JobConfig` describes a whole job (training many subjects, evaluating, serving);
it is nested by concern. Every field is checked when the dataclass is built, and a bad
key or value raises `ConfigError` naming the dotted key (`train.lr`, `loss.tau`, ...).
"""
from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from comfusion.prompts import DEFAULT_IDENTIFIER, PAPER_SCENES

METHODS = ("comfusion", "dreambooth")
# The paper's compared rows, as (key, label, config overrides of one run): the Table 1 baseline,
# ComFusion (also Table 3's "tau = 3" row) and the Table 3 ablations. Benchmarks run them all.
VARIANTS: tuple[tuple[str, str, dict], ...] = (
    ("dreambooth", "DreamBooth", {"method": "dreambooth"}),
    ("comfusion", "ComFusion (tau=3)", {}),
    ("no_fusion", "w/o {L_F^I, L_F^S}", {"loss.fusion": False}),
    ("no_fi", "w/o L_F^I", {"loss.use_fusion_instance": False}),
    ("no_fs", "w/o L_F^S", {"loss.use_fusion_scene": False}),
    ("tau1", "tau=1", {"loss.tau": 1}),
    ("tau5", "tau=5", {"loss.tau": 5}),
)
# Levers beyond Table 3 (issue 16), in the same form: each is a config switch of one run.
LEVERS: tuple[tuple[str, str, dict], ...] = (
    ("backprop_last", "ComFusion, f_theta grad last call", {"loss.fusion_backprop": "last"}),
    ("frozen_text", "ComFusion, text encoder frozen", {"train.train_text_encoder": False}),
    ("db_frozen_text", "DreamBooth, text encoder frozen", {"method": "dreambooth", "train.train_text_encoder": False}),
    ("cs0.1", "ComFusion, lambda_C^S 0.1", {"loss.lambda_class_scene": 0.1}),
    ("cs0.3", "ComFusion, lambda_C^S 0.3", {"loss.lambda_class_scene": 0.3}),
    ("db_cs0.1", "DreamBooth, lambda prior 0.1", {"method": "dreambooth", "loss.lambda_class_scene": 0.1}),
    ("db_cs0.3", "DreamBooth, lambda prior 0.3", {"method": "dreambooth", "loss.lambda_class_scene": 0.3}),
    ("fw0.003", "ComFusion, lambda_F 0.003", {"loss.lambda_fusion_instance": 0.003, "loss.lambda_fusion_scene": 0.003}),
    ("fw0.03", "ComFusion, lambda_F 0.03", {"loss.lambda_fusion_instance": 0.03, "loss.lambda_fusion_scene": 0.03}),
    # prior weight 0 (no class-scene / prior term) and the other levers at prior weight 0.1, the fair setting
    ("cs0", "ComFusion, lambda_C^S 0", {"loss.lambda_class_scene": 0.0}),
    ("db_cs0", "DreamBooth, lambda prior 0", {"method": "dreambooth", "loss.lambda_class_scene": 0.0}),
    ("cs0.1_last", "ComFusion 0.1, f_theta grad last call",
     {"loss.lambda_class_scene": 0.1, "loss.fusion_backprop": "last"}),
    ("cs0.1_frozen_text", "ComFusion 0.1, text encoder frozen",
     {"loss.lambda_class_scene": 0.1, "train.train_text_encoder": False}),
    ("db_cs0.1_frozen_text", "DreamBooth 0.1, text encoder frozen",
     {"method": "dreambooth", "loss.lambda_class_scene": 0.1, "train.train_text_encoder": False}),
    ("cs0.1_fw0.003", "ComFusion 0.1, lambda_F 0.003",
     {"loss.lambda_class_scene": 0.1, "loss.lambda_fusion_instance": 0.003, "loss.lambda_fusion_scene": 0.003}),
    ("cs0.1_fw0.03", "ComFusion 0.1, lambda_F 0.03",
     {"loss.lambda_class_scene": 0.1, "loss.lambda_fusion_instance": 0.03, "loss.lambda_fusion_scene": 0.03}),
)


MAX_JOB_NAME = 64
# job.name is an MLflow experiment name, a Ray run-name prefix and a folder under job.storage.
JOB_NAME_PATTERN = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_JOB_NAME - 1}}}")


def _show(value: object, limit: int = 60) -> str:
    """repr() cut to `limit` characters, so a 10 kB value never floods an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ConfigError(ValueError):
    """A config key is unknown, missing, of the wrong type or out of range."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"config key '{key}': {message}")


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


@dataclass(frozen=True)
class SubjectSpec:
    """One entry of the subjects manifest, as written by the user (validated by `comfusion.data`)."""

    id: str
    images: tuple[str, ...]
    class_noun: str
    identifier: str = DEFAULT_IDENTIFIER  # a reserved single token of the byte tokenizers (prompts.py)
    scenes: tuple[str, ...] | None = None  # None: the job's `data.scenes`


@dataclass(frozen=True)
class ModelConfig:
    """Which weights to load. Each name is a built-in preset, a hub id or a local folder."""

    base: str = "tiny"  # "tiny", "sd15-arch", "toy", or e.g. "stable-diffusion-v1-5/stable-diffusion-v1-5"
    revision: str | None = None  # hub revision of `base`; part of the prior cache key
    dino: str = "tiny"  # judge for L_F^I: preset or e.g. "facebook/dino-vits16"
    clip: str = "tiny"  # judge for L_F^S: preset or e.g. "openai/clip-vit-base-patch32"
    resolution: int = 32  # pixels of the square training / prior images
    preset_seed: int = 0  # seed of the random weights of the built-in presets

    def __post_init__(self):
        for name in ("base", "dino", "clip"):
            _check(bool(getattr(self, name).strip()), name, "must be a preset name, hub id or folder")
        _check(self.resolution >= 8 and self.resolution % 8 == 0, "resolution", "must be a multiple of 8, >= 8")


@dataclass(frozen=True)
class DataConfig:
    """Subjects and how their photos are checked and prepared."""

    subjects: tuple[SubjectSpec, ...] = ()
    root: str = ""  # folder the image paths start from and must stay in; relative: from the config file's folder;
    #                 "" = the config file's folder (`load_config` writes the resolved folder here)
    scenes: tuple[str, ...] = PAPER_SCENES  # the class-scene prior scenes (supplement D)
    min_side: int = 256  # shortest side a subject photo may have, in pixels
    max_pixels: int = 50_000_000  # decompression-bomb guard: width * height cap
    allow_absolute_paths: bool = False  # true: image paths may be absolute or leave `root` (trusted configs only)

    def __post_init__(self):
        _check(len(self.scenes) >= 1, "scenes", "needs at least one scene")
        _check(all(isinstance(s, str) and s.strip() for s in self.scenes), "scenes", "scenes must be non-empty strings")
        _check(self.min_side >= 1, "min_side", "must be >= 1")
        _check(self.max_pixels >= 1, "max_pixels", "must be >= 1")


@dataclass(frozen=True)
class SamplerConfig:
    """The one sampler that priors, validation, evaluation and serving share."""

    steps: int = 30  # DDIM steps
    guidance_scale: float = 7.5  # classifier-free guidance
    batch_size: int = 8  # prompts per UNet batch

    def __post_init__(self):
        _check(1 <= self.steps <= 1000, "steps", "must be in 1..1000")
        _check(0.0 <= self.guidance_scale <= 50.0, "guidance_scale", "must be in 0..50")
        _check(self.batch_size >= 1, "batch_size", "must be >= 1")


@dataclass(frozen=True)
class PriorConfig:
    """Class-scene prior images (Eq. 3), generated once per class and cached."""

    count: int = 200  # N prior images per class, spread over the scenes
    seed: int = 0  # base seed; image i uses a seed derived from (seed, i)
    max_count: int = 5000  # cap: larger requests are refused before any work starts

    def __post_init__(self):
        _check(self.count >= 1, "count", "must be >= 1")
        _check(self.max_count >= 1, "max_count", "must be >= 1")
        _check(self.count <= self.max_count, "count", f"{self.count} is above the cap max_count={self.max_count}")


@dataclass(frozen=True)
class LossConfig:
    """Eq. 6 weights and the fusion stream (sections 3.2 to 3.4). Table 3 ablations are switches here."""

    lambda_class_scene: float = 1.0  # lambda_C^S
    lambda_fusion_instance: float = 0.01  # lambda_F^I
    lambda_fusion_scene: float = 0.01  # lambda_F^S
    tau: int = 3  # coarse denoising steps of f_theta
    fusion: bool = True  # False: the "w/o fusion" ablation
    use_fusion_instance: bool = True  # False: "w/o L_F^I"
    use_fusion_scene: bool = True  # False: "w/o L_F^S"
    fusion_t_min: int = 200  # f_theta's t is drawn from [ceil(0.2T), ceil(0.8T)]
    fusion_t_max: int = 800
    # which UNet calls of f_theta carry gradients: "all" (the design's reading of the paper) or
    # "last" (the first tau - 1 calls run without a graph; an ablation, cheaper to backpropagate)
    fusion_backprop: str = "all"

    def __post_init__(self):
        _check(self.fusion_backprop in ("all", "last"), "fusion_backprop", "must be 'all' or 'last'")
        for name in ("lambda_class_scene", "lambda_fusion_instance", "lambda_fusion_scene"):
            _check(getattr(self, name) >= 0, name, "must be >= 0")
        _check(1 <= self.tau <= 50, "tau", "must be in 1..50")
        _check(0 <= self.fusion_t_min <= self.fusion_t_max <= 999, "fusion_t_min",
               "need 0 <= fusion_t_min <= fusion_t_max <= 999")


ADAPTERS = ("full", "lora")
# UNet attention projections, the modules diffusers' DreamBooth LoRA recipe adapts
DEFAULT_UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
DEFAULT_TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")  # CLIP text self-attention
_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")


@dataclass(frozen=True)
class LoraSettings:
    """Low-rank adapters (PEFT `LoraConfig`) trained instead of the full weights (`train.adapter: lora`).

    Each target is a module-name suffix, as PEFT matches them (`to_q` adapts every `...attn1.to_q`).
    """

    rank: int = 4  # r: rank of each adapter's update B @ A
    alpha: float = 4.0  # the update is scaled by alpha / rank
    unet_targets: tuple[str, ...] = DEFAULT_UNET_TARGETS
    # text-encoder modules to adapt (e.g. [q_proj, k_proj, v_proj, out_proj]) when train.train_text_encoder
    # is true; [] (the default, as diffusers' LoRA recipe): the text encoder stays the base's. Note: a
    # plain diffusers pipeline loads text-encoder adapters only with peft >= 0.22 (transformers' API).
    text_encoder_targets: tuple[str, ...] = ()

    def __post_init__(self):
        _check(1 <= self.rank <= 1024, "rank", f"must be in 1..1024, got {self.rank}")
        _check(self.alpha > 0, "alpha", f"must be > 0, got {self.alpha}")
        _check(len(self.unet_targets) >= 1, "unet_targets", "must name at least one UNet module (e.g. to_q)")
        for key in ("unet_targets", "text_encoder_targets"):
            names = getattr(self, key)
            for i, name in enumerate(names):
                _check(_MODULE_NAME.fullmatch(name) is not None, f"{key}[{i}]",
                       f"{_show(name)} is not a module name (e.g. to_q, to_out.0, q_proj)")
            _check(len(set(names)) == len(names), key, "lists a module twice")


@dataclass(frozen=True)
class TrainConfig:
    """The finetune of one subject (supplement B)."""

    steps: int = 1200
    lr: float = 1e-5
    batch_size: int = 1
    optimizer: str = "adamw"  # "adamw" or "adamw8bit" (bitsandbytes)
    weight_decay: float = 1e-2
    grad_clip: float = 1.0  # max grad norm; 0 disables clipping
    gradient_checkpointing: bool = False
    mixed_precision: str = "bf16"  # "bf16" or "no"; bf16 autocast only on CUDA
    train_text_encoder: bool = True
    num_instance_images: int = 1  # N^I: how many of the subject's photos to train on (1 to 5)
    seed: int = 0
    checkpoint_every: int = 200  # steps between resumable checkpoints (Ray Train reports)
    validate_every: int = 0  # steps between validation samples per scene; 0: only at the end
    validation_scenes: int = 3  # how many scenes get a validation image
    checkpoint_dtype: str = "fp16"  # dtype of the published subject checkpoint: "fp16" or "fp32"
    # every N steps, the gradient norm of each weighted loss term alone (one backward pass per
    # term, so that step costs more), reported to callbacks as `on_grad_norms`; 0: never
    grad_norm_every: int = 0
    # "full": every UNet (and text-encoder) weight is trained (the paper); "lora": only low-rank
    # adapters (`train.lora`), the base stays frozen and the checkpoint is a few MB; the text encoder
    # then gets adapters only when train_text_encoder is true and lora.text_encoder_targets names modules
    adapter: str = "full"
    lora: LoraSettings = field(default_factory=LoraSettings)

    @property
    def trains_text_encoder(self) -> bool:
        """Whether the text encoder changes: all of it (full), or adapters on the named modules (lora)."""
        return self.train_text_encoder and (self.adapter == "full" or bool(self.lora.text_encoder_targets))

    def __post_init__(self):
        _check(self.adapter in ADAPTERS, "adapter", f"must be one of {', '.join(ADAPTERS)}, got {_show(self.adapter)}")
        _check(self.grad_norm_every >= 0, "grad_norm_every", "must be >= 0")
        _check(self.steps >= 1, "steps", "must be >= 1")
        _check(0 < self.lr < 1, "lr", "must be in (0, 1)")
        _check(self.batch_size >= 1, "batch_size", "must be >= 1")
        _check(self.optimizer in ("adamw", "adamw8bit"), "optimizer", "must be 'adamw' or 'adamw8bit'")
        _check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        _check(self.grad_clip >= 0, "grad_clip", "must be >= 0")
        _check(self.mixed_precision in ("bf16", "no"), "mixed_precision", "must be 'bf16' or 'no'")
        _check(1 <= self.num_instance_images <= 5, "num_instance_images", "must be in 1..5")
        _check(self.checkpoint_every >= 1, "checkpoint_every", "must be >= 1")
        _check(self.validate_every >= 0, "validate_every", "must be >= 0")
        _check(self.validation_scenes >= 0, "validation_scenes", "must be >= 0")
        _check(self.checkpoint_dtype in ("fp16", "fp32"), "checkpoint_dtype", "must be 'fp16' or 'fp32'")


@dataclass(frozen=True)
class JobSection:
    """How jobs wire the algorithm to Ray and MLflow."""

    name: str = "comfusion"  # MLflow experiment name and Ray run-name prefix
    methods: tuple[str, ...] = ("comfusion",)  # train each subject with each of these
    storage: str = "storage"  # root of the prior cache, Ray Train storage and checkpoints
    # MLflow tracking + registry URI; "" = $MLFLOW_TRACKING_URI of the job (its runtime env), else
    # sqlite in `storage`. Set here, it reaches the job however it is submitted.
    tracking_uri: str = ""
    max_failures: int = 2  # Ray Train worker restarts per subject before it fails for good
    max_concurrent: int = 0  # subjects training at once; 0: as many as the cluster has room for
    cpus_per_trainer: float = 1.0  # CPU slots per training worker when there is no GPU
    use_gpu: str = "auto"  # "auto", "yes" or "no"
    schedule_timeout_s: float = 300.0  # give up (naming what holds the cluster) when nothing fits this long
    progress_every_s: float = 15.0  # a progress line per training run at most this often
    mlflow_outage_s: float = 600.0  # a training run rides out an MLflow outage this long; longer ones fail it
    metrics_every_s: float = 5.0  # per-step metrics reach MLflow at least this often while a run trains (0: at checkpoints only)
    system_metrics: bool = True  # MLflow system metrics (CPU, memory, GPU) on each training run

    def __post_init__(self):
        _check(isinstance(self.name, str) and JOB_NAME_PATTERN.fullmatch(self.name) is not None, "name",
               f"{_show(self.name)} must match {JOB_NAME_PATTERN.pattern} (letters, digits, '.', '_' and '-', "
               f"at most {MAX_JOB_NAME} characters; it names the MLflow experiment and a storage folder)")
        _check(len(self.methods) >= 1, "methods", "needs at least one method")
        for m in self.methods:
            _check(m in METHODS, "methods", f"unknown method '{m}'; known: {', '.join(METHODS)}")
        _check(len(set(self.methods)) == len(self.methods), "methods", "lists a method twice")
        _check(self.max_failures >= 0, "max_failures", "must be >= 0")
        _check(self.max_concurrent >= 0, "max_concurrent", "must be >= 0")
        _check(self.cpus_per_trainer > 0, "cpus_per_trainer", "must be > 0")
        _check(self.use_gpu in ("auto", "yes", "no"), "use_gpu", "must be 'auto', 'yes' or 'no'")
        _check(self.schedule_timeout_s > 0, "schedule_timeout_s", "must be > 0")
        _check(self.progress_every_s > 0, "progress_every_s", "must be > 0")
        _check(self.mlflow_outage_s > 0, "mlflow_outage_s", "must be > 0 seconds")
        _check(self.metrics_every_s >= 0, "metrics_every_s", "must be >= 0 seconds (0: at checkpoints only)")


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation (supplement C and E): which prompts, how many images, which judges."""

    images_per_prompt: int = 10  # n images per prompt, as the paper
    prompt_sets: tuple[str, ...] = ("specific", "unseen")  # the 15 paper scenes; the 25 DreamBooth prompts
    dino: str = "tiny"  # DINO ViT-S/16 judge, e.g. "facebook/dino-vits16"
    clip_judges: tuple[str, ...] = ("tiny",)  # e.g. ViT-B/32 (paper-comparable) and ViT-L/14 (unseen in training)
    # a second DINO that no loss uses, scored beside `dino` as metric "dino_heldout" ("" = none): the
    # paper's DINO metric is DINO ViT-S/16, the model L_F^I trains against; e.g. "facebook/dinov2-small"
    heldout_dino: str = ""
    seed: int = 1000  # base seed; the same seeds for every method
    batch_size: int = 16  # images per sampler / judge batch
    out: str = "outputs/eval"  # folder of the CSV, the Markdown table and the chart

    def __post_init__(self):
        _check(self.images_per_prompt >= 1, "images_per_prompt", "must be >= 1")
        _check(len(self.prompt_sets) >= 1 and set(self.prompt_sets) <= {"specific", "unseen"}, "prompt_sets",
               "must list 'specific' and/or 'unseen'")
        _check(bool(self.dino.strip()), "dino", "must name a judge")
        _check(len(self.clip_judges) >= 1 and all(j.strip() for j in self.clip_judges), "clip_judges",
               "must name at least one CLIP judge")
        _check(self.batch_size >= 1, "batch_size", "must be >= 1")


@dataclass(frozen=True)
class JobConfig:
    """A whole job: what to train, how, and where results go."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    priors: PriorConfig = field(default_factory=PriorConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    job: JobSection = field(default_factory=JobSection)
    eval: EvalConfig = field(default_factory=EvalConfig)
    method: str = "comfusion"  # the method of this run (jobs set it per run from job.methods)

    def __post_init__(self):
        _check(self.method in METHODS, "method", f"unknown method '{self.method}'; known: {', '.join(METHODS)}")

    def replace(self, **overrides: Any) -> "JobConfig":
        """A copy with dotted keys replaced, e.g. `cfg.replace(**{"train.steps": 4})`."""
        values = to_dict(self)
        for dotted, value in overrides.items():
            node = values
            *parents, last = dotted.split(".")
            for p in parents:
                if not isinstance(node.get(p), dict):
                    raise ConfigError(dotted, "is not a config key")
                node = node[p]
            node[last] = to_dict(value) if dataclasses.is_dataclass(value) else value
        return from_dict(values)


# ---------------------------------------------------------------------------------------
# dict <-> dataclass


def _convert(tp: Any, value: Any, key: str) -> Any:
    """Convert a YAML value to the annotated type `tp`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, key)
    if dataclasses.is_dataclass(tp):
        _check(isinstance(value, dict), key, f"must be a mapping, got {type(value).__name__}")
        return _build(tp, value, key)
    if origin is tuple:
        _check(isinstance(value, (list, tuple)), key, f"must be a list, got {type(value).__name__}")
        (item_tp, *_rest) = typing.get_args(tp)
        return tuple(_convert(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        _check(isinstance(value, bool), key, f"must be true or false, got {value!r}")
        return value
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), key, f"must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), key, f"must be a number, got {value!r}")
        return float(value)
    if tp is str:
        _check(isinstance(value, str), key, f"must be a string, got {value!r}")
        return value
    raise ConfigError(key, f"unsupported type {tp}")


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in values:
        if k not in names:
            raise ConfigError(f"{prefix}{'.' if prefix else ''}{k}", f"unknown key; known keys: {', '.join(sorted(names))}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}{'.' if prefix else ''}{f.name}"
        if f.name in values:
            kwargs[f.name] = _convert(hints[f.name], values[f.name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(key, "is required")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        if prefix and not e.key.startswith(prefix + "."):
            raise ConfigError(f"{prefix}.{e.key}", str(e).split(": ", 1)[1]) from None
        raise


def from_dict(values: dict) -> JobConfig:
    """Build a JobConfig from nested dicts (as YAML gives them)."""
    if not isinstance(values, dict):
        raise ConfigError("<root>", "a config must be a mapping")
    return _build(JobConfig, values)


def to_dict(cfg: Any) -> dict:
    """Nested plain dict of a config (tuples become lists, so it dumps to YAML)."""

    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        return v

    return plain(cfg)


def flatten(cfg: Any) -> dict[str, Any]:
    """Dotted keys -> scalar values, for logging as params (`train.lr` -> 1e-05)."""
    out: dict[str, Any] = {}

    def walk(prefix: str, v: Any) -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                walk(f"{prefix}.{k}" if prefix else k, x)
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            out[prefix] = len(v)  # subjects: logged as a count; each run is tagged with its own
        else:
            out[prefix] = v

    walk("", to_dict(cfg))
    return out


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` strings (value parsed as YAML) to nested dicts, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "an override must look like section.key=value")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        node = values
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(dotted, "is not a section")
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    return values


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> JobConfig:
    """Load a YAML config (or the defaults when `path` is None) and apply dotted overrides.

    `data.root` is resolved against the config file's folder (the current folder without a
    file) and written back as an absolute path; image paths are resolved against it and must stay
    inside it unless `data.allow_absolute_paths` is true.
    """
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError("<file>", f"config file '{path}' does not exist")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError("<file>", f"'{path}' is not valid YAML: {e}") from None
        if not isinstance(values, dict):
            raise ConfigError("<root>", f"'{path}' must hold a mapping")
    apply_overrides(values, overrides or [])
    _resolve_subject_paths(values, path.parent if path is not None else Path.cwd())
    return from_dict(values)


def _resolve_subject_paths(values: dict, config_dir: Path) -> None:
    """Resolve image paths against `data.root` (itself relative to the config file's folder),
    refusing a path that leaves it unless `data.allow_absolute_paths`; writes the resolved root back."""
    data = values.get("data")
    if not isinstance(data, dict):
        return
    root = data.get("root") or ""
    if not isinstance(root, str):
        return  # from_dict names the wrong type
    base = Path(os.path.normpath(config_dir.absolute() / root))
    data["root"] = str(base)
    if not isinstance(data.get("subjects"), list):
        return
    allow = data.get("allow_absolute_paths") is True
    for i, s in enumerate(data["subjects"]):
        if isinstance(s, dict) and isinstance(s.get("images"), list):
            s["images"] = [_inside_root(base, p, allow, f"data.subjects[{i}].images[{j}]") if isinstance(p, str) else p
                           for j, p in enumerate(s["images"])]


def _inside_root(base: Path, path: str, allow: bool, key: str) -> str:
    resolved = Path(os.path.normpath(base / path))  # an absolute `path` stays itself
    _check(allow or resolved.is_relative_to(base), key,
           f"image path {_show(path)} lies outside data.root ({base}); use a path inside it, or set "
           "data.allow_absolute_paths: true for a trusted config")
    return str(resolved)


def dump_config(cfg: JobConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
