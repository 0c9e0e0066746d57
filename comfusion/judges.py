"""The frozen judges of the fusion losses (Eq. 5): DINO for L_F^I, CLIP for L_F^S.

Images reach the judges as tensors straight from the VAE decoder, in [-1, 1]. They are
resized and normalised with tensor ops (never PIL), so the gradient of a fusion loss
flows back through the judge into the decoded image, and from there into the UNet.
The judges' own weights are frozen. Loading by preset or hub id lives in `comfusion.models`.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # DINO's normalisation
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's image processor
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_MAX_LENGTH = 77  # CLIP's text context length


def _features(out) -> Tensor:
    """`get_*_features` gives a tensor in transformers 4 and a model output in 5
    (with the projected embedding in `pooler_output`); return the tensor either way."""
    return out if torch.is_tensor(out) else out.pooler_output


class Judges(nn.Module):
    """Frozen DINO (`transformers.ViTModel`) and CLIP (`transformers.CLIPModel`) judges.

    All image methods take float images (B, 3, H, W) in [-1, 1] and are differentiable
    with respect to them.
    """

    def __init__(self, dino: nn.Module, clip: nn.Module, clip_tokenizer):
        super().__init__()
        self.dino = dino
        self.clip = clip
        self.clip_tokenizer = clip_tokenizer  # not a module: holds no weights
        self.dino_size = int(dino.config.image_size)
        self.clip_size = int(clip.config.vision_config.image_size)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "Judges":
        """Judges stay in eval mode (no dropout) even when a parent module calls `.train()`."""
        return super().train(False)

    @staticmethod
    def preprocess(x: Tensor, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor,
                   size: int = 224) -> Tensor:
        """[-1, 1] images (B, 3, H, W) -> judge input (B, 3, size, size), differentiably.

        No clamp: the decoder can overshoot [-1, 1] a little and a clamp would zero the
        gradient there.
        """
        x = (x + 1) / 2  # (B, 3, H, W) in [0, 1]
        if x.shape[-2:] != (size, size):
            # antialias matters when shrinking (512 -> 224); its backward works on CPU and CUDA
            x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std

    def dino_embed(self, x: Tensor) -> Tensor:
        """DINO embedding: the CLS token of the last hidden state. (B, 3, H, W) -> (B, D)."""
        px = self.preprocess(x, IMAGENET_MEAN, IMAGENET_STD, self.dino_size).to(self.dino.dtype)
        return self.dino(pixel_values=px).last_hidden_state[:, 0]  # (B, D)

    def clip_image_embed(self, x: Tensor) -> Tensor:
        """Projected CLIP image embedding (not normalised). (B, 3, H, W) -> (B, P)."""
        px = self.preprocess(x, CLIP_MEAN, CLIP_STD, self.clip_size).to(self.clip.dtype)
        return _features(self.clip.get_image_features(pixel_values=px))  # (B, P)

    def clip_text_embed(self, texts: list[str]) -> Tensor:
        """Projected CLIP text embedding (not normalised) of B texts -> (B, P)."""
        tokens = self.clip_tokenizer(list(texts), padding="max_length", max_length=CLIP_MAX_LENGTH,
                                     truncation=True, return_tensors="pt").to(self.clip.device)
        out = self.clip.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        return _features(out)  # (B, P)
