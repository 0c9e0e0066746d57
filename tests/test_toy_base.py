"""benchmarks/toy_base.py (issue 16, what limits the toy base): its exact split of the scores
(photo scene against the others), the identifier's statistics, and a tiny end-to-end run with
the real toy preset, priors, training and sampling."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "toy_base.py"
sys.path.insert(0, str(REPO / "benchmarks"))

import toy_base  # noqa: E402
from comfusion.toy import world  # noqa: E402

SCENES = [world.PHOTO_SCENE, "in the snow", "on the grass"]


def _run(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=REPO)


def _renders(inst: world.Instance, n: int = 2) -> np.ndarray:
    return np.stack([np.stack([world.render(inst, s, 70_000 + i) for i in range(n)]) for s in SCENES])


def test_exact_split_separates_the_photo_scene_and_finds_the_instance():
    inst = toy_base.tq.held_out_instances(1)[0]
    own = toy_base.exact_split(_renders(inst), inst, SCENES)
    assert own["scene_photo"] == own["scene_other"] == 1.0  # the world's renders: every scene found
    assert own["inst_photo"] < 1.0 and own["inst_other"] < 1.0 and own["both_other"] == 1.0
    assert own["inst"] == pytest.approx((own["inst_photo"] + 2 * own["inst_other"]) / 3)
    other = world.make_instance(inst.seed + 7_777, inst.class_noun)
    far = toy_base.exact_split(_renders(other), inst, SCENES)
    assert far["inst_other"] > own["inst_other"] + 0.5


def test_prompt_kinds_name_the_identifier_and_the_colour():
    inst = toy_base.tq.held_out_instances(1)[0]
    assert toy_base.prompt_texts("sks", inst, SCENES)[1] == f"a sks {inst.class_noun} in the snow"
    assert toy_base.prompt_texts("sks+colour", inst, SCENES)[1] == f"a sks {inst.colour} {inst.class_noun} in the snow"
    assert toy_base.prompt_texts("colour", inst, SCENES)[1] == f"a {inst.colour} {inst.class_noun} in the snow"
    with pytest.raises(ValueError, match="unknown prompt kind"):
        toy_base.prompt_texts("nope", inst, SCENES)


def test_identifier_stats_on_the_untuned_toy_base():
    from comfusion.models import load_base

    base = load_base("toy")
    tok, te = base["tokenizer"], base["text_encoder"]
    row0 = te.get_input_embeddings().weight[tok.convert_tokens_to_ids("sks")].detach().clone()
    inst = toy_base.tq.held_out_instances(1)[0]
    stats = toy_base.identifier_stats(tok, te, row0, inst, SCENES)
    assert stats["emb_moved"] == 0.0
    assert -1.0 <= stats["cos_others"] <= 1.0 and -1.0 <= stats["cos_own"] <= 1.0
    moved = toy_base.identifier_stats(tok, te, row0 * 2, inst, SCENES)["emb_moved"]
    assert moved == pytest.approx(0.5, rel=1e-5)  # |r - 2r| / |2r|


def test_bad_input_is_refused_before_any_compute(tmp_path):
    proc = _run("--checkpoints", "0", "--out", str(tmp_path))
    assert proc.returncode == 2 and "--checkpoints must be >= 1" in proc.stderr
    proc = _run("--set", "train.lr=7", "--out", str(tmp_path))
    assert proc.returncode == 2 and "train.lr" in proc.stderr
    assert not (tmp_path / "tasks").exists()


def test_tiny_run_writes_tasks_and_the_table_and_resumes(tmp_path):
    args = ("--instances", "1", "--rows", "db", "unet_only", "--checkpoints", "2", "3", "--scenes", "1",
            "--images-per-scene", "1", "--priors", "2", "--out", str(tmp_path))
    proc = _run(*args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tasks = sorted(p.name for p in (tmp_path / "tasks").glob("*.json"))
    assert tasks == ["red-ball-100--db.json", "red-ball-100--refs.json", "red-ball-100--unet_only.json"]
    db = json.loads((tmp_path / "tasks" / "red-ball-100--db.json").read_text())
    assert [(r["step"], r["prompt"]) for r in db["records"]] == [(2, "sks"), (2, "sks+colour"), (3, "sks"),
                                                                (3, "sks+colour")]
    frozen = json.loads((tmp_path / "tasks" / "red-ball-100--unet_only.json").read_text())
    assert all(r["emb_moved"] == 0.0 for r in frozen["records"])  # text encoder frozen: the row stays
    assert all(r["emb_moved"] > 0.0 for r in db["records"])
    refs = json.loads((tmp_path / "tasks" / "red-ball-100--refs.json").read_text())["refs"]
    assert refs["real"]["inst"] < refs["other"]["inst"]
    # the autoencoder's floor and the base's redraw of the renders lie between the renders and another instance
    assert refs["real"]["inst"] < refs["vae"]["inst"] < refs["other"]["inst"]
    assert refs["redraw"]["inst"] < refs["other"]["inst"] and refs["redraw"]["scene_other"] == 1.0
    md = (tmp_path / "table.md").read_text()
    assert md.count("| UNet only (text encoder frozen) | 1 |") == 4 and "| Real Images" in md
    again = _run(*args)  # every task done: nothing trains again
    assert again.returncode == 0 and "sampling and scoring" not in again.stdout
    report = _run("--report-only", "--out", str(tmp_path))
    assert report.returncode == 0 and md in report.stdout


def test_runs_on_several_photos_are_kept_apart(tmp_path):
    args = ("--instances", "1", "--rows", "prior0_lr1e-4", "--checkpoints", "6", "--scenes", "1", "--prompts", "sks",
            "--images-per-scene", "1", "--priors", "2", "--out", str(tmp_path))
    for photos in ("1", "2"):
        proc = _run(*args, "--photos", photos)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one = json.loads((tmp_path / "tasks" / "red-ball-100--prior0_lr1e-4.json").read_text())
    two = json.loads((tmp_path / "tasks" / "red-ball-100--prior0_lr1e-4--p2.json").read_text())
    assert one["photos"] == 1 and two["photos"] == 2  # train.num_instance_images of the run
    assert one["terms"]["instance"] != two["terms"]["instance"]  # the second photo took part
    rows = [ln for ln in (tmp_path / "table.md").read_text().splitlines() if ln.startswith("| prior loss weight 0")]
    assert len(rows) == 2 and "2 photos | 1 | 6 |" in rows[1]
    bad = _run("--photos", "5", "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "--photos" in bad.stderr


def test_table_counts_instances_per_row_and_skips_prompts_not_sampled(tmp_path):
    rec = {"scene_other": 0.5, "inst": 2.0, "inst_photo": 1.0, "inst_other": 2.1, "inst_other|ok": 2.2,
           "both_other": 0.25, "scene_photo": 1.0, "emb_moved": 0.1, "cos_own": 0.9, "cos_others": 0.8}
    for sid, inst in (("a", 2.0), ("b", 4.0)):  # two instances of the db row, "sks" prompts only (--prompts sks)
        toy_base._write(tmp_path / f"{sid}--db.json", {"instance": sid, "row": "db", "train_seconds": 10.0,
                                                      "records": [{**rec, "inst": inst, "step": 5, "prompt": "sks"}]})
    md = toy_base.table(tmp_path)
    rows = [ln for ln in md.splitlines() if ln.startswith("| DreamBooth")]
    assert len(rows) == 1 and "| 2 | 5 | a sks [class] [scene] |" in rows[0]
    assert "| 3.000 |" in rows[0]  # inst dist, all: the mean over the two instances
    assert md.startswith("2 instances")
