"""The procedural world (issue 8): renderer, captions, instances, exact judges, toy training scripts."""
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from comfusion.prompts import PAPER_SCENES
from comfusion.toy import world


def test_render_is_deterministic_seeded_and_any_size():
    obj = world.make_instance(3)
    a, b = world.render(obj, "in the snow", 5), world.render(obj, "in the snow", 5)
    assert a.dtype == np.uint8 and a.shape == (32, 32, 3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, world.render(obj, "in the snow", 6))  # another view
    assert not np.array_equal(a, world.render(obj, "at night", 5))
    assert not np.array_equal(a, world.render(None, "in the snow", 5))  # the object is drawn
    assert world.render(obj, "on the grass", 1, size=48).shape == (48, 48, 3)
    assert world.make_instance(3) == obj and world.make_instance(4) != obj
    with pytest.raises(ValueError, match="unknown scene"):
        world.render(obj, "on the moon", 0)


def test_random_captioned_pictures_are_deterministic_and_varied():
    def draw(seed):
        rng = np.random.default_rng(seed)
        return [world.random_caption_image(rng) for _ in range(40)]

    first, again = draw(0), draw(0)
    assert all(np.array_equal(x[0], y[0]) and x[1] == y[1] for x, y in zip(first, again))
    parsed = [world.parse_caption(c) for _, c in first]
    assert len({p[1] for p in parsed}) >= 4 and len({p[2] for p in parsed}) >= 8  # classes, scenes
    assert any(p[0] is None for p in parsed) and any(p[0] is not None for p in parsed)


def test_captions_name_colour_class_and_scene_only():
    assert world.caption("ball", "red", "in the snow") == "a red ball in the snow"
    assert world.parse_caption("a red ball in the snow") == ("red", "ball", "in the snow")
    assert world.parse_caption("a star on the top of mountain") == (None, "star", "on the top of mountain")
    assert world.parse_caption("a pink ring") == ("pink", "ring", None)
    for bad in ("a striped ball", "a red ball in the kitchen", "the red ball"):
        with pytest.raises(ValueError):
            world.parse_caption(bad)
    rng = np.random.default_rng(1)
    for _ in range(30):
        ex = world.random_example(rng)
        colour, noun, scene = world.parse_caption(ex.caption)
        assert noun == ex.instance.class_noun and colour in (None, ex.instance.colour) and scene in (None, ex.scene)
    # the world's scenes are the paper's where they can be drawn
    assert set(world.PAPER_WORLD_SCENES) == set(world.WORLD_SCENES) - {"at night"}
    assert set(world.PAPER_WORLD_SCENES) <= set(PAPER_SCENES) and len(world.PAPER_WORLD_SCENES) == 12


def test_instances_differ_by_details_no_caption_names():
    seeds = [s for s in range(200) if world.make_instance(s, "box").colour == "blue"][:2]
    a, b = (world.make_instance(s, "box") for s in seeds)
    assert a.caption("in the snow") == b.caption("in the snow") == "a blue box in the snow"
    unnamed = ("pattern", "accent", "aspect", "shape", "pattern_phase", "marks")
    assert any(getattr(a, f) != getattr(b, f) for f in unnamed)
    assert not np.array_equal(world.render(a, "in the snow", 0), world.render(b, "in the snow", 0))
    # each unnamed detail shows in the pixels on its own
    for field, value in (("pattern", "checks" if a.pattern != "checks" else "dots"), ("aspect", a.aspect * 1.3),
                         ("pattern_phase", (a.pattern_phase[0] + 0.5, a.pattern_phase[1])), ("marks", ())):
        if field == "pattern_phase" and a.pattern == "plain":
            continue
        if field == "marks" and not a.marks:
            continue
        changed = replace(a, **{field: value})
        assert not np.array_equal(world.render(a, "on the table", 2), world.render(changed, "on the table", 2)), field


