"""The evaluation job end to end: two tiny subjects x two methods, logged to MLflow runs in a tmp
sqlite backend the way the training job logs them, evaluated on a local Ray cluster (two prompts x
two images each, two CLIP judges); the report (CSV, table, chart) and the MLflow side. Also the
plain loop against the Ray pipeline, checkpoint folders with labels, failures, the report helpers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from comfusion.checkpoint import SubjectMeta, load_subject_weights_, save_subject_checkpoint, snapshot_weights
from comfusion.config import load_config
from comfusion.models import build_judge_components, load_base
from jobs.eval_report import ALL, REAL, judge_slug, metric_key, read_csv, summary_tables, write_report
from jobs.evaluate import folder_targets, main

SUBJECTS = {"alpha": ("sks", "dog"), "bravo": ("zwx", "cube")}
METHODS = ("comfusion", "dreambooth")
SCENES = ("in the snow", "on the grass")
EXPERIMENT = "evaltest"
METRICS_PER_GROUP = 5  # dino + (clip_i, clip_t) x 2 CLIP judges


@dataclass
class World:
    root: Path
    uri: str
    config: Path
    checkpoints: dict  # (subject, method) -> folder
    runs: dict  # (subject, method) -> run id


def _photo(path: Path, seed: int) -> str:
    rng = np.random.default_rng(seed)
    img = np.broadcast_to(rng.integers(0, 256, (1, 1, 3)), (64, 64, 3)).astype(np.uint8).copy()
    img[16:48, 16:48] = rng.integers(0, 256, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)
    return str(path)


def _checkpoints(root: Path) -> dict:
    """The tiny base plus seeded noise, one checkpoint per (subject, method)."""
    base = load_base("tiny")
    state = snapshot_weights(base)
    out = {}
    for k, (sid, method) in enumerate((s, m) for s in SUBJECTS for m in METHODS):
        gen = torch.Generator().manual_seed(100 + k)
        noisy = tuple({n: v + 0.05 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
                       for n, v in part.items()} for part in state)
        load_subject_weights_(base, noisy)
        meta = SubjectMeta(id=sid, identifier=SUBJECTS[sid][0], class_noun=SUBJECTS[sid][1], base_model="tiny",
                           method=method)
        out[(sid, method)] = save_subject_checkpoint(root / "ckpt" / f"{sid}-{method}", base["unet"],
                                                     base["text_encoder"], meta, dtype="fp32")
    return out


def _log_runs(uri: str, root: Path, checkpoints: dict) -> dict:
    """One FINISHED run per (subject, method) with the checkpoint under `checkpoint`, as training logs them;
    plus an older FINISHED and a newer RUNNING run for alpha/comfusion without artifacts (must be ignored)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment(EXPERIMENT, artifact_location=str(root / "artifacts"))
    tags = lambda sid, m: {"subject": sid, "method": m, "class_noun": SUBJECTS[sid][1]}  # noqa: E731
    old = client.create_run(exp, start_time=1_000, tags=tags("alpha", "comfusion"))
    client.set_terminated(old.info.run_id)
    runs = {}
    for k, ((sid, method), folder) in enumerate(checkpoints.items()):
        run = client.create_run(exp, start_time=2_000 + k, tags=tags(sid, method))
        client.log_artifacts(run.info.run_id, str(folder), "checkpoint")
        client.set_terminated(run.info.run_id)
        runs[(sid, method)] = run.info.run_id
    client.create_run(exp, start_time=9_000, tags=tags("alpha", "comfusion"))  # still RUNNING
    return runs


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("evaluate")
    clip_b = build_judge_components("tiny", seed=5)  # a second CLIP judge, loaded from a folder
    clip_b["clip"].save_pretrained(root / "clip-b")
    clip_b["clip_tokenizer"].save_pretrained(root / "clip-b")
    subjects = [{"id": sid, "class_noun": noun, "identifier": ident,
                 "images": [_photo(root / "photos" / sid / f"{i}.png", 10 * k + i) for i in range(2)]}
                for k, (sid, (ident, noun)) in enumerate(SUBJECTS.items())]
    cfg = {"model": {"base": "tiny", "resolution": 32}, "data": {"min_side": 32, "scenes": list(SCENES),
                                                                  "subjects": subjects},
           "sampler": {"steps": 2, "guidance_scale": 7.5, "batch_size": 4},
           "job": {"name": EXPERIMENT, "methods": list(METHODS), "storage": str(root / "storage"),
                   "cpus_per_trainer": 1},
           "eval": {"images_per_prompt": 2, "prompt_sets": ["specific"], "dino": "tiny",
                    "clip_judges": ["tiny", str(root / "clip-b")], "batch_size": 4, "out": str(root / "out")}}
    config = root / "eval.yaml"
    config.write_text(yaml.safe_dump(cfg))
    uri = f"sqlite:///{root}/mlflow.db"
    checkpoints = _checkpoints(root)
    return World(root, uri, config, checkpoints, _log_runs(uri, root, checkpoints))


