"""LoRA training (`train.adapter: lora`): only the adapters change, the fusion stream's gradients
reach them, every method and ablation runs, resume is exact, and the published subject is
diffusers' LoRA file plus subject.json. Tiny preset, CPU."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from comfusion.checkpoint import (LORA_WEIGHTS, CheckpointError, checkpoint_sizes, read_subject_weights,
                                  verify_checkpoint)
from comfusion.config import ConfigError, JobConfig, from_dict
from comfusion.train import SubjectTrainer
from test_train import class_priors, photos, priors, subject  # noqa: F401  (fixtures)
from test_train import make_cfg as full_cfg

TEXT = ["q_proj", "v_proj"]


def make_cfg(**overrides) -> JobConfig:
    return full_cfg(**{"train.adapter": "lora", "train.lora.rank": 2, "train.lora.alpha": 4.0, **overrides})


def split(module: torch.nn.Module) -> tuple[dict, dict]:
    """(adapter params, base params) as detached copies, by name."""
    adapters, base = {}, {}
    for name, p in module.named_parameters():
        (adapters if "lora_" in name else base)[name] = p.detach().clone()
    return adapters, base


@pytest.fixture(scope="module")
def run4(subject, priors):
    trainer = SubjectTrainer(make_cfg(**{"train.lora.text_encoder_targets": TEXT}), subject, priors, device="cpu")
    before = {m: split(getattr(trainer, m)) for m in ("unet", "text_encoder", "vae")}
    trainer.run()
    return trainer, before


def test_only_adapters_are_trainable(run4):
    trainer, _ = run4
    names = {id(p) for p in trainer.trainable}
    for m in (trainer.unet, trainer.text_encoder):
        for name, p in m.named_parameters():
            assert (id(p) in names) == ("lora_" in name), name
            assert p.requires_grad == ("lora_" in name), name
    assert any("attn2.to_k.lora_A" in n for n, _ in trainer.unet.named_parameters())
    assert any("q_proj.lora_B" in n for n, _ in trainer.text_encoder.named_parameters())


def test_every_adapter_changes_and_no_base_weight(run4):
    trainer, before = run4
    for m in ("unet", "text_encoder"):
        adapters, base = split(getattr(trainer, m))
        old_adapters, old_base = before[m]
        assert adapters.keys() == old_adapters.keys() and len(adapters) > 0
        unchanged = [n for n in adapters if torch.equal(adapters[n], old_adapters[n])]
        assert not unchanged, f"{m}: adapters that did not change: {unchanged[:3]}"
        changed = [n for n in base if not torch.equal(base[n], old_base[n])]
        assert not changed, f"{m}: base weights that changed: {changed[:3]}"
    _, vae_base = split(trainer.vae)
    assert all(torch.equal(v, before["vae"][1][n]) for n, v in vae_base.items())


def test_fusion_terms_alone_reach_every_adapter(run4):
    trainer, _ = run4  # trained: B != 0, so both A and B get gradients
    for term in ("fusion_instance", "fusion_scene"):
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.fusion_terms(torch.tensor([0]))[term].backward()
        missing = [n for m in (trainer.unet, trainer.text_encoder) for n, p in m.named_parameters()
                   if "lora_" in n and (p.grad is None or not bool(p.grad.abs().sum() > 0))]
        assert not missing, f"{term}: no gradient at {missing[:3]}"
    trainer.optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("overrides", [{"method": "dreambooth"}, {"loss.fusion": False},
                                       {"loss.use_fusion_instance": False}, {"loss.tau": 1},
                                       {"loss.fusion_backprop": "last"}, {"train.train_text_encoder": False}])
def test_methods_and_ablations_train_adapters(subject, priors, class_priors, overrides):
    cfg = make_cfg(**{"train.steps": 2, "train.lora.text_encoder_targets": TEXT, **overrides})
    pri = class_priors if cfg.method == "dreambooth" else priors
    trainer = SubjectTrainer(cfg, subject, pri, device="cpu")
    before = split(trainer.unet)
    terms = trainer.run()
    assert all(torch.isfinite(torch.tensor(v)) for v in terms.values())
    adapters, base = split(trainer.unet)
    assert all(not torch.equal(v, before[0][n]) for n, v in adapters.items() if "lora_B" in n)
    assert all(torch.equal(v, before[1][n]) for n, v in base.items())
    text_adapters = [n for n, _ in trainer.text_encoder.named_parameters() if "lora_" in n]
    assert bool(text_adapters) == cfg.train.train_text_encoder


def test_resume_from_step_2_equals_the_straight_run(run4, subject, priors, tmp_path):
    straight, _ = run4
    cfg = make_cfg(**{"train.lora.text_encoder_targets": TEXT})
    first = SubjectTrainer(cfg, subject, priors, device="cpu")
    first.run(until=2)
    first.save_state(tmp_path / "state")
    assert len(load_file(tmp_path / "state" / "unet.safetensors")) == len(split(first.unet)[0])  # adapters only
    resumed = SubjectTrainer(cfg, subject, priors, device="cpu")
    resumed.load_state(tmp_path / "state")
    resumed.run()
    for m in ("unet", "text_encoder"):
        a, b = split(getattr(resumed, m))[0], split(getattr(straight, m))[0]
        assert all(torch.allclose(a[n], b[n], atol=1e-6) for n in a), m
    full = SubjectTrainer(full_cfg(), subject, priors, device="cpu")
    with pytest.raises(ValueError, match="adapter"):
        full.load_state(tmp_path / "state")


def test_adamw8bit_with_gradient_checkpointing(subject, priors):
    cfg = make_cfg(**{"train.optimizer": "adamw8bit", "train.gradient_checkpointing": True, "train.steps": 2})
    trainer = SubjectTrainer(cfg, subject, priors, device="cpu")
    before = split(trainer.unet)[0]
    trainer.run()
    assert type(trainer.optimizer).__name__ == "AdamW8bit"
    after = split(trainer.unet)[0]
    assert all(not torch.equal(after[n], before[n]) for n in after if "lora_B" in n)


def test_publish_writes_a_lora_subject(run4, tmp_path):
    trainer, _ = run4
    folder = trainer.publish(tmp_path / "subject")
    assert sorted(p.name for p in folder.iterdir()) == ["pytorch_lora_weights.safetensors", "subject.json"]
    meta = verify_checkpoint(folder)
    assert meta.kind == "lora" and meta.lora["rank"] == 2 and meta.lora["alpha"] == 4.0
    assert meta.lora["text_encoder_targets"] == TEXT and meta.base_model == "tiny" and meta.dtype == "fp16"
    state = load_file(folder / LORA_WEIGHTS)
    assert {k.split(".")[0] for k in state} == {"unet", "text_encoder"}
    assert all(v.dtype == torch.float16 for v in state.values())
    sizes = checkpoint_sizes(folder)
    assert sizes["checkpoint/params"] == sum(p.numel() for p in trainer.trainable)
    assert sizes["checkpoint/bytes"] == (folder / LORA_WEIGHTS).stat().st_size
    with pytest.raises(CheckpointError, match="lora subject, not full"):
        read_subject_weights(folder)
    (folder / LORA_WEIGHTS).write_bytes(b"broken")
    with pytest.raises(CheckpointError, match="sha256"):
        verify_checkpoint(folder)


def test_config_errors_name_the_key(subject, priors):
    cases = [({"adapter": "lora2"}, "train.adapter"), ({"lora": {"rank": 0}}, "train.lora.rank"),
             ({"lora": {"alpha": 0}}, "train.lora.alpha"), ({"lora": {"unet_targets": []}}, "train.lora.unet_targets"),
             ({"lora": {"unet_targets": ["to q"]}}, "train.lora.unet_targets[0]"),
             ({"lora": {"ranks": 4}}, "train.lora.ranks")]
    for train, key in cases:
        with pytest.raises(ConfigError) as e:
            from_dict({"train": train})
        assert e.value.key == key, (train, str(e.value))
    with pytest.raises(ValueError, match="train.lora.unet_targets.*to_qq"):
        SubjectTrainer(make_cfg(**{"train.lora.unet_targets": ["to_qq"]}), subject, priors, device="cpu")
    assert JobConfig().train.adapter == "full" and not make_cfg().train.trains_text_encoder
    assert dataclasses.replace(JobConfig().train, train_text_encoder=True).trains_text_encoder
    assert json.loads(json.dumps(make_cfg().replace().train.lora.unet_targets)) == ["to_q", "to_k", "to_v", "to_out.0"]