def test_instance_photos_share_one_background_and_differ_in_view():
    obj = world.make_instance(world.HELD_OUT_SEED_START + 5)
    photos = world.instance_photos(obj, 3)
    assert photos.shape == (3, 32, 32, 3)
    assert np.array_equal(photos, world.instance_photos(obj, 3))
    assert len({p.tobytes() for p in photos}) == 3
    assert all(world.scene_of(p)[0] == world.PHOTO_SCENE for p in photos)
    assert all(world.scene_of(p)[0] == "on the bed" for p in world.instance_photos(obj, 2, scene="on the bed"))


def test_scene_of_is_right_on_fresh_renders():
    rng = np.random.default_rng(123)
    examples = [world.random_example(rng) for _ in range(100)]
    verdicts = [world.scene_of(ex.image) for ex in examples]
    accuracy = np.mean([scene == ex.scene for (scene, _), ex in zip(verdicts, examples)])
    assert accuracy >= 0.95
    assert all(0 <= conf <= 1 for _, conf in verdicts)
    for scene in world.WORLD_SCENES:  # empty backgrounds too
        assert world.scene_of(world.render(None, scene, 999))[0] == scene


def test_instance_distance_prefers_the_same_instance_in_another_scene():
    wins, total, own = 0, 0, []
    for c, noun in enumerate(world.CLASS_NOUNS):
        instances = [world.make_instance(world.HELD_OUT_SEED_START + 100 * c + k, noun) for k in range(5)]
        for i, obj in enumerate(instances):
            scene = world.WORLD_SCENES[(3 * i + c) % len(world.WORLD_SCENES)]
            query = world.render(obj, scene, 777 + i)  # a view no reference render uses
            d_own = world.instance_distance(query, obj)
            own.append(d_own)
            for other in instances[:i] + instances[i + 1:]:
                wins += d_own < world.instance_distance(query, other)
                total += 1
    assert wins / total >= 0.9
    assert np.median(own) < 0.3
    empty = world.render(None, "on the grass", 3)
    assert world.instance_distance(empty, world.make_instance(0)) == world._MISSING


def test_toy_preset_fits_the_weight_budget():
    from comfusion.models import BasePreset
    from comfusion.toy.pretrain import TOY_PRESET, build_toy_components, parameter_count

    preset = BasePreset(**TOY_PRESET)  # models.py can adopt it as it is
    assert preset.resolution == 32
    from comfusion.toy.judges import build_toy_judges

    a, b = build_toy_components(0), build_toy_components(0)
    base = sum(parameter_count(a[k]) for k in ("unet", "vae", "text_encoder"))
    assert base * 4 <= 16e6  # fp32 bytes
    assert (base + parameter_count(build_toy_judges(0))) * 4 <= 20e6  # the base and its judges together
    assert all(torch.equal(x, y) for x, y in zip(a["unet"].parameters(), b["unet"].parameters()))


def test_toy_pretrain_steps_are_reproducible():
    from comfusion.toy.pretrain import PretrainConfig, build_toy_components, render_pool, train_unet, train_vae

    cfg = PretrainConfig(pool=8, batch_size=4, log_every=100)
    images, captions = render_pool(8, 32, 0)

    def run():
        parts = build_toy_components(0)
        train_vae(parts["vae"], images, cfg, 2, log=lambda m: None)
        ema, _ = train_unet(parts, torch.randn(8, 4, 16, 16, generator=torch.Generator().manual_seed(0)),
                            captions, cfg, 2, log=lambda m: None)
        return [p.detach().clone() for m in (parts["vae"], ema["unet"], ema["text_encoder"]) for p in m.parameters()]

    assert all(torch.equal(x, y) for x, y in zip(run(), run()))


