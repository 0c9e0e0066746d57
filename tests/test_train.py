"""The trainer on the tiny model: gradients of each fusion term, DreamBooth and the Table 3
switches, every trainable parameter changes (and nothing frozen does), exact resume, NaN
handling, callbacks and validation images, 8-bit AdamW, publishing, and the CLI."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

import comfusion.train as train_mod
from comfusion.checkpoint import verify_checkpoint
from comfusion.config import DataConfig, JobConfig, SubjectSpec, to_dict
from comfusion.data import check_subject
from comfusion.sampling import sample
from comfusion.train import NonFiniteLossError, Priors, SubjectTrainer, main

SCENES = ("in the snow", "on the grass")
TERMS = {"instance", "class_scene", "fusion_instance", "fusion_scene", "total"}


# --------------------------------------------------------------------------------------
# fixtures: one tiny subject (two 64x64 PNGs), four class-scene priors sampled like the cache


def _photo(path: Path, seed: int) -> str:
    rng = np.random.default_rng(seed)
    img = np.broadcast_to(rng.integers(0, 256, (1, 1, 3)), (64, 64, 3)).astype(np.uint8).copy()
    img[16:48, 16:48] = rng.integers(0, 256, 3)  # a square "object" on a plain background
    Image.fromarray(img).save(path)
    return str(path)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("subject")
    return tuple(_photo(folder / f"{i}.png", i) for i in range(2))


@pytest.fixture(scope="module")
def subject(photos):
    spec = SubjectSpec(id="tiny-dog", images=photos, class_noun="dog", scenes=SCENES)
    return check_subject(spec, DataConfig(min_side=32), resolution=32)


def _priors(base, prompts, scenes):
    out = sample(base, prompts, list(range(len(prompts))), steps=2)
    return Priors(latents=out.latents, prompts=prompts, scenes=scenes)


@pytest.fixture(scope="module")
def priors(tiny_base):
    scenes = [SCENES[i % 2] for i in range(4)]
    return _priors(tiny_base, [f"a dog {s}" for s in scenes], scenes)


@pytest.fixture(scope="module")
def class_priors(tiny_base):
    """DreamBooth's priors (Eq. 2): "a [class noun]", no scene."""
    return _priors(tiny_base, ["a dog"] * 2, ["", ""])


def make_cfg(**overrides) -> JobConfig:
    cfg = JobConfig().replace(**{"model.resolution": 32, "sampler.steps": 2, "train.lr": 1e-3,
                                 "train.steps": 4, "train.validation_scenes": 2, **overrides})
    # "no" cannot go through replace(): YAML reads it as false
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, mixed_precision="no"))


def state_copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def nonzero_grad(p: torch.nn.Parameter) -> bool:
    return p.grad is not None and bool(p.grad.abs().sum() > 0)


class Recorder:
    """Callbacks that record what they receive and save resumable state at each checkpoint."""

    def __init__(self, state_dir: Path | None = None):
        self.steps, self.validations, self.checkpoints = [], [], []
        self.state_dir = state_dir

    def on_step(self, step, terms, lr):
        self.steps.append((step, dict(terms), lr))

    def on_validation(self, step, images):
        self.validations.append((step, images))

    def on_checkpoint(self, step, trainer):
        self.checkpoints.append(step)
        if self.state_dir is not None:
            trainer.save_state(self.state_dir / f"step-{step}")


# --------------------------------------------------------------------------------------
# gradients of the fusion stream


def test_each_fusion_term_alone_reaches_unet_and_text_encoder(subject, priors):
    trainer = SubjectTrainer(make_cfg(), subject, priors, device="cpu")
    text = {name.removeprefix("text_model."): p for name, p in trainer.text_encoder.named_parameters()}
    watched = {"unet.conv_in": trainer.unet.conv_in.weight, "unet.conv_out": trainer.unet.conv_out.weight,
               "text.token_embedding": text["embeddings.token_embedding.weight"],  # transformers 4 and 5 names
               "text.final_layer_norm": text["final_layer_norm.weight"]}
    for term in ("fusion_instance", "fusion_scene"):
        trainer.optimizer.zero_grad(set_to_none=True)
        terms = trainer.fusion_terms(torch.tensor([1]))
        assert set(terms) == {"fusion_instance", "fusion_scene"}
        terms[term].backward()  # this term alone
        missing = [name for name, p in watched.items() if not nonzero_grad(p)]
        assert not missing, f"{term}: no gradient at {missing}"
        assert all(p.grad is None for p in trainer.vae.parameters())  # frozen: gradient passes through
        assert all(p.grad is None for p in trainer.judges.parameters())


