"""Models with no network: presets built in code, saved and loaded by folder like hub weights."""
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPModel, CLIPTextModel, ViTModel

import pytest

from comfusion import models


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_tiny_preset_is_deterministic_and_seeded():
    a, b = models.build_base_components("tiny", seed=0), models.build_base_components("tiny", seed=0)
    c = models.build_base_components("tiny", seed=1)
    for part in ("unet", "vae", "text_encoder"):
        assert _same_weights(a[part], b[part])
        assert not _same_weights(a[part], c[part])


def test_tiny_preset_has_sd15_types_and_noise_schedule(tiny_base):
    assert isinstance(tiny_base["unet"], UNet2DConditionModel)
    assert isinstance(tiny_base["vae"], AutoencoderKL)
    assert isinstance(tiny_base["text_encoder"], CLIPTextModel)
    sched = tiny_base["scheduler"]
    assert isinstance(sched, DDIMScheduler)
    assert (sched.config.beta_schedule, sched.config.num_train_timesteps) == ("scaled_linear", 1000)
    assert (sched.config.beta_start, sched.config.beta_end) == (0.00085, 0.012)
    # the training schedule shares the betas: alphas_cumprod of SD 1.5 at t = 999
    ddpm = models.noise_schedule(sched)
    assert torch.allclose(ddpm.alphas_cumprod, sched.alphas_cumprod)
    assert abs(float(ddpm.alphas_cumprod[999]) - 0.0047) < 1e-3


def test_save_pretrained_and_load_by_folder(tmp_path):
    built = models.build_base_components("tiny", seed=3)
    models.save_base(built, tmp_path / "base")
    loaded = models.load_base(str(tmp_path / "base"))  # the same path a hub id takes
    for part in ("unet", "vae", "text_encoder"):
        assert _same_weights(built[part], loaded[part])
    prompt = "a sks dog in the rain"
    assert loaded["tokenizer"](prompt).input_ids == built["tokenizer"](prompt).input_ids


def test_preset_name_loads_through_its_cache_folder(tiny_base):
    folder = models.resolve_base("tiny")
    assert (models.cache_root() / "presets").is_dir() and folder.startswith(str(models.cache_root()))
    assert _same_weights(tiny_base["unet"], models.build_base_components("tiny")["unet"])


def test_byte_tokenizer_round_trips_any_prompt(tmp_path):
    tok = models.build_byte_tokenizer()
    ids = tok("a sks dog on the top of mountain, ÄÖ!").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True).replace(" ", "") == "asksdogonthetopofmountain,äö!"
    tok.save_pretrained(tmp_path / "tok")
    assert type(tok).from_pretrained(tmp_path / "tok")("hello").input_ids == tok("hello").input_ids
    assert tok.model_max_length == 77


def test_judges_load_by_preset_and_folder(tmp_path):
    judges = models.load_judges("tiny", "tiny")
    assert isinstance(judges.dino, ViTModel) and isinstance(judges.clip, CLIPModel)
    models.save_judges(models.build_judge_components("tiny"), tmp_path / "j")
    again = models.load_judges(str(tmp_path / "j" / "dino"), str(tmp_path / "j" / "clip"))
    assert _same_weights(judges.dino, again.dino) and _same_weights(judges.clip, again.clip)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert judges.dino_embed(x).shape == (2, 32)
    assert judges.clip_image_embed(x).shape == judges.clip_text_embed(["a dog", "a cat"]).shape


@pytest.mark.parametrize("name", ["no-such-org/no-such-model", "/nonexistent/folder"])
def test_missing_model_gives_one_clear_error(name):
    with pytest.raises(models.ModelNotFoundError) as e:
        models.load_base(name)
    msg = str(e.value)
    assert name in msg and "must be present locally" in msg and "reachable" in msg
    with pytest.raises(models.ModelNotFoundError, match="dino judge"):
        models.load_judges(name, "tiny")


def test_sd15_arch_has_sd15_shapes():
    # Shapes only, on the meta device: building 1B random parameters on a CPU test is wasteful.
    p = models.BASE_PRESETS["sd15-arch"]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**p.unet)
    n = sum(x.numel() for x in unet.parameters())
    assert 855e6 < n < 866e6  # SD 1.5's UNet has 859.5M parameters
    assert p.resolution == 512 and p.text["hidden_size"] == 768
    j = models.JUDGE_PRESETS["sd15-arch"]
    assert (j["dino"]["hidden_size"], j["dino"]["patch_size"]) == (384, 16)  # ViT-S/16
