from pathlib import Path

import pytest

from comfusion.config import ConfigError, JobConfig, dump_config, flatten, from_dict, load_config, to_dict

CONFIGS = sorted(p for p in (Path(__file__).parents[1] / "configs").glob("*.yaml") if not p.name.startswith("serve"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, JobConfig)
    assert from_dict(to_dict(cfg)) == cfg  # round trip through plain dicts
    if path.name != "toy_quality.yaml":  # the toy benchmark makes its own subjects
        assert len(cfg.data.subjects) >= 1


def test_shipped_configs_exist():
    assert {p.name for p in CONFIGS} >= {"demo.yaml", "paper.yaml"}


def test_paper_config_has_the_paper_hyperparameters():
    cfg = load_config(Path(__file__).parents[1] / "configs" / "paper.yaml")
    assert cfg.model.base == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert (cfg.train.steps, cfg.train.lr, cfg.train.batch_size) == (1200, 1e-5, 1)
    assert (cfg.priors.count, len(cfg.data.scenes)) == (200, 15)
    assert (cfg.loss.lambda_class_scene, cfg.loss.lambda_fusion_instance, cfg.loss.lambda_fusion_scene) == (1, 0.01, 0.01)
    assert cfg.loss.tau == 3 and (cfg.sampler.steps, cfg.sampler.guidance_scale) == (30, 7.5)


def test_dotted_overrides_and_relative_image_paths(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  subjects:\n    - {id: a, class_noun: dog, images: [x/1.png]}\ntrain:\n  steps: 3\n")
    cfg = load_config(p, ["train.steps=7", "loss.tau=5", "job.methods=[comfusion, dreambooth]"])
    assert (cfg.train.steps, cfg.loss.tau, cfg.job.methods) == (7, 5, ("comfusion", "dreambooth"))
    assert cfg.data.subjects[0].images == (str(tmp_path / "x/1.png"),)
    assert load_config(p, ["train.lr=1e-4"]).train.lr == 1e-4  # YAML 1.1 reads 1e-4 as a string
    with pytest.raises(ConfigError, match="train.lr"):
        load_config(p, ["train.lr=fast"])
    cfg = load_config(p, [f"data.root={tmp_path / 'elsewhere'}"])
    assert cfg.data.subjects[0].images == (str(tmp_path / "elsewhere/x/1.png"),)


@pytest.mark.parametrize("override,key", [
    ("train.stepz=3", "train.stepz"),
    ("nosuch.x=1", "nosuch"),
    ("train.steps=0", "train.steps"),
    ("train.lr=2", "train.lr"),
    ("train.steps=abc", "train.steps"),
    ("loss.tau=0", "loss.tau"),
    ("train.optimizer=sgd", "train.optimizer"),
    ("model.resolution=30", "model.resolution"),
    ("priors.count=0", "priors.count"),
    ("priors.count=100000", "priors.count"),
    ("job.methods=[textual_inversion]", "job.methods"),
    ("loss.fusion=maybe", "loss.fusion"),
])
def test_bad_key_or_value_names_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert e.value.key == key
    assert f"'{key}'" in str(e.value)


def test_subject_without_class_noun_names_the_field():
    with pytest.raises(ConfigError, match=r"data\.subjects\[0\]\.class_noun"):
        from_dict({"data": {"subjects": [{"id": "a", "images": ["x.png"]}]}})


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_config_is_frozen_and_flattens():
    cfg = JobConfig()
    with pytest.raises(Exception):
        cfg.train.steps = 5  # type: ignore[misc]
    flat = flatten(cfg)
    assert flat["train.lr"] == 1e-5 and flat["loss.tau"] == 3
    assert from_dict(__import__("yaml").safe_load(dump_config(cfg))) == cfg


def _manifest(tmp_path, images, root=None, **data):
    p = tmp_path / "cfg" / "c.yaml"
    p.parent.mkdir(exist_ok=True)
    data = {**data, "subjects": [{"id": "a", "class_noun": "dog", "images": images}]}
    if root is not None:
        data["root"] = root
    import yaml
    p.write_text(yaml.safe_dump({"data": data}))
    return p


@pytest.mark.parametrize("image", ["../x.png", "a/../../x.png", "/etc/passwd"])
def test_image_paths_outside_root_are_refused_by_key(tmp_path, image):
    with pytest.raises(ConfigError) as e:
        load_config(_manifest(tmp_path, ["ok.png", image]))
    assert e.value.key == "data.subjects[0].images[1]" and "outside data.root" in str(e.value)
    cfg = load_config(_manifest(tmp_path, ["ok.png", image], allow_absolute_paths=True))
    assert cfg.data.allow_absolute_paths and len(cfg.data.subjects[0].images) == 2


def test_relative_root_starts_at_the_config_folder(tmp_path):
    cfg = load_config(_manifest(tmp_path, ["dog/1.png", str(tmp_path / "photos" / "dog/2.png")], root="../photos"))
    assert cfg.data.root == str(tmp_path / "photos")
    assert cfg.data.subjects[0].images == (str(tmp_path / "photos/dog/1.png"), str(tmp_path / "photos/dog/2.png"))
    assert load_config(_manifest(tmp_path, ["x.png"])).data.root == str(tmp_path / "cfg")


@pytest.mark.parametrize("name", ["a" * 65, "a/b", "..", ".hidden", "with space", "", "x\n"])
def test_bad_job_names_are_refused_before_any_work(name):
    with pytest.raises(ConfigError) as e:
        from_dict({"job": {"name": name}})
    assert e.value.key == "job.name" and len(str(e.value)) < 300


@pytest.mark.parametrize("name", ["demo", "toy-quality", "bench-k2", "paper.v2", "A_1"])
def test_ordinary_job_names_pass(name):
    assert from_dict({"job": {"name": name}}).job.name == name


def test_mlflow_outage_limit_is_positive():
    assert from_dict({"job": {"mlflow_outage_s": 30}}).job.mlflow_outage_s == 30.0
    with pytest.raises(ConfigError, match="job.mlflow_outage_s"):
        from_dict({"job": {"mlflow_outage_s": 0}})