# --------------------------------------------------------------------------------------
# DreamBooth and the Table 3 switches


def _no_judges(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("judges / fusion stream used where they must not be")

    for name in ("load_judges", "fusion_losses", "coarse_denoise"):
        monkeypatch.setattr(train_mod, name, refuse)


def test_dreambooth_step_has_no_fusion_terms_and_no_judges(subject, class_priors, monkeypatch):
    _no_judges(monkeypatch)
    trainer = SubjectTrainer(make_cfg(method="dreambooth"), subject, class_priors, device="cpu")
    terms = trainer.train_step()
    assert trainer.judges is None and trainer.instance_dino is None and trainer.scene_text_clip is None
    assert terms["fusion_instance"] == 0.0 and terms["fusion_scene"] == 0.0
    assert terms["instance"] > 0 and terms["class_scene"] > 0
    assert terms["total"] == pytest.approx(terms["instance"] + terms["class_scene"], rel=1e-6)


def test_fusion_off_computes_no_fusion_and_loads_no_judges(subject, priors, monkeypatch):
    _no_judges(monkeypatch)
    trainer = SubjectTrainer(make_cfg(**{"loss.fusion": False}), subject, priors, device="cpu")
    terms = trainer.train_step()
    assert trainer.judges is None
    assert terms["fusion_instance"] == 0.0 and terms["fusion_scene"] == 0.0 and math.isfinite(terms["total"])


@pytest.mark.parametrize("off, on", [("fusion_scene", "fusion_instance"), ("fusion_instance", "fusion_scene")])
def test_one_fusion_term_switched_off(subject, priors, off, on):
    trainer = SubjectTrainer(make_cfg(**{f"loss.use_{off}": False}), subject, priors, device="cpu")
    terms = trainer.train_step()
    assert terms[off] == 0.0 and terms[on] != 0.0 and math.isfinite(terms[on])
    assert (trainer.instance_dino is None) == (off == "fusion_instance")  # only the enabled term's targets
    assert (trainer.scene_text_clip is None) == (off == "fusion_scene")


@pytest.mark.parametrize("tau, batch", [(1, 1), (5, 2)])
def test_tau_sets_the_number_of_unet_calls(subject, priors, tau, batch):
    cfg = make_cfg(**{"loss.tau": tau, "train.batch_size": batch})
    trainer = SubjectTrainer(cfg, subject, priors, device="cpu")
    batches = []
    trainer.unet.register_forward_hook(lambda mod, args, out: batches.append(len(args[0])))
    terms = trainer.train_step()
    assert all(math.isfinite(v) for v in terms.values()) and terms["fusion_instance"] != 0.0
    assert batches == [2 * batch] + [batch] * tau  # instance+prior in one batch, then f_theta's tau calls


def test_fusion_backprop_last_keeps_the_graph_of_the_last_unet_call_only(subject, priors):
    trainer = SubjectTrainer(make_cfg(**{"loss.fusion_backprop": "last"}), subject, priors, device="cpu")
    graphs = []
    trainer.unet.register_forward_hook(lambda mod, args, out: graphs.append(out.sample.requires_grad))
    trainer.optimizer.zero_grad(set_to_none=True)
    terms = trainer.fusion_terms(torch.tensor([1]))
    assert graphs == [False, False, True]  # tau = 3: only the last call of f_theta has a graph
    (terms["fusion_instance"] + terms["fusion_scene"]).backward()
    token_embedding = trainer.text_encoder.get_input_embeddings().weight
    assert nonzero_grad(trainer.unet.conv_in.weight) and nonzero_grad(token_embedding)
    assert all(math.isfinite(v) for v in trainer.train_step().values())


class NormRecorder(Recorder):
    def __init__(self):
        super().__init__()
        self.norms = []

    def on_grad_norms(self, step, norms):
        self.norms.append((step, dict(norms)))


@pytest.mark.parametrize("method", ["comfusion", "dreambooth"])
def test_grad_norms_every_n_steps_and_the_same_summed_gradient(subject, priors, class_priors, method):
    prior_set = priors if method == "comfusion" else class_priors
    rec = NormRecorder()
    cfg = make_cfg(method=method, **{"train.grad_norm_every": 2, "train.steps": 3})
    SubjectTrainer(cfg, subject, prior_set, device="cpu", callbacks=rec).run()
    assert [s for s, _ in rec.norms] == [2] and [s for s, _, _ in rec.steps] == [1, 2, 3]
    norms = rec.norms[0][1]
    fusion = {"fusion_instance", "fusion_scene"} if method == "comfusion" else set()
    terms = {"instance", "class_scene", "total"} | fusion
    assert set(norms) == terms and all(math.isfinite(v) and v > 0 for v in norms.values())
    assert norms["total"] <= sum(v for k, v in norms.items() if k != "total") * (1 + 1e-6)  # triangle inequality

    grads = []  # one backward per term sums to the gradient of one backward of the total
    for per_term in (True, False):
        trainer = SubjectTrainer(cfg, subject, prior_set, device="cpu")
        terms = trainer.loss_terms()
        if per_term:
            got = trainer._backward_per_term(terms)
        else:
            train_mod.total_loss(terms, cfg.loss)[0].backward()
        grads.append([p.grad.clone() for p in trainer.trainable])
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-8) for a, b in zip(*grads))
    total = sum(float(g.square().sum()) for g in grads[1]) ** 0.5
    assert got["total"] == pytest.approx(total, rel=1e-4)


