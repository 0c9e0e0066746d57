"""The committed `toy` preset and judges load through the normal loading path (issue 8)."""
from pathlib import Path

import numpy as np
import torch

from comfusion import presets_dir
from comfusion.models import load_base, load_judges, resolve_base
from comfusion.sampling import sample
from comfusion.toy.world import HELD_OUT_SEED_START, make_instance, render, scene_of

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


HELDOUT = presets_dir() / "toy-heldout"


def test_heldout_judges_are_committed_small_and_apart_from_the_training_judges():
    """`toy-heldout` (issue 16): another seed's judges in fp16, loaded in fp32, with other weights."""
    files = [p for p in HELDOUT.rglob("*") if p.is_file()]
    assert (HELDOUT / "dino" / "model.safetensors").is_file() and (HELDOUT / "clip" / "model.safetensors").is_file()
    assert sum(p.stat().st_size for p in files) < 2 * 2**20  # fp16
    assert sum(p.stat().st_size for p in files + [p for p in TOY.rglob("*") if p.is_file()]) <= 20 * 2**20
    held, train = load_judges("toy-heldout", "toy-heldout"), load_judges("toy", "toy")
    w_held = next(held.dino.parameters())
    assert w_held.dtype == torch.float32 and not any(p.requires_grad for p in held.parameters())
    assert not torch.allclose(w_held, next(train.dino.parameters()))
    x = torch.from_numpy(np.stack([render(make_instance(HELD_OUT_SEED_START + k), "on the grass", k)
                                   for k in range(2)])).permute(0, 3, 1, 2).float() / 127.5 - 1
    emb = held.dino_embed(x)
    assert emb.shape[0] == 2 and torch.isfinite(emb).all()
    assert float(torch.nn.functional.cosine_similarity(emb[0], emb[1], dim=0)) < 0.999  # tells two instances apart
