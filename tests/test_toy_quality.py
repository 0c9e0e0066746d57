"""benchmarks/toy_quality.py end to end at a tiny size (issue 8): real toy preset, real priors
cache, real training and sampling in two worker processes, toy judges and exact judges."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "toy_quality.py"
HELDOUT = (REPO / "comfusion" / "presets" / "toy-heldout" / "dino").is_dir()
COLUMNS = ["DINO (train)", "DINO (held-out)", "CLIP-I (held-out)", "CLIP-T (held-out)", "scene (exact)",
           "inst dist (exact)", "inst dist, scene ok", "both (exact)", "DINO vs photos (old)"]


def _run(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy_quality")
    proc = _run("--instances", "2", "--steps", "3", "--scenes", "2", "--images-per-scene", "2", "--priors", "4",
                "--variants", "dreambooth", "comfusion", "no_fi", "--workers", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def _table(md: str) -> dict[str, dict[str, str]]:
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[1:10] == COLUMNS
    rows = {}
    for ln in lines[2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header[1:], cells[1:]))
    return rows


def test_prints_the_table_one_row_per_method_plus_references(tiny_run):
    out, stdout = tiny_run
    rows = _table((out / "table.md").read_text())
    assert list(rows) == ["Real Images", "Base, colour named", "DreamBooth", "ComFusion (tau=3)", "w/o L_F^I"]
    assert "| DreamBooth |" in stdout  # printed, not only written
    for label, cells in rows.items():
        for col in ("DINO (train)", "DINO vs photos (old)"):
            assert -1.0 <= float(cells[col]) <= 1.0, (label, col)
        for col in ("DINO (held-out)", "CLIP-I (held-out)", "CLIP-T (held-out)"):  # once toy-heldout is committed
            assert (-1.0 <= float(cells[col]) <= 1.0) if HELDOUT else cells[col] == "nan", (label, col)
        for col in ("scene (exact)", "both (exact)"):
            assert 0.0 <= float(cells[col]) <= 1.0, (label, col)
        assert float(cells["inst dist (exact)"]) >= 0.0
    # the world's own renders are the ceiling: the exact judges find the asked scene and the instance
    assert float(rows["Real Images"]["scene (exact)"]) == 1.0
    assert float(rows["Real Images"]["inst dist (exact)"]) < 1.0
    assert rows["DreamBooth"]["train s (x DB)"].endswith("(1.00)")


def test_writes_per_instance_csv_samples_and_json(tiny_run):
    out, _ = tiny_run
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 5  # 2 instances x (real, base, 3 methods)
    assert len({r["instance"] for r in rows}) == 2
    trained = [r for r in rows if r["row"] in ("dreambooth", "comfusion", "no_fi")]
    assert all(float(r["train_seconds"]) > 0 for r in trained)
    fusion = [r for r in rows if r["row"] == "comfusion"]
    assert all(float(r["loss_fusion_instance"]) != 0.0 and float(r["loss_fusion_scene"]) != 0.0 for r in fusion)
    assert all(float(r["loss_fusion_instance"]) == 0.0 for r in rows if r["row"] == "no_fi")
    grid = Image.open(out / "samples.png")
    assert grid.size == (160 + 2 * 32 * 2, 5 * 32 * 2)  # labels, then scenes x rows of 32 px pictures at 2x
    res = json.loads((out / "results.json").read_text())
    assert res["rows"] == ["real", "base", "dreambooth", "comfusion", "no_fi"]
    assert res["config"]["model"]["base"] == "toy" and res["config"]["train"]["steps"] == 3
    photos = sorted((out / "photos").rglob("*.png"))
    assert len(photos) == 2 * 4 and Image.open(photos[0]).size == (32, 32)


def test_bad_input_is_refused_before_any_work(tmp_path):
    proc = _run("--variants", "dreambooth", "nope", "--out", str(tmp_path / "a"))
    assert proc.returncode == 2 and "nope" in proc.stderr
    proc = _run("--set", "data.scenes=[in the basket]", "--out", str(tmp_path / "b"))
    assert proc.returncode == 2 and "data.scenes" in proc.stderr and "in the basket" in proc.stderr
    assert not (tmp_path / "b").exists()
    proc = _run("--instances", "0", "--out", str(tmp_path / "c"))
    assert proc.returncode == 2 and "--instances" in proc.stderr
    proc = _run("--photos", "5", "--out", str(tmp_path / "d"))
    assert proc.returncode == 2 and "--photos" in proc.stderr and not (tmp_path / "d").exists()


def test_study_runs_in_pieces_resumes_and_reports_intervals(tmp_path):
    out = tmp_path / "study"
    small = ["--study", "--instances", "2", "--seeds", "0", "--lrs", "2e-4", "1e-4", "--steps", "2", "--every", "1",
             "--scenes", "2", "--images-per-scene", "1", "--priors", "4", "--workers", "1", "--judges", "toy",
             "--set", "train.grad_norm_every=1", "--guidance", "7.5", "3", "--photos", "2", "--out", str(out)]
    first = _run(*small, "--piece", "1/2")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    tasks = out / "study" / "tasks"
    n_first = len(list(tasks.glob("*.json")))
    assert n_first == 6  # (2 instances x (real, base) + 2 x 2 lrs x 2 rows) / 2
    second = _run(*small, "--piece", "2/2")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert len(list(tasks.glob("*.json"))) == 12 and len(list(tasks.glob("*.npz"))) == 12
    trained = [json.loads(p.read_text()) for p in tasks.glob("*-seed0.json")]
    assert len(trained) == 8 and {t["photos"] for t in trained} == {2}  # each run trained on 2 room photos
    again = _run(*small)  # everything done: nothing is trained again
    assert again.returncode == 0 and "0 still to run" in again.stdout
    table = (out / "study" / "table.md").read_text()
    assert "### lr 0.0001, guidance 7.5, step 1" in table and "### lr 0.0002, guidance 7.5, step 2" in table
    comfusion = [ln for ln in table.splitlines() if ln.startswith("| ComFusion (tau=3) | 2 |")]
    # 2 lrs x 2 checkpoints at guidance 7.5, and the last checkpoint of each lr at guidance 3
    assert len(comfusion) == 6 and "[" in comfusion[0]  # a difference to DreamBooth with its interval
    frontier = table.split("### at equal instance fidelity")[1].split("###")[0]
    assert frontier.count("| ComFusion (tau=3) | ") == 1 and ("points)" in frontier or "no overlap" in frontier)
    assert Image.open(out / "study" / "tradeoff.png").size[0] > 500
    norms = table.split("### gradient norm")[1].split("###")[0].splitlines()
    norms = [ln for ln in norms if ln.startswith("| ComFusion (tau=3)")]
    assert len(norms) == 2 and all(float(c) > 0 for c in norms[0].strip("|").split("|")[2:])  # every term, each lr
    with open(out / "study" / "records.csv") as f:
        records = list(csv.DictReader(f))
    assert {r["step"] for r in records if r["row"] == "comfusion"} == {"1", "2"}
    # the second guidance is sampled at the last checkpoint only (the guidance lever, not a curve)
    assert {r["step"] for r in records if r["row"] == "comfusion" and r["guidance"] == "3.0"} == {"2"}
    assert "### lr 0.0002, guidance 3, step 2" in table and "guidance 3, step 1" not in table
    speed = [ln for ln in table.split("### training speed")[1].splitlines() if ln.startswith("| ComFusion (tau=3)")]
    vs_base = table.split("against Base, colour named")[1].split("###")[0]
    assert vs_base.count("| ComFusion (tau=3) | ") == 4 and "| 0.0001, 2, 3 |" in vs_base  # 2 lrs x 2 guidances
    assert len(speed) == 2 and float(speed[0].split("|")[4]) > 0  # seconds per step, each lr
    other = _run(*small, "--report-only", "--baseline", "comfusion")  # every row against another baseline row
    assert other.returncode == 0, other.stdout[-3000:] + other.stderr[-3000:]
    table = (out / "study" / "table.md").read_text()
    assert "difference to ComFusion (tau=3) [" in table
    assert any(ln.startswith("| DreamBooth | 2 |") and "[" in ln for ln in table.splitlines())
    bad = _run("--study", "--piece", "3/2", "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "--piece" in bad.stderr


def test_queue_claims_a_task_once_and_takes_over_a_dead_owners_claim(tmp_path):
    sys.path.insert(0, str(SCRIPT.parent))
    import toy_quality  # noqa: PLC0415

    task = toy_quality.Task("train", {}, "ball", out_file=str(tmp_path / "t.json"))
    claim = tmp_path / "t.claim"
    assert toy_quality._claim(task) and claim.read_text() == str(os.getpid())
    assert not toy_quality._claim(task)  # held by a live process (this one)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    claim.write_text(dead.stdout.strip())  # a finished process's pid
    assert toy_quality._claim(task) and claim.read_text() == str(os.getpid())


def _toy_quality():
    sys.path.insert(0, str(SCRIPT.parent))
    import toy_quality  # noqa: PLC0415

    return toy_quality


def _records(row: str, points: dict[int, tuple[float, float]], n_inst: int = 4) -> list[dict]:
    """Synthetic study records: at each step, every instance has the same (inst dist, scene)."""
    return [{"row": row, "instance_seed": i, "seed": 0, "lr": 1e-4, "step": step, "guidance": 7.5,
             "inst": x, "scene": y} for step, (x, y) in points.items() for i in range(n_inst)]


def test_comfusion_at_prior_weight_0_1_is_paired_with_dreambooth_at_0_1():
    tq = _toy_quality()
    assert tq.dreambooth_twin("cs0.1") == "db_cs0.1" and tq.dreambooth_twin("cs0.3") == "db_cs0.3"
    assert tq.dreambooth_twin("comfusion") == "dreambooth" and tq.dreambooth_twin("db_cs0.1") is None
    rows = ["dreambooth", "db_cs0.1", "comfusion", "cs0.1"]
    comparisons = tq.frontier_comparisons(rows)
    assert ("cs0.1", ("db_cs0.1",)) in comparisons and ("cs0.1", ("dreambooth",)) in comparisons
    assert ("comfusion", ("db_cs0.1",)) not in comparisons  # against the baseline and its own twin only
    # DreamBooth 1: scene 0.5 at distance 2 -> 0.7 at 1; DreamBooth 0.1: 0.6 at 2 -> 0.8 at 1;
    # ComFusion 0.1 0.1 above DreamBooth 0.1 everywhere, 0.2 above DreamBooth 1
    records = (_records("dreambooth", {50: (2.0, 0.5), 150: (1.0, 0.7)})
               + _records("db_cs0.1", {50: (2.0, 0.6), 150: (1.0, 0.8)})
               + _records("cs0.1", {50: (1.8, 0.74), 150: (1.2, 0.86)}))
    table = tq.study_table(records, 1e-4, 150, 7.5, ["db_cs0.1", "cs0.1"], baseline="db_cs0.1")
    line = next(ln for ln in table.splitlines() if ln.startswith("| ComFusion, lambda_C^S 0.1 |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1] == "4" and cells[2].startswith("0.860 (+0.060 [+0.060, +0.060])")  # scene vs DreamBooth 0.1
    assert cells[3].startswith("1.200 (+0.200 [+0.200, +0.200])")  # instance distance
    frontier = tq.frontier_table(records, [("cs0.1", ("db_cs0.1",)), ("cs0.1", ("dreambooth",))], 7.5)
    lines = frontier.splitlines()[2:]
    gaps = [ln.split("|")[3].strip() for ln in lines]
    assert gaps[0].startswith("+0.100 [+0.100, +0.100] (2 of 2 points)")  # above DreamBooth 0.1's line
    assert gaps[1].startswith("+0.200 [+0.200, +0.200] (2 of 2 points)")
    assert "DreamBooth, lambda prior 0.1" in lines[0] and "| DreamBooth |" in lines[1]
    # a study without the prior-weight-1 DreamBooth row: only the twin pairing, and no crash on a missing row
    assert tq.frontier_comparisons(["db_cs0.1", "cs0.1"]) == [("cs0.1", ("db_cs0.1",))]
    missing = tq.frontier_table(records, [("cs0.1", ("db_cs0.3",))], 7.5)
    assert "no instance in common" in missing.splitlines()[2]


def test_lever_rows_at_prior_weight_0_1_pair_with_the_dreambooth_row_of_their_prior_weight():
    tq = _toy_quality()
    # the fusion stream (backprop, fusion weights) is no DreamBooth setting: those rows pair with db_cs0.1
    assert tq.dreambooth_twin("cs0.1_last") == "db_cs0.1" and tq.dreambooth_twin("cs0.1_fw0.03") == "db_cs0.1"
    assert tq.dreambooth_twin("cs0.1_frozen_text") == "db_cs0.1_frozen_text" and tq.dreambooth_twin("cs0") == "db_cs0"
    assert tq.dreambooth_twin("backprop_last") == "dreambooth" and tq.dreambooth_twin("frozen_text") == "db_frozen_text"
    assert tq.dreambooth_twin("db_cs0") is None
    assert tq.OVERRIDES["cs0"]["loss.lambda_class_scene"] == 0.0 and tq.OVERRIDES["db_cs0"]["method"] == "dreambooth"
    rows = ["db_cs0.1", "cs0.1", "cs0.1_last", "db_cs0", "cs0", "cs0.1_frozen_text"]
    comparisons = tq.frontier_comparisons(rows, baseline="db_cs0.1")
    assert [c for c in comparisons if c[0] == "cs0"] == [("cs0", ("db_cs0.1",)), ("cs0", ("db_cs0",))]
    assert [c for c in comparisons if c[0] == "cs0.1_last"] == [("cs0.1_last", ("db_cs0.1",))]
    assert ("cs0.1_frozen_text", ("db_cs0.1_frozen_text",)) not in comparisons  # its twin did not run
    assert ("db_cs0", ("db_cs0.1",)) in comparisons and all(c[0] != "db_cs0.1" for c in comparisons)
    records = [{"row": row, "instance_seed": i, "seed": 0, "lr": 1e-4, "step": step, "guidance": 7.5,
                "train_seconds": s * (1 + i)} for row, s in (("cs0.1", 30.0), ("cs0.1_last", 15.0)) for i in range(3)
               for step in (50, 150)]  # one task per (row, instance, seed), a record per checkpoint
    lines = tq.train_speed_table(records, ["cs0.1", "cs0.1_last"]).splitlines()[2:]
    assert [ln.split("|")[3].strip() for ln in lines] == ["3", "3"]  # tasks, not checkpoints
    cells = [[float(c) for c in ln.split("|")[4:7]] for ln in lines]
    assert cells == [[0.4, 0.4, 0.2], [0.2, 0.2, 0.1]]  # seconds / 150 steps: mean, median, min


def test_last_checkpoints_against_the_untuned_model_told_the_colour():
    tq = _toy_quality()
    base = [{"row": tq.BASE, "instance_seed": i, "seed": None, "lr": None, "step": 0, "guidance": 7.5,
             "inst": 1.5, "scene": 1.0} for i in range(4)]
    rows = _records("cs0", {50: (2.0, 0.8), 150: (1.2, 0.7)})
    rows += [{**r, "guidance": 3.0, "inst": 1.0} for r in rows if r["step"] == 150]
    lines = tq.against_base_table(base + rows, ["cs0"], 7.5).splitlines()[2:]
    assert [ln.split("|")[2].strip() for ln in lines] == ["0.0001, 150, 7.5", "0.0001, 150, 3"]  # last step only
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    assert cells[0][2].startswith("0.700 (-0.300 [-0.300, -0.300])")  # scene against the base's 1.0
    assert cells[0][3].startswith("1.200 (-0.300") and cells[1][3].startswith("1.000 (-0.500")  # closer
