"""The committed `toy` preset and judges load through the normal loading path (issue 8)."""
from pathlib import Path

import numpy as np

from comfusion import presets_dir
from comfusion.models import load_base, load_judges, resolve_base
from comfusion.sampling import sample
from comfusion.toy.world import scene_of

TOY = presets_dir() / "toy"


def test_toy_weights_are_committed_and_small():
    files = [p for p in TOY.rglob("*") if p.is_file()]
    # the UNet in shards under Ray's 10 MiB per-file upload warning (models.SHARD_SIZE)
    assert (TOY / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert max(p.stat().st_size for p in files) < 10 * 2**20
    assert (TOY / "dino" / "model.safetensors").is_file() and (TOY / "clip" / "model.safetensors").is_file()
    assert sum(p.stat().st_size for p in files) <= 20 * 2**20


def test_toy_base_loads_by_name_and_draws():
    assert Path(resolve_base("toy")) == TOY
    parts = load_base("toy")
    out = sample(parts, ["a red ball on the grass", "a blue box in the snow"], [0, 1], steps=10)
    assert out.images.shape == (2, 32, 32, 3) and out.images.std() > 5  # not a flat image
    assert np.isfinite(out.latents.numpy()).all()
    scene, _ = scene_of(out.images[0])
    assert isinstance(scene, str)


def test_toy_judges_load_by_name():
    judges = load_judges("toy", "toy")
    import torch

    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert judges.dino_embed(x).shape[0] == 2
    assert judges.clip_image_embed(x).shape == judges.clip_text_embed(["a red ball", "a box"]).shape
