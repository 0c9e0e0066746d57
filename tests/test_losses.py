"""Loss math against hand-worked values, f_theta's timestep schedule, and the tiny judges."""
from __future__ import annotations

import math
from fractions import Fraction
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTokenizer, CLIPVisionConfig, ViTConfig, ViTModel
from transformers.convert_slow_tokenizer import bytes_to_unicode

from comfusion.config import LossConfig
from comfusion.judges import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, Judges
from comfusion.losses import (
    add_noise,
    class_scene_loss,
    coarse_denoise,
    fusion_losses,
    instance_loss,
    sample_fusion_timesteps,
    sample_timesteps,
    total_loss,
)

# --------------------------------------------------------------------------------------
# helpers


def sd_alphas_cumprod() -> torch.Tensor:
    """Stable Diffusion's scaled-linear schedule, (1000,) float64."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


def toy_alphas_cumprod(**values: float) -> torch.Tensor:
    """(1000,) float64 schedule of 0.5 except at given timesteps, e.g. toy_alphas_cumprod(t600=0.36)."""
    a = torch.full((1000,), 0.5, dtype=torch.float64)
    for key, v in values.items():
        a[int(key[1:])] = v
    return a


class RecordingEps:
    """A fake epsilon model: deterministic in (sample, timestep, text); records each call's timesteps."""

    def __init__(self, fn=None):
        self.calls: list[list[int]] = []
        self.fn = fn or (lambda z, t, c: 0.3 * z + 1e-3 * t.view(-1, 1, 1, 1) + c.mean(dim=(1, 2)).view(-1, 1, 1, 1))

    def __call__(self, sample, timestep, encoder_hidden_states):
        self.calls.append(timestep.tolist())
        return SimpleNamespace(sample=self.fn(sample, timestep.to(sample.dtype), encoder_hidden_states))


def reference_f_theta(eps_fn, z: torch.Tensor, t: int, c: torch.Tensor, a: torch.Tensor, tau: int):
    """Supplement Eq. 8 written out literally for ONE element, recursively, with exact ceilings."""
    eps = eps_fn(z, torch.tensor([float(t)], dtype=z.dtype), c)
    h = (z - math.sqrt(1 - a[t]) * eps) / math.sqrt(a[t])
    if tau == 1:
        return h
    t_next = math.ceil(Fraction((tau - 1) * t, tau))
    z_next = math.sqrt(a[t_next]) * h + math.sqrt(1 - a[t_next]) * eps
    return reference_f_theta(eps_fn, z_next, t_next, c, a, tau - 1)


# --------------------------------------------------------------------------------------
# Eq. 1, Eq. 3, forward process


def test_instance_loss_hand_values():
    eps_pred = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 2, 2)
    eps = torch.tensor([0.0, 2.0, 5.0, 4.0]).view(1, 1, 2, 2)
    # squared errors 1, 0, 4, 0 -> mean 1.25
    assert instance_loss(eps_pred, eps).item() == pytest.approx(1.25)


def test_class_scene_loss_hand_values_mean_over_batch():
    eps_pred = torch.tensor([[1.0, 1.0], [3.0, -1.0]]).view(2, 1, 1, 2)
    eps = torch.zeros(2, 1, 1, 2)
    # squared errors 1, 1, 9, 1 -> mean 3.0
    loss = class_scene_loss(eps_pred, eps)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(3.0)


def test_add_noise_hand_values_per_element_t():
    a = toy_alphas_cumprod(t600=0.36, t300=0.64)
    z0 = torch.ones(2, 1, 1, 1, dtype=torch.float64)
    eps = torch.full((2, 1, 1, 1), 2.0, dtype=torch.float64)
    z_t = add_noise(z0, eps, torch.tensor([600, 300]), a)
    # 0.6 * 1 + 0.8 * 2 = 2.2 ; 0.8 * 1 + 0.6 * 2 = 2.0
    assert z_t.flatten().tolist() == pytest.approx([2.2, 2.0])