# --------------------------------------------------------------------------------------
# a 4-step run, recorded once: parameters, callbacks, validation, resume, publish


@pytest.fixture(scope="module")
def run4(subject, priors, tmp_path_factory):
    # no weight decay: AdamW's decay alone would move every parameter, gradient or not
    cfg = make_cfg(**{"train.weight_decay": 0.0, "train.checkpoint_every": 2, "train.validate_every": 2})
    rec = Recorder(tmp_path_factory.mktemp("states"))
    trainer = SubjectTrainer(cfg, subject, priors, device="cpu", callbacks=rec)
    before = {name: state_copy(getattr(trainer, name)) for name in ("unet", "text_encoder", "vae", "judges")}
    final = trainer.run()
    return dict(cfg=cfg, trainer=trainer, rec=rec, before=before, final=final)


def test_run_changes_every_trainable_parameter_and_nothing_frozen(run4):
    trainer, before = run4["trainer"], run4["before"]
    for name in ("unet", "text_encoder"):
        unchanged = [k for k, p in getattr(trainer, name).named_parameters()
                     if torch.equal(p.detach(), before[name][k])]
        assert not unchanged, f"{name} parameters unchanged after 4 steps: {unchanged[:5]}"
    for name in ("vae", "judges"):
        after = getattr(trainer, name).state_dict()
        changed = [k for k, v in before[name].items() if not torch.equal(v, after[k])]
        assert not changed, f"frozen {name} changed: {changed[:5]}"
    assert all(p.grad is None for p in trainer.trainable)  # zeroed after each step
    expected = [*trainer.unet.parameters(), *trainer.text_encoder.parameters()]
    assert [id(p) for p in trainer.trainable] == [id(p) for p in expected]


def test_callbacks_get_every_step_with_all_terms_and_lr(run4):
    rec = run4["rec"]
    assert [s for s, _, _ in rec.steps] == [1, 2, 3, 4]
    for _, terms, lr in rec.steps:
        assert set(terms) == TERMS and all(math.isfinite(v) for v in terms.values())
        assert lr == pytest.approx(1e-3)
    assert rec.checkpoints == [2, 4]
    assert run4["final"] == rec.steps[-1][1]


def test_validation_images_per_scene(run4):
    rec = run4["rec"]
    assert [s for s, _ in rec.validations] == [2, 4]
    for _, images in rec.validations:
        assert list(images) == list(SCENES)
        assert all(im.shape == (32, 32, 3) and im.dtype == np.uint8 for im in images.values())
    assert not np.array_equal(rec.validations[0][1][SCENES[0]], rec.validations[1][1][SCENES[0]])  # current weights


def test_resume_from_step_2_equals_the_straight_run(run4, subject, priors):
    straight = run4["trainer"]
    resumed = SubjectTrainer(run4["cfg"], subject, priors, device="cpu")
    resumed.load_state(run4["rec"].state_dir / "step-2")
    assert resumed.step == 2
    terms = resumed.run()  # steps 3 and 4
    assert terms == run4["rec"].steps[-1][1]
    for name in ("unet", "text_encoder"):
        a, b = getattr(straight, name).state_dict(), getattr(resumed, name).state_dict()
        bad = [k for k in a if not torch.allclose(a[k], b[k], rtol=1e-6, atol=1e-7)]
        assert not bad, f"{name} differs after resume: {bad[:5]}"
    assert torch.equal(straight.generator.get_state(), resumed.generator.get_state())


