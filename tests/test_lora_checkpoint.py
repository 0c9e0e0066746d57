"""A LoRA subject loads into a plain diffusers StableDiffusionPipeline (built from the base
model's folders) with `load_lora_weights`, and renders the same image as the project's sampler
(`comfusion.lora.activate_lora` + `comfusion.sampling.sample`). Toy preset on disk, CPU."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from comfusion import presets_dir
from comfusion.checkpoint import SubjectMeta, verify_checkpoint
from comfusion.config import LoraSettings
from comfusion.lora import activate_lora, add_adapters, deactivate_lora, read_lora_subject, save_lora_subject
from comfusion.models import load_base
from comfusion.sampling import sample

TOY = presets_dir() / "toy"
PROMPT, SEED, STEPS = "a sks ball on the grass", 7, 4


def _subject(folder: Path, settings: LoraSettings, text: bool, seed: int) -> Path:
    """A LoRA subject with random (nonzero) adapters on the toy base, as training would leave one."""
    base = load_base(str(TOY))
    add_adapters(base["unet"], base["text_encoder"], settings, text, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in (base["unet"], base["text_encoder"]):
            for name, p in m.named_parameters():
                if "lora_B" in name:  # B starts at zero: give the adapter an effect
                    p.copy_(0.05 * torch.randn(p.shape, generator=g))
    meta = SubjectMeta(id="toy-ball", identifier="sks", class_noun="ball", base_model=str(TOY))
    return save_lora_subject(folder, base["unet"], base["text_encoder"], meta, settings, dtype="fp32")


def _plain_pipeline() -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(TOY, subfolder="vae"),
        text_encoder=CLIPTextModel.from_pretrained(TOY, subfolder="text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(TOY, subfolder="tokenizer"),
        unet=UNet2DConditionModel.from_pretrained(TOY, subfolder="unet"),
        scheduler=DDIMScheduler.from_pretrained(TOY, subfolder="scheduler"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _diffusers_image(pipe) -> np.ndarray:
    out = pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=7.5, generator=torch.Generator().manual_seed(SEED),
               output_type="np")
    return (np.clip(out.images[0], 0, 1) * 255).round().astype(np.uint8)  # (H, W, 3)


def _project_image(components) -> np.ndarray:
    return sample(components, [PROMPT], [SEED], steps=STEPS, guidance_scale=7.5).images[0]


@pytest.fixture(scope="module")
def unet_subject(tmp_path_factory):  # alpha != rank: the file's metadata must carry the scale
    return _subject(tmp_path_factory.mktemp("lora") / "s", LoraSettings(rank=4, alpha=8.0), False, 1)


def test_plain_diffusers_pipeline_matches_the_project_sampler(unet_subject):
    meta = verify_checkpoint(unet_subject)
    assert meta.kind == "lora" and meta.lora["rank"] == 4 and meta.lora["alpha"] == 8.0
    pipe = _plain_pipeline()
    base_image = _diffusers_image(pipe)
    pipe.load_lora_weights(str(unet_subject))
    theirs = _diffusers_image(pipe)

    components = load_base(str(TOY))
    assert np.abs(_project_image(components).astype(int) - base_image.astype(int)).max() <= 1
    activate_lora(components, read_lora_subject(unet_subject), "toy-ball@v1")
    ours = _project_image(components)
    assert np.abs(ours.astype(int) - base_image.astype(int)).mean() > 2  # the adapter changes the image
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1  # and both loaders apply it alike

    deactivate_lora(components, "toy-ball@v1")  # the base model is back
    assert np.abs(_project_image(components).astype(int) - base_image.astype(int)).max() <= 1


def test_text_encoder_adapters_and_hotswap(unet_subject, tmp_path):
    both = _subject(tmp_path / "both", LoraSettings(rank=4, alpha=8.0, text_encoder_targets=("q_proj", "v_proj")),
                    True, 2)
    components = load_base(str(TOY))
    activate_lora(components, read_lora_subject(both), "slot")
    first = _project_image(components)
    activate_lora(components, read_lora_subject(unet_subject), "slot", hotswap=True)  # same UNet targets and rank
    swapped = _project_image(components)
    assert not any("lora_" in n for n, _ in components["text_encoder"].named_parameters())  # its adapter went too

    fresh = load_base(str(TOY))
    activate_lora(fresh, read_lora_subject(unet_subject), "other")
    assert np.abs(swapped.astype(int) - _project_image(fresh).astype(int)).max() <= 1
    fresh_both = load_base(str(TOY))
    activate_lora(fresh_both, read_lora_subject(both), "x")
    assert np.abs(first.astype(int) - _project_image(fresh_both).astype(int)).max() <= 1
    assert np.abs(first.astype(int) - swapped.astype(int)).mean() > 1