# --------------------------------------------------------------------------------------
# Eq. 4 / supplement Eq. 8


@pytest.mark.parametrize("t, tau, expected", [
    (600, 1, [600]),
    (601, 1, [601]),
    (600, 3, [600, 400, 200]),  # ceil(2*600/3) = 400, ceil(1*400/2) = 200
    (601, 3, [601, 401, 201]),  # ceil(1202/3) = ceil(400.67) = 401, ceil(401/2) = 201
    (600, 5, [600, 480, 360, 240, 120]),  # 2400/5, 1440/4, 720/3, 240/2: all exact
    (601, 5, [601, 481, 361, 241, 121]),  # ceil(480.8), ceil(360.75), ceil(240.67), ceil(120.5)
])
def test_coarse_denoise_matches_hand_recursion(t, tau, expected):
    a = sd_alphas_cumprod()
    g = torch.Generator().manual_seed(t + tau)
    z = torch.randn(1, 4, 2, 2, generator=g, dtype=torch.float64)
    c = torch.randn(1, 3, 5, generator=g, dtype=torch.float64)
    eps_model = RecordingEps()
    out = coarse_denoise(eps_model, z, torch.tensor([t]), c, a, tau)
    assert eps_model.calls == [[s] for s in expected]
    ref = reference_f_theta(eps_model.fn, z, t, c, a, tau)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_coarse_denoise_per_element_timesteps():
    a = sd_alphas_cumprod()
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64)
    c = torch.randn(3, 3, 5, generator=g, dtype=torch.float64)
    eps_model = RecordingEps()
    out = coarse_denoise(eps_model, z, torch.tensor([600, 601, 200]), c, a, tau=3)
    # 200 -> ceil(400/3) = 134 -> ceil(134/2) = 67
    assert eps_model.calls == [[600, 601, 200], [400, 401, 134], [200, 201, 67]]
    for i, t in enumerate([600, 601, 200]):
        ref = reference_f_theta(eps_model.fn, z[i:i + 1], t, c[i:i + 1], a, 3)
        torch.testing.assert_close(out[i:i + 1], ref, rtol=1e-12, atol=1e-12)


def test_coarse_denoise_hand_values_tau2():
    # alpha_600 = 0.36 (sqrt .6, sqrt(1-a) .8), alpha_300 = 0.64 (sqrt .8, sqrt(1-a) .6); eps = z / 2
    a = toy_alphas_cumprod(t600=0.36, t300=0.64)
    z = torch.full((1, 1, 1, 1), 2.0, dtype=torch.float64)
    eps_model = RecordingEps(fn=lambda z, t, c: 0.5 * z)
    out = coarse_denoise(eps_model, z, torch.tensor([600]), torch.zeros(1, 1, 1, dtype=torch.float64), a, tau=2)
    # t=600: eps 1, h = (2 - .8)/.6 = 2 ; t'=300: z' = .8*2 + .6*1 = 2.2, eps 1.1, h = (2.2 - .66)/.8 = 1.925
    assert eps_model.calls == [[600], [300]]
    assert out.item() == pytest.approx(1.925)


def test_coarse_denoise_gradient_reaches_unet_parameters():
    class TinyEps(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 1)

        def forward(self, sample, timestep, encoder_hidden_states):
            scale = encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
            return SimpleNamespace(sample=self.conv(sample) * scale)

    torch.manual_seed(0)
    unet = TinyEps().double()
    a = sd_alphas_cumprod()
    z = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    text = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)  # stands in for Gamma(T^IS)
    params = [unet.conv.weight, unet.conv.bias, text]

    recorder = RecordingEps(fn=lambda z, t, c: unet(z, t, c).sample)
    out = coarse_denoise(recorder, z, torch.tensor([600, 700]), text, a, tau=3)
    grads = torch.autograd.grad(out.square().mean(), params)
    assert len(recorder.calls) == 3
    for g in grads:
        assert torch.isfinite(g).all() and g.abs().sum() > 0

    # the same gradient as the literal recursion: nothing detached in any of the three calls
    ref = torch.cat([reference_f_theta(recorder.fn, z[i:i + 1], t, text[i:i + 1], a, 3)
                     for i, t in enumerate([600, 700])])
    ref_grads = torch.autograd.grad(ref.square().mean(), params)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


