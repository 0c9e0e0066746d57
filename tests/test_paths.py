"""One path per rule (issue 19): each rule below lives in one function, and its users call it."""
from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

from comfusion import registry
from comfusion.config import JobSection, from_dict, load_config
from comfusion.data import subject_scenes
from comfusion.fsutil import clean_stale, publish_dir, scratch_dir, temp_sibling
from comfusion.metrics import slug
from comfusion.priors import plan_priors
from comfusion.sampling import default_device

REPO = Path(__file__).parents[1]
SCENES = ["in the rain", "in the snow", "on the bed"]


def _cfg():
    return from_dict({"model": {"base": "tiny", "preset_seed": 3}, "data": {"scenes": SCENES},
                      "priors": {"count": 6}})


def test_a_subjects_scenes_are_its_own_else_the_jobs():
    assert tuple(subject_scenes(["on the sofa"], SCENES)) == ("on the sofa",)
    assert tuple(subject_scenes(None, SCENES)) == tuple(SCENES)


def test_priors_plan_takes_the_subjects_scenes_and_dreambooth_ignores_them():
    cfg = _cfg()
    own = plan_priors("dog", cfg, scenes=["on the sofa", "in the TV"], method="comfusion")
    assert own.scenes == ("on the sofa", "in the TV")
    assert [r.prompt for r in own.rows()[:2]] == ["a dog on the sofa", "a dog in the TV"]
    assert plan_priors("dog", cfg, method="comfusion").scenes == tuple(SCENES)  # default: data.scenes
    # the same plan (and cache key) as a config whose data.scenes were the subject's
    same = plan_priors("dog", cfg.replace(**{"data.scenes": ["on the sofa", "in the TV"]}), method="comfusion")
    assert own.key == same.key
    db = plan_priors("dog", cfg, scenes=["on the sofa"], method="dreambooth")
    assert db.scenes == ("",) and db.row(0).prompt == "a dog"


def test_default_device_names_or_detects():
    import torch

    assert default_device("cpu") == "cpu" and default_device("cuda:1") == "cuda:1"
    found = "cuda" if torch.cuda.is_available() else "cpu"
    assert default_device() == found and default_device("auto") == found


def test_tracking_uri_is_the_same_for_jobs_and_serve(tmp_path, monkeypatch):
    from serve.settings import ServeSettings

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    expected = f"sqlite:///{tmp_path.resolve() / JobSection.storage / 'mlflow.db'}"
    assert registry.tracking_uri() == expected == ServeSettings().tracking_uri
    assert registry.tracking_uri(tmp_path / "s") == f"sqlite:///{tmp_path.resolve() / 's' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///rel/m.db")  # made absolute for other folders
    assert registry.tracking_uri("ignored") == f"sqlite:///{tmp_path.resolve() / 'rel' / 'm.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert registry.tracking_uri() == ServeSettings().tracking_uri == "http://mlflow:5000"
    assert ServeSettings.from_args({"tracking_uri": "sqlite:///x.db"}).tracking_uri == \
        f"sqlite:///{tmp_path.resolve() / 'x.db'}"
    # a job's own job.tracking_uri wins over the environment (which a submitted job may not have)
    assert registry.tracking_uri("ignored", "http://other:5000") == "http://other:5000"
    cfg = load_config(REPO / "configs" / "demo.yaml", ["job.tracking_uri=sqlite:///j.db"])
    assert registry.tracking_uri(cfg.job.storage, cfg.job.tracking_uri) == f"sqlite:///{tmp_path.resolve() / 'j.db'}"


def test_serving_base_matches_the_serve_settings_fields():
    from serve.settings import ServeSettings

    args = registry.serving_base(_cfg().model)
    assert args == {"base": "tiny", "preset_seed": 3}
    assert ServeSettings.from_args(args).preset_seed == 3  # every key is a ServeSettings field


