"""Subject checkpoints with the real tiny models: round trips, atomic publish, refusals, swaps."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from comfusion import checkpoint as ckpt
from comfusion.checkpoint import (CheckpointError, SubjectMeta, load_subject_checkpoint, load_subject_weights_,
                                  read_subject_weights, save_subject_checkpoint, snapshot_weights,
                                  verify_checkpoint)
from comfusion.models import load_base
from comfusion.sampling import sample

PROMPT = ["a photo of sks dog on the beach"]


def make_meta(**kw) -> SubjectMeta:
    fields = dict(id="dog0", identifier="sks", class_noun="dog", base_model="tiny",
                  config={"train": {"steps": 3, "lr": 1e-5}}, metrics={"eval/dino": 0.5})
    return SubjectMeta(**{**fields, **kw})


def perturbed(components: dict, seed: int = 0) -> dict:
    """The components with noise added to the UNet and text encoder, so subject != base."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in (components["unet"], components["text_encoder"]):
            for p in module.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return components


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def sampled(components: dict) -> np.ndarray:
    return sample(components, PROMPT, [0], steps=2, guidance_scale=3.0).images


def hidden_entries(folder) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    """A fp16 checkpoint of perturbed tiny weights, and those weights (fp32)."""
    parts = perturbed(load_base("tiny"))
    folder = save_subject_checkpoint(tmp_path_factory.mktemp("subject") / "dog0", parts["unet"],
                                     parts["text_encoder"], make_meta())
    return folder, parts


def test_fp32_round_trip_is_bit_identical(tmp_path):
    base = load_base("tiny")
    folder = save_subject_checkpoint(tmp_path / "dog0", base["unet"], base["text_encoder"], make_meta(), dtype="fp32")
    unet, text_encoder, meta = load_subject_checkpoint(folder)
    assert states_equal(unet.state_dict(), base["unet"].state_dict())
    assert states_equal(text_encoder.state_dict(), base["text_encoder"].state_dict())
    assert meta == verify_checkpoint(folder) == SubjectMeta.from_json(meta.to_json())
    assert meta.dtype == "fp32" and meta.created.endswith("+00:00")
    assert {ckpt.UNET_WEIGHTS, ckpt.TEXT_WEIGHTS} <= set(meta.files)
    assert (meta.id, meta.config, meta.metrics) == ("dog0", {"train": {"steps": 3, "lr": 1e-5}}, {"eval/dino": 0.5})
    assert hidden_entries(tmp_path) == []


def test_fp16_round_trip_equals_half_and_leaves_live_modules_alone(subject):
    folder, parts = subject
    assert parts["unet"].dtype == parts["text_encoder"].dtype == torch.float32  # saved as fp16, still fp32
    unet_state, text_state, meta = read_subject_weights(folder)
    assert meta.dtype == "fp16"
    for live, state in ((parts["unet"], unet_state), (parts["text_encoder"], text_state)):
        assert states_equal(state, {k: v.half() for k, v in live.state_dict().items()})
    unet, text_encoder, _ = load_subject_checkpoint(folder, dtype=torch.float16)
    assert unet.dtype == text_encoder.dtype == torch.float16
    assert states_equal(unet.state_dict(), unet_state) and states_equal(text_encoder.state_dict(), text_state)
    assert json.loads((folder / "text_encoder" / "config.json").read_text())["dtype"] == "float16"


@pytest.mark.parametrize("existing", [False, True])
def test_interrupted_publish_leaves_no_visible_or_temp_folder(tmp_path, monkeypatch, existing):
    base = load_base("tiny")
    folder = tmp_path / "dog0"
    if existing:
        save_subject_checkpoint(folder, base["unet"], base["text_encoder"], make_meta(id="old"))
    real_save_file = ckpt.save_file

    def fail_after_unet(tensors, path, **kw):
        if str(path).endswith(ckpt.TEXT_WEIGHTS):  # the unet is already on disk by now
            raise OSError("disk full")
        return real_save_file(tensors, path, **kw)

    monkeypatch.setattr(ckpt, "save_file", fail_after_unet)
    with pytest.raises(OSError, match="disk full"):
        save_subject_checkpoint(folder, base["unet"], base["text_encoder"], make_meta(id="new"))
    assert hidden_entries(tmp_path) == []
    if existing:  # the previous checkpoint is untouched
        assert verify_checkpoint(folder).id == "old"
    else:
        assert not folder.exists()