def test_coarse_denoise_backprop_last_same_value_gradient_of_last_call_only():
    """`loss.fusion_backprop: last`: the forward value is unchanged, and the gradient equals the
    literal recursion's with the first tau - 1 calls' outputs held constant."""
    torch.manual_seed(0)
    w = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)  # the "UNet" weight
    fn = lambda z, t, c: w * z + 1e-3 * t.view(-1, 1, 1, 1) + c.mean(dim=(1, 2)).view(-1, 1, 1, 1)  # noqa: E731
    a = sd_alphas_cumprod()
    z = torch.randn(1, 4, 2, 2, dtype=torch.float64)
    text = torch.randn(1, 3, 5, dtype=torch.float64, requires_grad=True)
    rec_all, rec_last = RecordingEps(fn), RecordingEps(fn)
    out_all = coarse_denoise(rec_all, z, torch.tensor([600]), text, a, tau=3)
    out_last = coarse_denoise(rec_last, z, torch.tensor([600]), text, a, tau=3, backprop="last")
    torch.testing.assert_close(out_last, out_all)
    assert rec_last.calls == rec_all.calls == [[600], [400], [200]]
    g_last = torch.autograd.grad(out_last.sum(), [w, text])
    # by hand: the last call sees z_200 (a constant) and predicts h = (z - sqrt(1-a) eps) / sqrt(a)
    with torch.no_grad():
        h1 = reference_f_theta(fn, z, 600, text, a, 1)
        eps1 = fn(z, torch.tensor([600.0], dtype=z.dtype), text)
        z400 = math.sqrt(a[400]) * h1 + math.sqrt(1 - a[400]) * eps1
        h2 = reference_f_theta(fn, z400, 400, text, a, 1)
        eps2 = fn(z400, torch.tensor([400.0], dtype=z.dtype), text)
        z200 = math.sqrt(a[200]) * h2 + math.sqrt(1 - a[200]) * eps2
    ref = reference_f_theta(fn, z200, 200, text, a, 1)
    g_ref = torch.autograd.grad(ref.sum(), [w, text])
    for g, r in zip(g_last, g_ref):
        torch.testing.assert_close(g, r)
    g_all = torch.autograd.grad(coarse_denoise(RecordingEps(fn), z, torch.tensor([600]), text, a, 3).sum(), [w])
    assert not torch.allclose(g_all[0], g_last[0])  # the two settings differ in gradient, not value
    with pytest.raises(ValueError):
        coarse_denoise(RecordingEps(), z, torch.tensor([600]), text, a, tau=3, backprop="first")


def test_coarse_denoise_rejects_bad_input():
    a = sd_alphas_cumprod()
    with pytest.raises(ValueError):
        coarse_denoise(RecordingEps(), torch.zeros(1, 1, 1, 1), torch.tensor([600]), torch.zeros(1, 1, 1), a, tau=0)
    with pytest.raises(ValueError):
        coarse_denoise(RecordingEps(), torch.zeros(1, 1, 1, 1), torch.tensor([600.0]), torch.zeros(1, 1, 1), a, tau=1)


# --------------------------------------------------------------------------------------
# timestep draws


def test_sample_fusion_timesteps_inclusive_and_seeded():
    t = sample_fusion_timesteps(400, 3, 5, torch.Generator().manual_seed(0), "cpu")
    assert t.dtype == torch.int64 and t.shape == (400,)
    assert set(t.tolist()) == {3, 4, 5}
    again = sample_fusion_timesteps(400, 3, 5, torch.Generator().manual_seed(0), "cpu")
    assert torch.equal(t, again)
    assert sample_fusion_timesteps(4, 200, 200, torch.Generator().manual_seed(1), "cpu").tolist() == [200] * 4