def test_one_scene_slug_in_metric_and_image_keys():
    assert slug("on the top of mountain") == "on-the-top-of-mountain"
    tracking = (REPO / "jobs" / "tracking.py").read_text()
    assert 'key=f"samples/{slug(scene)}"' in tracking and "def scene_slug" not in tracking


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_eval_report_does_not_import_evaluate_and_jobs_never_import_serve():
    assert "jobs.evaluate" not in _imports(REPO / "jobs" / "eval_report.py")
    assert "jobs.eval_targets" in _imports(REPO / "jobs" / "eval_report.py")
    for path in (REPO / "jobs").glob("*.py"):
        assert not {m for m in _imports(path) if m.split(".")[0] == "serve"}, path


def test_scratch_dir_publishes_a_subfolder_and_cleans_up(tmp_path):
    folder = tmp_path / "run" / "checkpoint"
    with scratch_dir(folder) as tmp:
        (tmp / "checkpoint").mkdir()  # as a download makes its own subfolder
        (tmp / "checkpoint" / "a.txt").write_text("new")
        publish_dir(tmp / "checkpoint", folder)
    assert (folder / "a.txt").read_text() == "new"
    assert sorted(p.name for p in folder.parent.iterdir()) == ["checkpoint"]  # no temporary left
    with pytest.raises(RuntimeError):
        with scratch_dir(folder) as tmp:
            (tmp / "half").mkdir()
            raise RuntimeError("download failed")
    assert sorted(p.name for p in folder.parent.iterdir()) == ["checkpoint"]


def test_serve_cache_removal_leaves_only_entries_clean_stale_knows(tmp_path, monkeypatch):
    from serve import registry as serve_registry

    folder = tmp_path / "subj" / "v1"
    folder.mkdir(parents=True)
    (folder / "x").write_text("1")
    real_rmtree = serve_registry.shutil.rmtree
    monkeypatch.setattr(serve_registry.shutil, "rmtree", lambda *a, **k: None)  # killed before deleting
    serve_registry._remove(folder)
    monkeypatch.setattr(serve_registry.shutil, "rmtree", real_rmtree)
    (left,) = list(folder.parent.iterdir())
    assert left.name.startswith(".v1.tmp-")
    os.utime(left, (0, 0))  # silent for a long time (this process is alive, so only age counts)
    os.utime(left / "x", (0, 0))
    assert clean_stale(folder.parent, max_age_s=60) and not any(folder.parent.iterdir())
    assert temp_sibling(folder).parent == folder.parent


def test_run_key_is_what_trains_not_how_the_job_runs(tmp_path):
    """A resubmitted job finds its runs: the key ignores the job's operational settings, the other
    subjects of the manifest and where storage is; the subject's scenes, photos, method and every
    training setting change it."""
    from types import SimpleNamespace

    from jobs.train_many import run_key

    photo = tmp_path / "a.png"
    photo.write_bytes(b"photo")
    spec = {"id": "ball", "images": [str(photo)], "class_noun": "ball"}
    cfg = from_dict({"data": {"scenes": SCENES, "subjects": [spec]}}).replace(method="comfusion")
    subject = SimpleNamespace(id="ball", identifier="sks", class_noun="ball", image_paths=(str(photo),),
                              scenes=tuple(SCENES))
    key = run_key(cfg, subject)
    other = {"id": "box", "images": [str(photo)], "class_noun": "box"}
    same = cfg.replace(**{"job.storage": "/elsewhere", "job.tracking_uri": "http://m:5000", "job.max_failures": 7,
                          "job.progress_every_s": 1.0, "eval.images_per_prompt": 2,
                          "data.subjects": [spec, other], "data.root": str(tmp_path)})
    assert run_key(same, subject) == key
    assert run_key(cfg.replace(**{"train.lr": 2e-4}), subject) != key
    assert run_key(cfg.replace(method="dreambooth"), subject) != key
    assert run_key(cfg, SimpleNamespace(**{**vars(subject), "scenes": ("on the sofa",)})) != key
    photo.write_bytes(b"another photo")
    assert run_key(cfg, subject) != key

