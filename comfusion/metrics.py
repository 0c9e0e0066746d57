"""Evaluation metrics of supplement C: DINO, CLIP-I, CLIP-T, and the "Real Images" row.

- DINO: mean pairwise cosine between the DINO ViT-S/16 CLS embeddings of generated and real
  images (instance fidelity).
- CLIP-I: the same with CLIP image embeddings.
- CLIP-T: mean cosine between each generated image's CLIP image embedding and its prompt's
  CLIP text embedding (scene fidelity). The text is the prompt without the identifier
  ("a dog in the rain", i.e. T^CS): the judge never saw the rare token, which would only add noise.
- Real Images (Tables 1 and 3): each real image against the subject's other real images.

All scores are raw cosines in [-1, 1] (the paper's tables print them that way, not x100).

Preprocessing follows the metric protocol, not the training judges' path: DINO gets a resize of
the short side to 256, a centre crop of 224 and ImageNet mean/std; CLIP gets its own
processor's resize to 224, centre crop 224 and CLIP mean/std. (`comfusion.judges` resizes
straight to 224 so that gradients flow; metrics need no gradient and follow the protocol.)

The evaluation protocol (which prompts, which seeds) lives here too, so the Ray job, the plain
loop and the tests share it. This module never imports ray or mlflow.
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from comfusion.judges import CLIP_MAX_LENGTH, CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD
from comfusion.prompts import (LIVE_CLASSES, LIVE_SUBJECT_PROMPTS, OBJECT_PROMPTS, PAPER_SCENES,
                               class_scene_text, instance_scene_text)

PROMPT_SETS = ("specific", "unseen")  # the 15 paper scenes (Table 1); the 25 DreamBooth prompts (supp. E)
METRICS = ("dino", "clip_i", "clip_t")
# The DINO score of a second DINO that no loss uses (`eval.heldout_dino`, e.g. facebook/dinov2-small):
# the paper's DINO metric uses DINO ViT-S/16, the very model L_F^I maximises the cosine of.
HELDOUT_DINO_METRIC = "dino_heldout"
DINO_RESIZE, DINO_CROP = 256, 224  # the DINO metric protocol: resize short side 256, centre crop 224


# ---------------------------------------------------------------------------------------
# the protocol: prompts and seeds


@dataclass(frozen=True)
class EvalPrompt:
    """One evaluation prompt of a subject."""

    prompt_set: str  # "specific" or "unseen"
    index: int  # position in its set; with the image index it decides the seeds
    scene: str  # "in the rain"; for unseen prompts the template's words, e.g. "wearing a red hat"
    prompt: str  # what the sampler gets: "a sks dog in the rain"
    text: str  # what CLIP-T compares with: the prompt without the identifier, "a dog in the rain"


def _template_scene(template: str) -> str:
    """'a {} in the jungle' -> 'in the jungle'; 'a red {}' -> 'red' (a label shared by all subjects)."""
    words = template.replace("{}", " ").split()
    return " ".join(words[1:] if words[:1] == ["a"] else words)


def evaluation_plan(identifier: str, class_noun: str, prompt_sets: Sequence[str] = PROMPT_SETS,
                    scenes: Sequence[str] = PAPER_SCENES, max_prompts: int | None = None) -> list[EvalPrompt]:
    """The prompts a subject is evaluated on, set by set.

    "specific": T^IS = "a [identifier] [class noun] [scene]" for each of `scenes` (the paper's
    15 by default). "unseen": the 25 DreamBooth prompts (live-subject list for cats and dogs).
    `max_prompts` keeps only the first prompts of each set (smoke runs).
    """
    plan = []
    for prompt_set in prompt_sets:
        if prompt_set == "specific":
            rows = [(s, instance_scene_text(identifier, class_noun, s), class_scene_text(class_noun, s))
                    for s in scenes]
        elif prompt_set == "unseen":
            templates = LIVE_SUBJECT_PROMPTS if class_noun in LIVE_CLASSES else OBJECT_PROMPTS
            rows = [(_template_scene(t), t.format(f"{identifier} {class_noun}"), t.format(class_noun))
                    for t in templates]
        else:
            raise ValueError(f"unknown prompt set {prompt_set!r}; known: {', '.join(PROMPT_SETS)}")
        rows = rows[:max_prompts] if max_prompts is not None else rows
        plan += [EvalPrompt(prompt_set, i, scene, prompt, text) for i, (scene, prompt, text) in enumerate(rows)]
    return plan


def eval_seed(seed: int, prompt_index: int, image_index: int) -> int:
    """Seed of image `image_index` of prompt `prompt_index`: sha256 of the three, 63 bits.

    It depends on neither the subject nor the method, so every method is sampled from the
    same initial noise and differences between rows of a table come from the weights alone.
    """
    digest = hashlib.sha256(f"eval\x00{seed}\x00{prompt_index}\x00{image_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def slug(text: str) -> str:
    """A lower-case name for metric keys and files: 'on the top of mountain' -> 'on-the-top-of-mountain'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x"