def test_sample_timesteps_range():
    t = sample_timesteps(2000, 4, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert t.dtype == torch.int64 and set(t.tolist()) == {0, 1, 2, 3}


# --------------------------------------------------------------------------------------
# judges and Eq. 5


def tiny_clip_tokenizer() -> CLIPTokenizer:
    """Byte-level CLIP tokenizer: 256 byte symbols, each also with '</w>', plus the specials; no merges."""
    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[])


@pytest.fixture(scope="module")
def judges() -> Judges:
    torch.manual_seed(0)
    tokenizer = tiny_clip_tokenizer()
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    dino = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                              image_size=32, patch_size=16), add_pooling_layer=False)
    text = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=77, eos_token_id=eos, pad_token_id=eos,
                          bos_token_id=tokenizer.convert_tokens_to_ids("<|startoftext|>"))
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=16)
    clip = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16))
    return Judges(dino, clip, tokenizer)


def test_tiny_tokenizer_round_trip():
    tokenizer = tiny_clip_tokenizer()
    ids = tokenizer(["a dog"], padding="max_length", max_length=77, truncation=True).input_ids[0]
    assert len(ids) == 77
    assert tokenizer.convert_ids_to_tokens(ids[:6]) == ["<|startoftext|>", "a</w>", "d", "o", "g</w>", "<|endoftext|>"]


def test_judges_frozen_and_stay_in_eval(judges):
    assert not any(p.requires_grad for p in judges.parameters())
    judges.train()
    assert not judges.training and not judges.dino.training and not judges.clip.training


