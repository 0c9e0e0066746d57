"""Model loading that needs no network: built-in presets and the ordinary `from_pretrained`.

Every model is named by a string: a built-in preset (`tiny`, `sd15-arch`), a local folder,
or a hub id. Presets are built in code from configs with seeded random weights; the small
ones are written once into a cache folder with `save_pretrained` and then loaded by folder,
so they take the very path that real weights take.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTokenizer, ViTConfig, ViTModel
from tokenizers import AddedToken
from transformers.convert_slow_tokenizer import bytes_to_unicode

from comfusion.fsutil import atomic_dir, cache_root  # noqa: F401 - cache_root re-exported: models.cache_root()
from comfusion.judges import Judges

if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "").lower() in ("1", "true", "yes", "on"):
    # transformers and huggingface_hub read this switch; diffusers' own bars (one per sharded
    # weight file load) do not, so the same setting is applied to them here
    from diffusers.utils import logging as _diffusers_logging

    _diffusers_logging.disable_progress_bar()
from comfusion.prompts import IDENTIFIER_TOKENS

SD15_HUB_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


class ModelNotFoundError(OSError):
    """A named model is neither a preset, nor a local folder with weights, nor reachable."""

    def __init__(self, name: str, part: str, cause: Exception | None = None):
        self.name = name
        msg = (f"model '{name}' ({part}) could not be loaded: its weights must be present locally "
               f"(a folder, or the Hugging Face cache) or reachable on the hub. "
               f"Built-in presets: {', '.join(sorted(BASE_PRESETS))}.")
        if cause is not None:
            msg += f" Cause: {type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
        super().__init__(msg)


# ---------------------------------------------------------------------------------------
# the byte-level tokenizer


def build_byte_tokenizer(model_max_length: int = 77,
                         identifiers: tuple[str, ...] = IDENTIFIER_TOKENS) -> CLIPTokenizer:
    """A CLIP tokenizer whose vocabulary is the 256 byte symbols (and their `</w>` forms),
    plus one token per word of `identifiers`.

    With no merges every character is one token, so it tokenizes any prompt without a
    vocabulary download; it saves and loads like SD 1.5's tokenizer. The identifier words are
    added tokens (ids after BOS and EOS, so the byte ids never move) matched as whole words:
    "a sks ball" gives a, sks, b, a, l, l, while "tasks" stays bytes. A text encoder for this
    tokenizer needs rows for them: `add_identifier_tokens` adds both at once.
    """
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], bos_token=BOS, eos_token=EOS, pad_token=EOS,
                              unk_token=EOS, model_max_length=model_max_length)
    tokenizer.add_tokens([AddedToken(w, single_word=True, normalized=True) for w in identifiers])
    return tokenizer


def add_identifier_tokens(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, seed: int = 0,
                          identifiers: tuple[str, ...] = IDENTIFIER_TOKENS) -> list[int]:
    """Reserve `identifiers` as single tokens of `tokenizer` and give `text_encoder` their rows.

    How the rows start: each new row of the token embedding is drawn, from its own seeded
    generator, from a normal distribution with the per-dimension mean and standard deviation
    of the existing rows. An identifier so starts as a token of the vocabulary's typical scale
    that means nothing yet, as a rare token of a pretrained vocabulary ("sks" in SD 1.5's)
    does; finetuning gives it the subject. The global RNG is left untouched, and words the
    tokenizer already holds are skipped. Returns the ids of the words added.
    """
    new = [w for w in identifiers if w not in tokenizer.get_vocab()]
    tokenizer.add_tokens([AddedToken(w, single_word=True, normalized=True) for w in new])
    old = text_encoder.get_input_embeddings().weight.shape[0]
    if len(tokenizer) == old:
        return []
    with torch.random.fork_rng(devices=[]):  # the resize initialises its new rows from the global RNG
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # rows drawn below
    with torch.no_grad():
        weight = text_encoder.get_input_embeddings().weight  # (V + K, D)
        mean, std = weight[:old].mean(0), weight[:old].std(0)  # (D,) each
        g = torch.Generator().manual_seed(seed)
        weight[old:] = mean + std * torch.randn(len(tokenizer) - old, weight.shape[1], generator=g).to(weight)
    return list(range(old, len(tokenizer)))


# ---------------------------------------------------------------------------------------
# preset shapes


@dataclass(frozen=True)
class BasePreset:
    """Shapes of a base text-to-image model built with random weights."""

    unet: dict
    vae: dict
    text: dict
    resolution: int


def sd15_scheduler_config() -> dict:
    # SD 1.5's noise schedule: scaled_linear betas 0.00085..0.012 over 1000 steps.
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


BASE_PRESETS: dict[str, BasePreset] = {
    "tiny": BasePreset(
        unet=dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                  attention_head_dim=8, norm_num_groups=32),
        vae=dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
                 down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                 up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), layers_per_block=1,
                 norm_num_groups=32, sample_size=32),
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=77, projection_dim=32, hidden_act="quick_gelu"),
        resolution=32,
    ),
    "sd15-arch": BasePreset(
        unet=dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                  block_out_channels=(320, 640, 1280, 1280),
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                  cross_attention_dim=768, attention_head_dim=8),
        vae=dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                 layers_per_block=2, sample_size=512),
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu"),
        resolution=512,
    ),
}

# Judges: a DINO-shaped ViT (ViT-S/16 for sd15-arch) and a CLIP (ViT-B/32 shapes for sd15-arch).
JUDGE_PRESETS: dict[str, dict] = {
    "tiny": dict(
        dino=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  image_size=224, patch_size=32),
        clip_text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        clip_vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         image_size=224, patch_size=32),
        projection_dim=32,
    ),
    "sd15-arch": dict(
        dino=dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                  image_size=224, patch_size=16),
        clip_text=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8),
        clip_vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                         image_size=224, patch_size=32),
        projection_dim=512,
    ),
}
# Presets written to the cache folder and loaded back with from_pretrained (small enough to save).
SAVED_PRESETS = ("tiny",)
# Part of the cache folder name of saved presets; bumped when what a preset holds changes
# (2: the tokenizer reserves the identifier tokens), so an older cached copy is never read.
PRESET_FORMAT = 2


def text_token_ids(tokenizer: CLIPTokenizer) -> dict:
    """The vocabulary size and special token ids a CLIP text config needs for `tokenizer`."""
    return dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.convert_tokens_to_ids(BOS),
                eos_token_id=tokenizer.convert_tokens_to_ids(EOS), pad_token_id=tokenizer.convert_tokens_to_ids(EOS))


def build_base_components(preset: str | BasePreset, seed: int = 0) -> dict:
    """The components of a base preset (a name of BASE_PRESETS, or shapes) with seeded random
    weights (same seed, same weights); the tokenizer reserves the identifier tokens."""
    preset = BASE_PRESETS[preset] if isinstance(preset, str) else preset
    tokenizer = build_byte_tokenizer(identifiers=())
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**preset.text, **text_token_ids(tokenizer)))
    add_identifier_tokens(tokenizer, text_encoder, seed=seed)  # own generator: the draws below stay as they were
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**preset.vae)
    torch.manual_seed(seed + 2)
    unet = UNet2DConditionModel(**preset.unet)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                scheduler=DDIMScheduler(**sd15_scheduler_config()))


def build_judge_components(preset: str | dict, seed: int = 0) -> dict:
    """A DINO-shaped ViTModel and a CLIPModel (with its tokenizer), seeded random weights.

    `preset` is a name of JUDGE_PRESETS or a dict of the same form. The CLIP tokenizer has no
    identifier tokens: judges score class and scene words, never an identifier.
    """
    p = JUDGE_PRESETS[preset] if isinstance(preset, str) else preset
    tokenizer = build_byte_tokenizer(identifiers=())
    torch.manual_seed(seed + 10)
    dino = ViTModel(ViTConfig(**p["dino"]), add_pooling_layer=False)
    torch.manual_seed(seed + 11)
    ids = text_token_ids(tokenizer)
    clip = CLIPModel(CLIPConfig(text_config={**p["clip_text"], **ids, "max_position_embeddings": 77},
                                vision_config=p["clip_vision"], projection_dim=p["projection_dim"]))
    return dict(dino=dino, clip=clip, clip_tokenizer=tokenizer)


# ---------------------------------------------------------------------------------------
# saving presets to folders


# Weight files are cut into shards of at most this size: a committed preset travels in every
# `ray job submit --working-dir .` upload, and Ray warns about each file over 10 MiB.
SHARD_SIZE = "8MB"


def save_base(components: dict, folder: str | Path) -> Path:
    """Write base components in the diffusers folder layout (unet/, vae/, text_encoder/, ...)."""
    folder = Path(folder)
    for part in ("unet", "vae", "text_encoder"):
        components[part].save_pretrained(folder / part, max_shard_size=SHARD_SIZE)
    for part in ("tokenizer", "scheduler"):
        components[part].save_pretrained(folder / part)
    return folder


def save_judges(components: dict, folder: str | Path) -> Path:
    """Write the judges as two from_pretrained folders: dino/ (ViTModel) and clip/ (CLIPModel + tokenizer)."""
    folder = Path(folder)
    components["dino"].save_pretrained(folder / "dino")
    components["clip"].save_pretrained(folder / "clip")
    components["clip_tokenizer"].save_pretrained(folder / "clip")
    return folder


def materialize_preset(name: str, seed: int = 0, kind: str = "base") -> Path:
    """The cache folder holding preset `name` (written on first use, published atomically, so
    concurrent processes never see a half-written preset; the loser of a race discards its copy)."""
    folder = cache_root() / "presets" / f"{kind}-{name}-v{PRESET_FORMAT}-seed{seed}"
    if folder.exists():
        return folder
    with atomic_dir(folder, replace=False) as tmp:
        if kind == "base":
            save_base(build_base_components(name, seed), tmp)
        else:
            save_judges(build_judge_components(name, seed), tmp)
    return folder


# ---------------------------------------------------------------------------------------
# loading


def _from_pretrained(cls, name: str, part: str, **kwargs):
    try:
        return cls.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:  # missing files, no network, not a repo
        raise ModelNotFoundError(name, part, e) from None


def resolve_base(name: str, seed: int = 0) -> str:
    """Folder or hub id from which the base model of `name` loads."""
    if name in SAVED_PRESETS:
        return str(materialize_preset(name, seed, "base"))
    from comfusion import presets_dir  # noqa: PLC0415  (committed presets, e.g. the toy world)

    committed = presets_dir() / name
    return str(committed) if (committed / "unet").is_dir() else name


def load_base(name: str, *, revision: str | None = None, seed: int = 0,
              device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """UNet, VAE, text encoder, tokenizer and DDIM scheduler of base model `name`.

    `name` is a preset, a folder in the diffusers layout, or a hub id. Random-weight presets
    that are too large to save (`sd15-arch`) are built directly in memory.
    """
    if name in BASE_PRESETS and name not in SAVED_PRESETS:
        parts = build_base_components(name, seed)
    else:
        src = resolve_base(name, seed)
        kw = dict(revision=revision) if revision else {}
        mkw = dict(kw, torch_dtype=dtype)
        parts = dict(
            unet=_from_pretrained(UNet2DConditionModel, src, "unet", subfolder="unet", **mkw),
            vae=_from_pretrained(AutoencoderKL, src, "vae", subfolder="vae", **mkw),
            text_encoder=_from_pretrained(CLIPTextModel, src, "text_encoder", subfolder="text_encoder", **mkw),
            tokenizer=_from_pretrained(CLIPTokenizer, src, "tokenizer", subfolder="tokenizer", **kw),
            scheduler=_from_pretrained(DDIMScheduler, src, "scheduler", subfolder="scheduler", **kw),
        )
    for part in ("unet", "vae", "text_encoder"):
        module = parts[part]
        module.to(device=device) if module.dtype == dtype else module.to(device=device, dtype=dtype)
        module.eval()
    return parts


def noise_schedule(scheduler) -> DDPMScheduler:
    """The training noise schedule (DDPM) with the same betas as the sampler's."""
    return DDPMScheduler.from_config(scheduler.config)


def load_judges(dino: str = "tiny", clip: str = "tiny", *, seed: int = 0,
                device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Judges:
    """The DINO judge (ViTModel) and the CLIP judge (CLIPModel + tokenizer), frozen.

    Each name is a preset (`tiny`, `sd15-arch`), a folder or a hub id such as
    `facebook/dino-vits16` / `openai/clip-vit-base-patch32`.
    """
    if dino in JUDGE_PRESETS and dino not in SAVED_PRESETS and dino == clip:
        parts = build_judge_components(dino, seed)  # too large to save: built in memory
        return Judges(parts["dino"], parts["clip"], parts["clip_tokenizer"]).to(device=device, dtype=dtype)

    def src(name: str, sub: str) -> str:
        if name in JUDGE_PRESETS:
            return str(materialize_preset(name, seed, "judges") / sub)
        from comfusion import presets_dir  # noqa: PLC0415

        committed = presets_dir() / name / sub
        return str(committed) if committed.is_dir() else name

    dino_model = _from_pretrained(ViTModel, src(dino, "dino"), "dino judge", add_pooling_layer=False)
    clip_src = src(clip, "clip")
    clip_model = _from_pretrained(CLIPModel, clip_src, "clip judge")
    tokenizer = _from_pretrained(CLIPTokenizer, clip_src, "clip judge tokenizer")
    return Judges(dino_model, clip_model, tokenizer).to(device=device, dtype=dtype)