def test_draws_use_the_trainer_generator_not_the_global_rng(subject, priors):
    terms = []
    for global_seed in (1, 2):
        trainer = SubjectTrainer(make_cfg(method="dreambooth"), subject, priors, device="cpu")
        torch.manual_seed(global_seed)
        terms.append([trainer.train_step() for _ in range(3)])
    assert terms[0] == terms[1]


def test_state_refuses_another_subject_or_method(run4, subject, class_priors):
    other = SubjectTrainer(make_cfg(method="dreambooth"), subject, class_priors, device="cpu")
    with pytest.raises(ValueError, match="'method': 'comfusion'.*'method': 'dreambooth'"):
        other.load_state(run4["rec"].state_dir / "step-2")


def test_publish_writes_a_verified_checkpoint(run4, tmp_path):
    trainer = run4["trainer"]
    folder = trainer.publish(tmp_path / "ckpt", metrics={"eval/dino": 0.5})
    meta = verify_checkpoint(folder)
    assert (meta.id, meta.identifier, meta.class_noun, meta.method) == ("tiny-dog", "sks", "dog", "comfusion")
    assert meta.base_model == "tiny" and meta.dtype == "fp16" and meta.config == to_dict(run4["cfg"])
    assert meta.metrics["eval/dino"] == 0.5 and meta.metrics["loss/total"] == pytest.approx(run4["final"]["total"])
    weights = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    live = trainer.unet.state_dict()["conv_out.weight"]
    assert torch.equal(weights["conv_out.weight"], live.half())


# --------------------------------------------------------------------------------------
# NaN / inf


def test_nan_loss_raises_at_its_step_and_keeps_the_last_checkpoint(subject, class_priors, monkeypatch, tmp_path):
    calls = []
    real = train_mod.instance_loss

    def nan_at_step_3(eps_pred, eps):
        calls.append(1)
        loss = real(eps_pred, eps)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(train_mod, "instance_loss", nan_at_step_3)
    cfg = make_cfg(method="dreambooth", **{"train.checkpoint_every": 2})
    trainer = SubjectTrainer(cfg, subject, class_priors, device="cpu", callbacks=Recorder(tmp_path))
    with pytest.raises(NonFiniteLossError, match=r"step 3: loss term 'instance' is nan") as err:
        trainer.run()
    assert isinstance(err.value, ValueError) and (err.value.step, err.value.term) == (3, "instance")
    assert trainer.step == 2 and all(p.grad is None for p in trainer.trainable)
    saved = load_file(tmp_path / "step-2" / "unet.safetensors")
    live = trainer.unet.state_dict()
    assert all(torch.equal(saved[k], live[k]) for k in saved)  # weights are step 2's, as saved
    trainer.load_state(tmp_path / "step-2")  # and the checkpoint loads
    assert trainer.step == 2


def test_nan_gradient_raises_before_the_update(subject, class_priors, monkeypatch):
    real = train_mod.instance_loss

    def nan_gradient(eps_pred, eps):  # finite value, NaN gradient: d/dx 0 * sqrt(x) at x = 0
        return real(eps_pred, eps) + 0.0 * torch.sqrt(eps_pred.sum() * 0.0)

    monkeypatch.setattr(train_mod, "instance_loss", nan_gradient)
    trainer = SubjectTrainer(make_cfg(method="dreambooth"), subject, class_priors, device="cpu")
    before = state_copy(trainer.unet)
    with pytest.raises(NonFiniteLossError, match="step 1: loss term 'grad_norm'"):
        trainer.train_step()
    assert all(torch.equal(v, before[k]) for k, v in trainer.unet.state_dict().items())


# --------------------------------------------------------------------------------------
# 8-bit AdamW, gradient checkpointing, set-up errors