def test_toy_pretrain_script_runs_and_its_folder_loads_and_samples(tmp_path, capsys):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from comfusion.models import load_base
    from comfusion.sampling import sample
    from comfusion.toy.pretrain import main

    out = tmp_path / "toy"
    assert main(["--out", str(out), "--steps", "2", "--pool", "16", "--batch-size", "8", "--log-every", "1",
                 "--eval-per-scene", "1", "--sample-steps", "2"]) == 0
    printed = capsys.readouterr().out
    assert "unet step" in printed and "vae  step" in printed and "to repeat" in printed
    log = json.loads((out / "pretrain_log.json").read_text())
    assert log["unet_steps"] == 2 and log["vae_steps"] == 2 and log["parameters"]["unet"] > 0
    assert 0 <= log["samples"]["scene_accuracy"] <= 1 and (out / "preview.png").is_file()
    weights = sum(f.stat().st_size for f in Path(out).rglob("*.safetensors"))
    assert weights <= 16e6
    base = load_base(str(out))
    assert isinstance(base["unet"], UNet2DConditionModel) and isinstance(base["vae"], AutoencoderKL)
    assert base["vae"].config.scaling_factor == pytest.approx(log["scaling_factor"])
    images = sample(base, ["a red ball in the snow"], [0], steps=2, guidance_scale=2.0).images
    assert images.shape == (1, 32, 32, 3)


def test_toy_pretrain_continues_a_trained_base(tmp_path, capsys):
    """--init: the UNet and text encoder start from the folder's weights and move; the autoencoder,
    its scaling factor and the reserved identifier tokens stay; bad folders are named before training."""
    from comfusion.models import load_base
    from comfusion.prompts import IDENTIFIER_TOKENS
    from comfusion.toy.pretrain import main

    first, cont = tmp_path / "first", tmp_path / "cont"
    common = ["--pool", "16", "--batch-size", "8", "--eval-per-scene", "0"]
    assert main(["--out", str(first), "--steps", "2", *common]) == 0
    assert main(["--out", str(cont), "--init", str(first), "--seed", "1", "--steps", "2", "--vae-steps", "0",
                 "--lr", "3e-4", *common]) == 0
    log = json.loads((cont / "pretrain_log.json").read_text())
    assert log["vae_steps"] == 0 and log["unet_steps"] == 2 and log["config"]["init"] == str(first)
    assert f"--init {first}" in log["repeat"] and "--lr 0.0003" in log["repeat"]
    a, b = load_base(str(first)), load_base(str(cont))
    assert b["vae"].config.scaling_factor == pytest.approx(a["vae"].config.scaling_factor)
    assert all(torch.equal(x, y) for x, y in zip(a["vae"].parameters(), b["vae"].parameters()))
    moved = [not torch.equal(x, y) for x, y in zip(a["unet"].parameters(), b["unet"].parameters())]
    assert sum(moved) > len(moved) // 2
    assert b["tokenizer"].convert_tokens_to_ids(list(IDENTIFIER_TOKENS)) == \
        a["tokenizer"].convert_tokens_to_ids(list(IDENTIFIER_TOKENS))
    capsys.readouterr()
    with pytest.raises(Exception, match="nowhere"):
        main(["--out", str(tmp_path / "x"), "--init", str(tmp_path / "nowhere"), "--steps", "1", *common])


def test_toy_judges_script_runs_and_its_folders_load(tmp_path, capsys):
    from comfusion.models import load_judges
    from comfusion.toy.judges import main

    out = tmp_path / "judges"
    assert main(["--out", str(out), "--steps", "2", "--pool", "32", "--batch-size", "16", "--eval", "10",
                 "--log-every", "1"]) == 0
    printed = capsys.readouterr().out
    assert "CLIP held-out" in printed and "instance encoder held-out retrieval" in printed
    log = json.loads((out / "judges_log.json").read_text())
    assert 0 <= log["clip_retrieval"]["caption_top1"] <= 1 and 0 <= log["dino_retrieval"]["top1"] <= 1
    judges = load_judges(str(out / "dino"), str(out / "clip"))
    x = torch.from_numpy(world.render(world.make_instance(1), "in the sky", 0)).permute(2, 0, 1)[None] / 127.5 - 1
    assert judges.dino_embed(x.float()).shape == (1, 64)
    assert judges.clip_image_embed(x.float()).shape == (1, 64)
    assert judges.clip_text_embed(["a red ball in the sky"]).shape == (1, 64)