# ---------------------------------------------------------------------------------------
# preprocessing (tensor ops; no PIL, so the same code serves uint8 samples and photos)


def _unit_batch(images) -> Tensor:
    """uint8 (H, W, 3) / (B, H, W, 3) arrays or tensors, or float (3, H, W) / (B, 3, H, W) tensors
    in [-1, 1] -> float32 (B, 3, H, W) in [0, 1]."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.array(images, copy=True))  # PIL-backed arrays are read-only
    if not torch.is_tensor(images):
        raise TypeError(f"images must be arrays or tensors, got {type(images).__name__}")
    if images.dtype == torch.uint8:  # channels last
        x = images if images.ndim == 4 else images[None]
        if x.shape[-1] != 3:
            raise ValueError(f"uint8 images must be (B, H, W, 3), got {tuple(images.shape)}")
        return x.permute(0, 3, 1, 2).float() / 255.0
    x = images if images.ndim == 4 else images[None]
    if x.shape[1] != 3:
        raise ValueError(f"float images must be (B, 3, H, W) in [-1, 1], got {tuple(images.shape)}")
    return (x.float() + 1) / 2


def resize_center_crop(x: Tensor, resize: int, crop: int) -> Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, 3, crop, crop): short side to `resize` (bicubic, antialiased,
    as torchvision's Resize), then the centre `crop` x `crop` square."""
    h, w = x.shape[-2:]
    scale = resize / min(h, w)
    size = (resize, max(resize, int(w * scale))) if h <= w else (max(resize, int(h * scale)), resize)
    if (h, w) != size:
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    top, left = int(round((size[0] - crop) / 2)), int(round((size[1] - crop) / 2))
    return x[..., top:top + crop, left:left + crop]