def test_second_save_replaces_the_checkpoint(tmp_path, subject):
    _, parts = subject
    base = load_base("tiny")
    folder = save_subject_checkpoint(tmp_path / "dog0", base["unet"], base["text_encoder"], make_meta(id="v1"))
    save_subject_checkpoint(folder, parts["unet"], parts["text_encoder"], make_meta(id="v2"), dtype="fp32")
    unet, text_encoder, meta = load_subject_checkpoint(folder)
    assert meta.id == "v2"
    assert states_equal(unet.state_dict(), parts["unet"].state_dict())
    assert states_equal(text_encoder.state_dict(), parts["text_encoder"].state_dict())
    assert hidden_entries(tmp_path) == []


def _remove(folder, rel):
    (folder / rel).unlink()


def _flip_byte(folder, rel):
    path = folder / rel
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _write(text):
    return lambda folder, rel: (folder / rel).write_text(text)


@pytest.mark.parametrize("rel, damage", [
    (ckpt.UNET_WEIGHTS, _remove),
    (ckpt.TEXT_WEIGHTS, _flip_byte),
    (ckpt.UNET_WEIGHTS, _flip_byte),
    ("subject.json", _remove),
    ("subject.json", _write("{not json")),
    ("subject.json", _write('{"id": "dog0"}')),
])
def test_damaged_checkpoint_is_refused_naming_the_file(tmp_path, subject, rel, damage):
    folder = shutil.copytree(subject[0], tmp_path / "dog0")
    damage(folder, rel)
    for load in (verify_checkpoint, load_subject_checkpoint, read_subject_weights):
        with pytest.raises(CheckpointError, match=rel) as err:
            load(folder)
        assert str(folder) in str(err.value)
    with pytest.raises(CheckpointError, match=rel):
        load_subject_weights_(load_base("tiny"), folder)


def test_checkpoint_plugs_into_a_diffusers_pipeline(subject):
    base = load_base("tiny")
    unet, text_encoder, _ = load_subject_checkpoint(subject[0])
    pipe = StableDiffusionPipeline(vae=base["vae"], text_encoder=text_encoder, tokenizer=base["tokenizer"],
                                   unet=unet, scheduler=base["scheduler"], safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(PROMPT, num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 32, 32, 3) and np.isfinite(out.images).all()


def test_in_place_swap_matches_the_checkpoint_and_restores_the_base(subject):
    folder, _ = subject
    components = load_base("tiny")
    unet, text_encoder = components["unet"], components["text_encoder"]
    weight = next(unet.parameters())
    ids = (id(unet), id(text_encoder), id(weight), weight.data_ptr())
    base_image, snapshot = sampled(components), snapshot_weights(components)

    meta = load_subject_weights_(components, folder)
    subject_image = sampled(components)
    assert meta.id == "dog0"
    assert (id(components["unet"]), id(components["text_encoder"]), id(next(unet.parameters())),
            next(unet.parameters()).data_ptr()) == ids
    assert unet.dtype == torch.float32  # fp16 weights cast to the live module's dtype
    loaded_unet, loaded_text, _ = load_subject_checkpoint(folder)
    reference = sampled({**components, "unet": loaded_unet, "text_encoder": loaded_text})
    assert np.array_equal(subject_image, reference)
    assert not np.array_equal(subject_image, base_image)

    assert load_subject_weights_(components, snapshot) is None
    assert np.array_equal(sampled(components), base_image)
    assert states_equal(unet.state_dict(), snapshot[0]) and id(next(unet.parameters())) == ids[2]

    assert load_subject_weights_(components, read_subject_weights(folder)).id == "dog0"  # the Serve path
    assert np.array_equal(sampled(components), subject_image)


def test_mismatched_weights_are_refused_without_touching_the_modules(subject):
    components = load_base("tiny")
    before = snapshot_weights(components)
    unet_state, text_state, meta = read_subject_weights(subject[0])
    unet_state.pop(next(iter(unet_state)))
    with pytest.raises(CheckpointError, match="keys do not match"):
        load_subject_weights_(components, (unet_state, text_state, meta))
    text_state = {k: v[..., :1] if v.ndim else v for k, v in read_subject_weights(subject[0])[1].items()}
    with pytest.raises(CheckpointError, match="shapes do not match"):
        load_subject_weights_(components, (read_subject_weights(subject[0])[0], text_state, meta))
    after = snapshot_weights(components)
    assert states_equal(after[0], before[0]) and states_equal(after[1], before[1])


def test_meta_validates_and_round_trips():
    meta = make_meta(dtype="fp32", base_revision="abc123")
    assert SubjectMeta.from_json(meta.to_json()) == meta
    with pytest.raises(ValueError):
        make_meta(dtype="int8")
    with pytest.raises(ValueError):
        SubjectMeta.from_json('["not", "an", "object"]')