@pytest.fixture(scope="module")
def cluster():
    import ray

    # address="local": a cluster of our own even when `make demo` left one running on this machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_report(world, cluster):
    """`python -m jobs.evaluate --config ...` through MLflow and Ray Data, run once for the module."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", world.uri)
    try:
        rc = main(["--config", str(world.config)])
    finally:
        mp.undo()
    return rc, world.root / "out"


# ---------------------------------------------------------------------------------------
# end to end


def test_report_files_and_rows(ray_report):
    rc, out = ray_report
    assert rc == 0
    rows = read_csv(out / "scores.csv")
    targets = len(SUBJECTS) * len(METHODS)
    generated = [r for r in rows if r["method"] != REAL]
    assert len(generated) == targets * (len(SCENES) + 1) * METRICS_PER_GROUP  # per prompt + ALL
    assert len([r for r in rows if r["method"] == REAL]) == len(SUBJECTS) * 3  # dino + clip_i x 2 judges
    assert all(math.isfinite(r["value"]) and -1 <= r["value"] <= 1 for r in rows)
    assert {r["scene"] for r in generated if r["prompt"] != ALL} == set(SCENES)
    table = (out / "table.md").read_text()
    for label in ("Real Images", "ComFusion", "DreamBooth", "DINO", "CLIP-I", "CLIP-T", "N/A"):
        assert label in table
    assert table.count("| Methods |") == 2  # one table per CLIP judge
    with Image.open(out / "scores.png") as chart:
        assert chart.size[0] > 100
    assert len(list((out / "grids").glob("*.png"))) == targets


def test_subject_runs_got_metrics_and_grids(ray_report, world):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=world.uri)
    rows = read_csv(ray_report[1] / "scores.csv")
    for (sid, method), run_id in world.runs.items():
        metrics = client.get_run(run_id).data.metrics
        for key in ("eval/dino", "eval/clip_i", "eval/clip_t", "eval/clip_t/in-the-snow", "eval/clip_t/on-the-grass",
                    "eval/clip-b/clip_i", "eval/clip-b/clip_t", "eval/clip-b/clip_t/on-the-grass"):
            assert key in metrics and -1 <= metrics[key] <= 1, (sid, method, key)
        want = next(r["value"] for r in rows if (r["subject"], r["method"], r["metric"], r["prompt"])
                    == (sid, method, "dino", ALL))
        assert metrics["eval/dino"] == pytest.approx(want, abs=1e-9)
        assert [a.path for a in client.list_artifacts(run_id, "eval")] == ["eval/specific.png"]
        assert client.get_run(run_id).info.status == "FINISHED"


def test_evaluation_run_holds_the_report(ray_report, world):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=world.uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id], "tags.kind = 'evaluation'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    names = {a.path for a in client.list_artifacts(runs[0].info.run_id)}
    assert {"scores.csv", "table.md", "scores.png", "grids"} <= names
    assert runs[0].data.params["eval.images_per_prompt"] == "2"
    assert "specific/tiny/comfusion/dino" in runs[0].data.metrics


def test_plain_loop_matches_the_ray_pipeline(ray_report, world):
    """Checkpoint folders, no Ray, no MLflow: the same seeds give the same scores as the pipeline."""
    out = world.root / "out-plain"
    specs = [f"{m}={folder}" for (_, m), folder in world.checkpoints.items()]
    assert main(["--config", str(world.config), "--no-ray", "--no-mlflow", "--out", str(out),
                 "--checkpoint", *specs]) == 0
    key = lambda r: (r["subject"], r["method"], r["prompt_set"], r["prompt"], r["judge"], r["metric"])  # noqa: E731
    ray_rows = {key(r): r["value"] for r in read_csv(ray_report[1] / "scores.csv")}
    plain_rows = {key(r): r["value"] for r in read_csv(out / "scores.csv")}
    assert ray_rows.keys() == plain_rows.keys()
    assert all(plain_rows[k] == pytest.approx(v, abs=1e-6) for k, v in ray_rows.items())
    # the methods differ (different weights from the same seeds) and real images are the same for both
    dino = {m: plain_rows[("alpha", m, "specific", ALL, "tiny", "dino")] for m in METHODS}
    assert dino["comfusion"] != dino["dreambooth"]


# ---------------------------------------------------------------------------------------
# targets, failures, command line


def test_checkpoint_read_in_place_or_downloaded(world, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    import jobs.evaluate as ev

    client = MlflowClient(tracking_uri=world.uri)
    run = client.get_run(world.runs[("alpha", "dreambooth")])
    in_place = ev.fetch_checkpoint(client, run, tmp_path)
    assert in_place.is_relative_to(world.root / "artifacts") and not any(tmp_path.iterdir())
    assert ev.local_artifact_dir("file:///a/b") == Path("/a/b") and ev.local_artifact_dir("s3://x/y") is None
    monkeypatch.setattr(ev, "local_artifact_dir", lambda uri: None)  # as with a remote store
    downloaded = ev.fetch_checkpoint(client, run, tmp_path)
    assert downloaded == tmp_path / run.info.run_id / "checkpoint"
    assert ev.verify_checkpoint(downloaded).id == "alpha"
    assert ev.fetch_checkpoint(client, run, tmp_path) == downloaded  # reused, not fetched again


def test_checkpoint_labels_and_problems(world):
    cfg = load_config(world.config)
    folder = world.checkpoints[("bravo", "dreambooth")]
    targets, problems = folder_targets(cfg, [f"w/o fusion={folder}", str(folder), str(world.root / "nope")])
    assert [(t.subject, t.method) for t in targets] == [("bravo", "w/o fusion"), ("bravo", "dreambooth")]
    assert targets[0].identifier == "zwx" and len(targets[0].photos) == 2 and targets[0].scenes == SCENES
    assert len(problems) == 1 and "nope" in problems[0]
    other_base = cfg.replace(**{"model.base": "sd15-arch"})
    assert "trained from base" in folder_targets(other_base, [str(folder)])[1][0]


def test_failures_exit_non_zero(world, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", world.uri)
    assert main(["--config", str(world.config), "--no-mlflow", "--checkpoint", str(world.root / "nope")]) == 1
    assert main(["--config", str(world.config), "--set", "job.name=missing"]) == 1
    assert "no MLflow experiment named 'missing'" in capsys.readouterr().out
    assert main(["--config", str(world.config), "--set", "eval.images_per_prompt=0"]) == 2
    assert main(["--config", str(world.config), "--no-mlflow"]) == 2
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0


# ---------------------------------------------------------------------------------------
# report helpers and metric keys


def _rows():
    def r(subject, method, value, metric="dino", judge="d", prompt=ALL, prompt_set="specific"):
        return dict(subject=subject, method=method, prompt_set=prompt_set, prompt=prompt, scene="", judge=judge,
                    metric=metric, value=value)

    return [r("a", REAL, 0.8, prompt_set="real"), r("b", REAL, 0.6, prompt_set="real"),
            r("a", "comfusion", 0.7), r("b", "comfusion", 0.5), r("a", "dreambooth", 0.4),
            r("a", "comfusion", 0.3, "clip_t", "c"), r("a", "comfusion", 0.9, "clip_i", "c"),
            r("a", "comfusion", -0.9, "clip_t", "c", prompt="a sks dog in the snow")]  # not an ALL row


def test_summary_tables_average_subjects(tmp_path):
    (table,) = summary_tables(_rows(), ["dreambooth", "comfusion"])
    assert (table.prompt_set, table.dino_judge, table.clip_judge) == ("specific", "d", "c")
    got = {row.label: row for row in table.rows}
    assert [row.label for row in table.rows] == [REAL, "dreambooth", "comfusion"]
    assert got[REAL].dino == pytest.approx(0.7) and got[REAL].subjects == 2 and math.isnan(got[REAL].clip_t)
    assert got["comfusion"].dino == pytest.approx(0.6) and got["comfusion"].clip_t == pytest.approx(0.3)
    paths, text = write_report(_rows(), tmp_path)
    assert "| Real Images | 0.700 | N/A | N/A | 2 |" in text and "| ComFusion | 0.600 | 0.900 | 0.300 | 2 |" in text
    assert all(p.is_file() for p in paths.values())
    assert len(read_csv(paths["csv"])) == len(_rows())


def test_metric_keys():
    row = dict(prompt_set="specific", judge="openai/clip-vit-base-patch32", metric="clip_t", prompt=ALL, scene="")
    first = ("specific", "openai/clip-vit-base-patch32")
    assert metric_key(row, *first) == "eval/clip_t"
    assert metric_key({**row, "prompt": "a sks dog on the top of mountain", "scene": "on the top of mountain"},
                      *first) == "eval/clip_t/on-the-top-of-mountain"
    assert metric_key({**row, "judge": "openai/clip-vit-large-patch14", "metric": "clip_i"},
                      *first) == "eval/clip-vit-large-patch14/clip_i"
    assert metric_key({**row, "prompt_set": "unseen", "metric": "dino", "judge": "facebook/dino-vits16"},
                      *first) == "eval/unseen/dino"
    assert metric_key({**row, "metric": "dino", "prompt": "a sks dog in the rain"}, *first) is None
    assert judge_slug("/models/clip-b/") == "clip-b" and judge_slug("tiny") == "tiny"