def test_preprocess_hand_values():
    x = torch.zeros(1, 3, 8, 8)  # 0 in [-1, 1] is 0.5 in [0, 1]; a constant image resizes to itself
    out = Judges.preprocess(x, IMAGENET_MEAN, IMAGENET_STD, size=4)
    assert out.shape == (1, 3, 4, 4)
    expected = [(0.5 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor(expected))
    torch.testing.assert_close(out, out[:, :, :1, :1].expand_as(out))


def test_judge_shapes_and_dino_is_cls(judges):
    x = torch.rand(2, 3, 24, 24) * 2 - 1
    assert judges.dino_embed(x).shape == (2, 32)
    assert judges.clip_image_embed(x).shape == (2, 16)
    assert judges.clip_text_embed(["a dog in the rain", "a dog"]).shape == (2, 16)
    px = Judges.preprocess(x, IMAGENET_MEAN, IMAGENET_STD, 32)
    torch.testing.assert_close(judges.dino_embed(x), judges.dino(pixel_values=px).last_hidden_state[:, 0])
    px = Judges.preprocess(x, CLIP_MEAN, CLIP_STD, 32)
    torch.testing.assert_close(judges.clip_image_embed(x), judges.clip.visual_projection(
        judges.clip.vision_model(pixel_values=px).pooler_output))


def test_fusion_instance_of_image_against_itself_is_minus_one(judges):
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    terms = fusion_losses(x, judges.dino_embed(x), judges.clip_text_embed(["a dog"]), judges)
    assert terms["fusion_instance"].item() == pytest.approx(-1.0, abs=1e-5)
    # the same image given as two instance images still averages to -1
    terms = fusion_losses(x, judges.dino_embed(x.expand(2, -1, -1, -1)), judges.clip_text_embed(["a dog"]), judges)
    assert terms["fusion_instance"].item() == pytest.approx(-1.0, abs=1e-5)


@pytest.mark.parametrize("name", ["fusion_instance", "fusion_scene"])
def test_each_fusion_term_reaches_decoded(judges, name):
    decoded = (torch.rand(1, 3, 48, 48) * 2 - 1).requires_grad_(True)  # 48 -> 32: antialiased bicubic
    inst = judges.dino_embed(torch.rand(2, 3, 32, 32) * 2 - 1)  # N^I = 2
    text = judges.clip_text_embed(["a dog in the snow"])
    terms = fusion_losses(decoded, inst, text, judges, use_instance=name == "fusion_instance",
                          use_scene=name == "fusion_scene")
    assert set(terms) == {name} and terms[name].shape == ()
    assert -1.0 <= terms[name].item() <= 1.0
    terms[name].backward()
    assert torch.isfinite(decoded.grad).all() and decoded.grad.abs().sum() > 0
    assert all(p.grad is None for p in judges.parameters())


class StubJudges:
    """Judges with fixed embeddings, to check Eq. 5's averaging by hand; counts judge calls."""

    def __init__(self, dino, clip):
        self.dino, self.clip, self.calls = dino, clip, []

    def dino_embed(self, x):
        self.calls.append("dino")
        return self.dino

    def clip_image_embed(self, x):
        self.calls.append("clip")
        return self.clip


def test_fusion_losses_hand_values():
    stub = StubJudges(dino=torch.tensor([[1.0, 0.0], [0.0, 2.0]]), clip=torch.tensor([[3.0, 0.0], [1.0, 1.0]]))
    instance = torch.tensor([[5.0, 0.0], [1.0, 1.0]])  # N^I = 2
    text = torch.tensor([[0.0, 1.0], [2.0, 2.0]])
    terms = fusion_losses(torch.zeros(2, 3, 4, 4), instance, text, stub)
    # DINO cosines: (1, 1/sqrt2) for element 0, (0, 1/sqrt2) for element 1 -> mean (1 + sqrt2) / 4
    assert terms["fusion_instance"].item() == pytest.approx(-(1 + math.sqrt(2)) / 4)
    # CLIP cosines, each element with its own text: 0 and 1 -> mean 0.5
    assert terms["fusion_scene"].item() == pytest.approx(-0.5)


@pytest.mark.parametrize("use_instance, use_scene, calls, keys", [
    (True, False, ["dino"], {"fusion_instance"}),
    (False, True, ["clip"], {"fusion_scene"}),
    (False, False, [], set()),
])
def test_disabled_fusion_term_is_absent_and_its_judge_not_called(use_instance, use_scene, calls, keys):
    stub = StubJudges(dino=torch.ones(1, 2), clip=torch.ones(1, 2))
    terms = fusion_losses(torch.zeros(1, 3, 4, 4), torch.ones(1, 2), torch.ones(1, 2), stub,
                          use_instance=use_instance, use_scene=use_scene)
    assert stub.calls == calls
    assert set(terms) == keys


# --------------------------------------------------------------------------------------
# Eq. 6


def test_total_loss_weights_by_hand():
    cfg = LossConfig(lambda_class_scene=0.5, lambda_fusion_instance=0.1, lambda_fusion_scene=0.01)
    terms = {k: torch.tensor(v, requires_grad=True) for k, v in
             [("instance", 1.0), ("class_scene", 2.0), ("fusion_instance", 3.0), ("fusion_scene", 4.0)]}
    total, logs = total_loss(terms, cfg)
    # 1 + 0.5 * 2 + 0.1 * 3 + 0.01 * 4 = 2.34
    assert total.item() == pytest.approx(2.34)
    assert logs == pytest.approx({"instance": 1.0, "class_scene": 2.0, "fusion_instance": 3.0,
                                  "fusion_scene": 4.0, "total": 2.34})
    assert all(type(v) is float for v in logs.values())
    total.backward()
    assert [terms[k].grad.item() for k in terms] == pytest.approx([1.0, 0.5, 0.1, 0.01])


def test_total_loss_missing_terms_log_zero():
    total, logs = total_loss({"instance": torch.tensor(1.5), "class_scene": torch.tensor(0.5)}, LossConfig())
    assert total.item() == pytest.approx(2.0)  # lambda_C^S = 1 by default
    assert logs == {"instance": 1.5, "class_scene": 0.5, "fusion_instance": 0.0, "fusion_scene": 0.0, "total": 2.0}


def test_total_loss_rejects_unknown_term():
    with pytest.raises(ValueError, match="fusion_scenes"):
        total_loss({"instance": torch.tensor(1.0), "fusion_scenes": torch.tensor(1.0)}, LossConfig())
