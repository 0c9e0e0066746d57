"""`comfusion.lora.SubjectSlot`: full and LoRA subjects, one at a time, in one base model (the
evaluator and the Serve replica use it). Every switch renders what a fresh base with only that
subject renders; the base weights come back under a LoRA subject. Tiny preset, CPU."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from comfusion.checkpoint import SubjectMeta, save_subject_checkpoint
from comfusion.config import JobConfig, LoraSettings
from comfusion.lora import SubjectSlot, add_adapters, save_lora_subject
from comfusion.models import load_base
from comfusion.sampling import sample
from jobs.evaluate import make_target

PROMPT = "a sks dog in the snow"


def _meta(sid: str) -> SubjectMeta:
    return SubjectMeta(id=sid, identifier="sks", class_noun="dog", base_model="tiny")


def _lora(folder, seed: int, rank: int = 2, text: bool = False, sid: str | None = None,
          targets: tuple[str, ...] = LoraSettings.unet_targets, alpha: float | None = None):
    base = load_base("tiny")
    settings = LoraSettings(rank=rank, alpha=2.0 * rank if alpha is None else alpha, unet_targets=targets,
                            text_encoder_targets=("q_proj",) if text else ())
    add_adapters(base["unet"], base["text_encoder"], settings, text, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in (base["unet"], base["text_encoder"]):
            for name, p in m.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return save_lora_subject(folder, base["unet"], base["text_encoder"], _meta(sid or f"lora-{seed}"), settings, dtype="fp32")


def _full(folder, seed: int):
    base = load_base("tiny")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in base["unet"].parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return save_subject_checkpoint(folder, base["unet"], base["text_encoder"], _meta(f"full-{seed}"), dtype="fp32")


def _image(components) -> np.ndarray:
    return sample(components, [PROMPT], [3], steps=3, guidance_scale=3.0).images[0].astype(int)


@pytest.fixture(scope="module")
def subjects(tmp_path_factory):
    root = tmp_path_factory.mktemp("slot")
    return {"full": _full(root / "full", 1), "lora_a": _lora(root / "a", 2), "lora_b": _lora(root / "b", 3),
            "lora_r4": _lora(root / "c", 4, rank=4, text=True)}


@pytest.fixture(scope="module")
def alone(subjects):
    """Each subject rendered in a fresh base of its own, and the base itself."""
    out = {"base": _image(load_base("tiny"))}
    for name, folder in subjects.items():
        components = load_base("tiny")
        SubjectSlot(components).use_folder(folder)
        out[name] = _image(components)
    return out


@pytest.mark.parametrize("max_rank", [0, 8])
def test_every_switch_renders_the_subject_alone(subjects, alone, max_rank):
    assert all(np.abs(alone[k] - alone["base"]).mean() > 1 for k in subjects)  # each one changes the image
    components = load_base("tiny")
    slot = SubjectSlot(components, max_rank=max_rank)
    order = ["lora_a", "lora_b", "full", "lora_b", "lora_r4", "lora_a", "full", "full", "lora_a"]
    for name in order:  # hot-swap (a -> b), full over LoRA, LoRA over full, another rank, repeats
        meta = slot.use_folder(subjects[name])
        assert slot.current == str(subjects[name]) and meta.kind == ("full" if name == "full" else "lora")
        assert np.abs(_image(components) - alone[name]).max() <= 1, f"after switching to {name}"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """LoRA subjects of different shapes: rank 2 on two UNet modules (alpha 3), rank 8 on four plus
    the text encoder, rank 16 (above the slot's 8)."""
    root = tmp_path_factory.mktemp("shapes")
    return {"r2": _lora(root / "r2", 5, rank=2, targets=("to_q", "to_v"), alpha=3.0),
            "r8": _lora(root / "r8", 6, rank=8, text=True), "r16": _lora(root / "r16", 7, rank=16)}


def test_padded_slot_swaps_every_shape_in_place(subjects, shapes, caplog):
    alone = {}
    for name, folder in shapes.items():  # each subject in a fresh base, unpadded (diffusers' loader)
        components = load_base("tiny")
        SubjectSlot(components).use_folder(folder)
        alone[name] = _image(components)
    assert np.abs(alone["r2"] - alone["r8"]).mean() > 1
    components = load_base("tiny")
    slot = SubjectSlot(components, max_rank=8)
    kinds = []
    for name in ["r2", "r8", "r2", "r8", "r2", "r16", "r8", "r2"]:
        before = dict(slot.swaps)
        with caplog.at_level("WARNING", logger="comfusion.lora"):
            slot.use_folder(shapes[name])
        kinds.append(next(k for k in slot.swaps if slot.swaps[k] != before.get(k, 0)))
        assert np.abs(_image(components) - alone[name]).max() <= 1, f"after switching to {name}"
    # r8 adapts modules r2 does not: one rebuild to the union, then every swap between them in place;
    # r16 loads unpadded, and r8 after it rebuilds the padding (on the union of modules seen)
    assert kinds == ["padded_build", "padded_build", "in_place", "in_place", "in_place", "unpadded_load",
                     "padded_build", "in_place"], kinds
    warnings = [r.getMessage() for r in caplog.records if "unpadded" in r.getMessage()]
    assert len(warnings) == 1 and "rank 16 is above lora_max_rank 8" in warnings[0], warnings


def test_padded_slot_zeroes_what_a_subject_does_not_adapt(shapes, subjects):
    """After a rank-8 subject with text-encoder adapters, a rank-2 UNet-only one leaves every
    other weight of the padded adapter zero, and its own layers carry its alpha / r."""
    components = load_base("tiny")
    slot = SubjectSlot(components, max_rank=8)
    slot.use_folder(shapes["r8"])
    slot.use_folder(shapes["r2"])
    layers = slot._padded
    adapted = [n for n in layers if n.endswith(("to_q", "to_v")) and n.startswith("unet.")]
    assert len(adapted) > 0 and any(n.startswith("text_encoder.") for n in layers)
    for name, layer in layers.items():
        a, b = layer.lora_A["subject"].weight, layer.lora_B["subject"].weight
        assert a.shape[0] == 8 and b.shape[1] == 8
        if name in adapted:
            assert a[:2].abs().sum() > 0 and a[2:].abs().sum() == 0 and b[:, 2:].abs().sum() == 0
            assert layer.scaling["subject"] == 3.0 / 2
        else:
            assert a.abs().sum() == 0 and b.abs().sum() == 0, name


def test_slot_refuses_a_negative_max_rank():
    from serve.settings import ServeSettings

    with pytest.raises(ValueError, match="max_rank"):
        SubjectSlot({}, max_rank=-1)
    with pytest.raises(ValueError, match="serve arg 'lora_max_rank'"):
        ServeSettings(lora_max_rank=-1)
    assert ServeSettings.from_args({"lora_max_rank": 8}).lora_max_rank == 8


def test_evaluator_takes_both_kinds(subjects):
    cfg = JobConfig().replace(**{"model.base": "tiny", "data.subjects": [
        {"id": "lora-2", "images": ["x.png"], "class_noun": "dog"}]})
    target = make_target(cfg, subjects["lora_a"])
    assert target.method == "comfusion" and target.checkpoint == str(subjects["lora_a"])


def test_eval_worker_switches_between_kinds(subjects):
    from jobs.evaluate import EvalWorker

    cfg = JobConfig().replace(**{"model.base": "tiny", "model.resolution": 32, "sampler.steps": 2,
                                 "eval.batch_size": 2})
    worker = EvalWorker(cfg)
    rows = {}
    for name in ("lora_a", "full", "lora_b"):
        item = {"checkpoint": str(subjects[name]), "prompt": np.array([PROMPT] * 2), "seed": np.array([5, 6]),
                "target": 0, "prompt_set": np.array(["specific"] * 2), "prompt_index": np.array([0, 0]),
                "image_index": np.array([0, 1])}
        rows[name] = worker.process(item)
        assert worker.slot.current == str(subjects[name])
        assert rows[name]["dino"].shape[0] == 2 and np.isfinite(rows[name]["dino"]).all()
    assert not np.allclose(rows["lora_a"]["dino"], rows["lora_b"]["dino"])