def preprocess(images, resize: int, crop: int, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Images (a batch, or a list of single images of any sizes) -> normalised (B, 3, crop, crop)."""
    if isinstance(images, (list, tuple)):
        x = torch.cat([resize_center_crop(_unit_batch(im), resize, crop) for im in images])
    else:
        x = resize_center_crop(_unit_batch(images), resize, crop)
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


def dino_preprocess(images, size: int = DINO_CROP) -> Tensor:
    """The DINO metric protocol: short side 256, centre crop 224, ImageNet mean/std.
    For a judge with another input size the resize keeps the 256/224 ratio."""
    return preprocess(images, round(size * DINO_RESIZE / DINO_CROP), size, IMAGENET_MEAN, IMAGENET_STD)


def clip_preprocess(images, size: int = 224) -> Tensor:
    """CLIP's image processor: short side to `size`, centre crop `size`, CLIP mean/std."""
    return preprocess(images, size, size, CLIP_MEAN, CLIP_STD)


# ---------------------------------------------------------------------------------------
# the math, on embeddings


def cosine_matrix(a: Tensor, b: Tensor) -> Tensor:
    """Cosines between every row of a (N, D) and every row of b (M, D) -> (N, M), in float64,
    clamped to [-1, 1] (rounding can put an image against itself at 1 + 2e-16)."""
    return (F.normalize(a.double(), dim=-1) @ F.normalize(b.double(), dim=-1).T).clamp(-1.0, 1.0)


def mean_pairwise_cosine(generated: Tensor, real: Tensor) -> float:
    """Mean cosine over all (generated, real) pairs: DINO and CLIP-I. (N, D), (M, D) -> float."""
    if len(generated) == 0 or len(real) == 0:
        raise ValueError("need at least one generated and one real embedding")
    return float(cosine_matrix(generated, real).mean())


def dino_score(generated: Tensor, real: Tensor) -> float:
    """DINO score: mean pairwise cosine of DINO CLS embeddings, generated (N, D) vs real (M, D)."""
    return mean_pairwise_cosine(generated, real)


def clip_i_score(generated: Tensor, real: Tensor) -> float:
    """CLIP-I: mean pairwise cosine of CLIP image embeddings, generated (N, P) vs real (M, P)."""
    return mean_pairwise_cosine(generated, real)


def clip_t_score(images: Tensor, texts: Tensor) -> float:
    """CLIP-T: mean cosine of image i (N, P) with its text: texts is (N, P), or (1, P) for all."""
    if texts.shape[0] not in (1, images.shape[0]):
        raise ValueError(f"{images.shape[0]} images but {texts.shape[0]} text embeddings")
    cos = (F.normalize(images.double(), dim=-1) * F.normalize(texts.double(), dim=-1)).sum(-1)  # (N,)
    return float(cos.clamp(-1.0, 1.0).mean())


def real_images_score(real: Tensor) -> float:
    """Mean cosine of each real image (M, D) with each *other* one; NaN when M < 2."""
    m = len(real)
    if m < 2:
        return math.nan
    cos = cosine_matrix(real, real)
    return float((cos.sum() - cos.diagonal().sum()) / (m * (m - 1)))


# ---------------------------------------------------------------------------------------
# embeddings and scores of a group of images


@dataclass
class ImageEmbeddings:
    """Judge embeddings of N images: DINO (N, D) and one (N, P) per CLIP judge name."""

    dino: Tensor
    clip: dict[str, Tensor] = field(default_factory=dict)
    heldout_dino: dict[str, Tensor] = field(default_factory=dict)  # name -> (N, D') of a DINO no loss uses

    def __len__(self) -> int:
        """The number of images N."""
        return len(self.dino)

    def select(self, index) -> "ImageEmbeddings":
        """The rows `index` (a slice, a list of positions or a bool mask) of every embedding."""
        return ImageEmbeddings(self.dino[index], {k: v[index] for k, v in self.clip.items()},
                               {k: v[index] for k, v in self.heldout_dino.items()})


@dataclass(frozen=True)
class Score:
    """One number of a report: which judge gave it and which metric it is."""

    judge: str  # e.g. "facebook/dino-vits16", "openai/clip-vit-base-patch32"
    metric: str  # "dino", "clip_i" or "clip_t"
    value: float


def image_scores(generated: ImageEmbeddings, real: ImageEmbeddings, texts: dict[str, Tensor],
                 dino_judge: str) -> list[Score]:
    """DINO, and CLIP-I and CLIP-T for each CLIP judge, of one group of generated images.

    `texts` maps each CLIP judge to the text embedding(s) of the group's prompt: (1, P) or (N, P).
    """
    scores = [Score(dino_judge, "dino", dino_score(generated.dino, real.dino))]
    scores += [Score(judge, HELDOUT_DINO_METRIC, dino_score(emb, real.heldout_dino[judge]))
               for judge, emb in generated.heldout_dino.items() if judge in real.heldout_dino]
    for judge, emb in generated.clip.items():
        scores.append(Score(judge, "clip_i", clip_i_score(emb, real.clip[judge])))
        scores.append(Score(judge, "clip_t", clip_t_score(emb, texts[judge])))
    return scores


@dataclass(frozen=True)
class RealImagesScores:
    """The "Real Images" row for one subject; NaN scores and a reason when it has < 2 photos."""

    n_images: int
    scores: tuple[Score, ...]
    reason: str | None = None  # why the scores are NaN


def real_images_scores(real: ImageEmbeddings, dino_judge: str) -> RealImagesScores:
    """DINO and CLIP-I of each real image against the subject's other real images (no CLIP-T)."""
    n = len(real)
    scores = [Score(dino_judge, "dino", real_images_score(real.dino))]
    scores += [Score(judge, HELDOUT_DINO_METRIC, real_images_score(emb)) for judge, emb in real.heldout_dino.items()]
    scores += [Score(judge, "clip_i", real_images_score(emb)) for judge, emb in real.clip.items()]
    reason = None if n >= 2 else f"needs at least 2 real images, the subject has {n}"
    return RealImagesScores(n, tuple(scores), reason)


# ---------------------------------------------------------------------------------------
# the scorer: judges loaded once, batched embedding


def _projected(out) -> Tensor:
    """`get_*_features` returns a tensor (transformers 4) or an output with `pooler_output` (5)."""
    return out if torch.is_tensor(out) else out.pooler_output


class Scorer:
    """One DINO judge and one or more CLIP judges, frozen; embeds images and texts in batches.

    Images are uint8 (B, H, W, 3) arrays (as `sampling.sample` gives), float (B, 3, H, W)
    tensors in [-1, 1], or a list of single images of any sizes (photos). Embeddings come
    back as float32 CPU tensors.
    """

    def __init__(self, dino: nn.Module, clips: dict[str, tuple[nn.Module, object]], *,
                 dino_name: str = "dino", batch_size: int = 16, heldout_dino: dict[str, nn.Module] | None = None):
        if not clips:
            raise ValueError("a Scorer needs at least one CLIP judge")
        self.dino, self.dino_name = dino.eval(), dino_name
        self.heldout_dino = {name: m.eval() for name, m in (heldout_dino or {}).items()}
        self.clips = {name: (model.eval(), tokenizer) for name, (model, tokenizer) in clips.items()}
        self.batch_size = batch_size
        self.device = next(dino.parameters()).device

    @classmethod
    def load(cls, dino: str, clip_judges: Sequence[str], *, seed: int = 0, device: str | torch.device = "cpu",
             batch_size: int = 16, heldout_dino: str = "") -> "Scorer":
        """Load the judges by preset name, folder or hub id (see `models.load_judges`), in float32;
        `heldout_dino` ("" for none) is a second DINO scored beside `dino` (`load_heldout_dino`)."""
        from comfusion.models import load_judges  # noqa: PLC0415  (models imports judges; keep this light)

        clips, dino_model = {}, None
        for name in dict.fromkeys(clip_judges):
            judges = load_judges(dino, name, seed=seed, device=device, dtype=torch.float32)
            if dino_model is None:
                dino_model = judges.dino  # one DINO; the copies the other loads bring are dropped
            clips[name] = (judges.clip, judges.clip_tokenizer)
        extra = {heldout_dino: load_heldout_dino(heldout_dino, seed=seed, device=device)} if heldout_dino else {}
        return cls(dino_model, clips, dino_name=dino, batch_size=batch_size, heldout_dino=extra)

    @property
    def clip_names(self) -> list[str]:
        """The CLIP judges' names, in the order given."""
        return list(self.clips)

    def _chunks(self, images):
        """Slices of `batch_size` images (a single image counts as a batch of one)."""
        if not isinstance(images, (list, tuple)) and images.ndim == 3:
            images = images[None]  # one image
        for i in range(0, len(images), self.batch_size):
            yield images[i:i + self.batch_size]

    @torch.inference_mode()
    def dino_embed(self, images) -> Tensor:
        """DINO CLS embeddings (N, D)."""
        size = int(self.dino.config.image_size)
        out = [self.dino(pixel_values=dino_preprocess(c, size).to(self.device, self.dino.dtype)
                         ).last_hidden_state[:, 0] for c in self._chunks(images)]
        return torch.cat(out).float().cpu()

    @torch.inference_mode()
    def heldout_dino_embed(self, images, judge: str) -> Tensor:
        """CLS embeddings (N, D') of the held-out DINO `judge`, same protocol as `dino_embed`."""
        model = self.heldout_dino[judge]
        size = min(int(model.config.image_size), DINO_CROP)  # DINOv2 says 518 but is evaluated at 224
        out = [model(pixel_values=dino_preprocess(c, size).to(self.device, model.dtype)).last_hidden_state[:, 0]
               for c in self._chunks(images)]
        return torch.cat(out).float().cpu()

    @torch.inference_mode()
    def clip_image_embed(self, images, judge: str) -> Tensor:
        """Projected CLIP image embeddings (N, P) of judge `judge`."""
        model, _ = self.clips[judge]
        size = int(model.config.vision_config.image_size)
        out = [_projected(model.get_image_features(pixel_values=clip_preprocess(c, size).to(self.device, model.dtype)))
               for c in self._chunks(images)]
        return torch.cat(out).float().cpu()

    @torch.inference_mode()
    def clip_text_embed(self, texts: Sequence[str], judge: str) -> Tensor:
        """Projected CLIP text embeddings (N, P) of judge `judge`."""
        model, tokenizer = self.clips[judge]
        out = []
        for chunk in self._chunks(list(texts)):
            tok = tokenizer(list(chunk), padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=True,
                            return_tensors="pt").to(self.device)
            out.append(_projected(model.get_text_features(input_ids=tok.input_ids, attention_mask=tok.attention_mask)))
        return torch.cat(out).float().cpu()

    def embed_images(self, images) -> ImageEmbeddings:
        """DINO and every CLIP judge's image embeddings of the same images."""
        return ImageEmbeddings(self.dino_embed(images), {j: self.clip_image_embed(images, j) for j in self.clips},
                               {j: self.heldout_dino_embed(images, j) for j in self.heldout_dino})

    def embed_texts(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """Every CLIP judge's text embeddings (N, P) of `texts`."""
        return {j: self.clip_text_embed(texts, j) for j in self.clips}



def load_heldout_dino(name: str, *, seed: int = 0, device: str | torch.device = "cpu") -> nn.Module:
    """A DINO-role image model that no loss uses, float32 and frozen: a preset name (its DINO
    judge, e.g. `toy-heldout`), or a folder / hub id of any DINO family model transformers'
    `AutoModel` loads with a CLS token (`facebook/dinov2-small`, `facebook/dino-vits8`, ...)."""
    from comfusion import models, presets_dir  # noqa: PLC0415  (models imports judges; keep this light)

    if name in models.JUDGE_PRESETS or (presets_dir() / name / "dino").is_dir():
        return models.load_judges(name, name, seed=seed, device=device, dtype=torch.float32).dino
    from transformers import AutoModel  # noqa: PLC0415

    try:
        model = AutoModel.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise models.ModelNotFoundError(name, "held-out dino judge", e) from None
    return model.to(device=device, dtype=torch.float32).eval().requires_grad_(False)