def test_adamw8bit_with_gradient_checkpointing_on_cpu(subject, priors, tmp_path):
    cfg = make_cfg(**{"train.optimizer": "adamw8bit", "train.gradient_checkpointing": True})
    trainer = SubjectTrainer(cfg, subject, priors, device="cpu")
    assert type(trainer.optimizer).__name__ == "AdamW8bit"
    before = state_copy(trainer.unet)
    terms = trainer.train_step()
    assert all(math.isfinite(v) for v in terms.values())
    after = trainer.unet.state_dict()
    assert not torch.equal(after["conv_out.weight"], before["conv_out.weight"])
    assert all(torch.isfinite(v).all() for v in after.values())
    trainer.load_state(trainer.save_state(tmp_path / "state"))  # 8-bit state loads with weights_only
    assert trainer.step == 1 and math.isfinite(trainer.train_step()["total"])


def test_gradient_checkpointing_changes_no_numbers(subject, priors):
    weights = []
    for checkpointing in (False, True):
        trainer = SubjectTrainer(make_cfg(**{"train.gradient_checkpointing": checkpointing}), subject, priors,
                                 device="cpu")
        trainer.train_step()
        weights.append(state_copy(trainer.unet) | state_copy(trainer.text_encoder))
    te = trainer.text_encoder
    assert trainer.unet.is_gradient_checkpointing
    assert getattr(te, "is_activation_checkpointing", None) or te.is_gradient_checkpointing  # transformers 5 / 4
    assert all(torch.allclose(weights[0][k], weights[1][k], rtol=1e-5, atol=1e-6) for k in weights[0])


def test_setup_errors(subject, priors, class_priors, monkeypatch):
    monkeypatch.setattr(train_mod, "load_base", lambda *a, **k: pytest.fail("checked after loading"))
    with pytest.raises(ValueError, match="num_instance_images=3"):
        SubjectTrainer(make_cfg(**{"train.num_instance_images": 3}), subject, priors, device="cpu")
    with pytest.raises(ValueError, match="needs a scene"):
        SubjectTrainer(make_cfg(), subject, class_priors, device="cpu")  # fusion without scenes
    bad = Priors(latents=priors.latents[:3], prompts=priors.prompts, scenes=priors.scenes)
    with pytest.raises(ValueError, match="alike"):
        SubjectTrainer(make_cfg(), subject, bad, device="cpu")
    monkeypatch.undo()
    small = Priors(latents=priors.latents[:, :, :8, :8], prompts=priors.prompts, scenes=priors.scenes)
    with pytest.raises(ValueError, match="another model or resolution"):
        SubjectTrainer(make_cfg(), subject, small, device="cpu")


# --------------------------------------------------------------------------------------
# the command line


def _write_config(tmp_path: Path, images) -> Path:
    values = to_dict(make_cfg(**{"train.steps": 2, "priors.count": 2, "train.checkpoint_dtype": "fp32"}))
    # the photos live in a folder of their own, beside the config's: absolute paths are allowed explicitly
    values["data"].update(min_side=32, scenes=list(SCENES), allow_absolute_paths=True,
                          subjects=[{"id": "tiny-dog", "class_noun": "dog", "images": list(images)}])
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "--subject" in capsys.readouterr().out


@pytest.mark.parametrize("subject_id, images, message", [
    ("nobody", None, "no subject with this id in the config (known: tiny-dog)"),
    ("tiny-dog", ["missing.png"], "file does not exist"),
])
def test_cli_refuses_a_bad_subject_before_any_compute(tmp_path, photos, monkeypatch, capsys,
                                                      subject_id, images, message):
    monkeypatch.setattr(train_mod, "load_base", lambda *a, **k: pytest.fail("compute started"))
    config = _write_config(tmp_path, images or photos)
    assert main(["--config", str(config), "--subject", subject_id]) == 2
    assert message in capsys.readouterr().err


def test_cli_trains_and_publishes(tmp_path, photos, capsys, monkeypatch):
    # the progress printer has no on_validation of its own: no images are sampled for nobody
    monkeypatch.setattr(SubjectTrainer, "validation_images", lambda self: pytest.fail("sampled for nobody"))
    config = _write_config(tmp_path, photos)
    out = tmp_path / "out"
    assert main(["--config", str(config), "--subject", "tiny-dog", "--out", str(out), "--device", "cpu",
                 "--log-every", "1", "--set", "loss.tau=1"]) == 0
    printed = capsys.readouterr().out
    assert "step 1/2" in printed and "step 2/2" in printed and "fusion_scene" in printed
    meta = verify_checkpoint(out)
    assert meta.dtype == "fp32" and meta.config["loss"]["tau"] == 1
