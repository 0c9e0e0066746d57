"""What an evaluation produces: scores, the report files, sample grids, and their MLflow logging.

Rows of the CSV (`COLUMNS`): one per (subject, method, prompt set, prompt, judge, metric). A
row with prompt `ALL` is the subject's score over all images of the set; the "Real Images"
rows have method `Real Images` and prompt set `real`. The tables follow Tables 1 and 3 of
the paper: rows Real Images and each method, columns DINO, CLIP-I, CLIP-T, each the mean over
subjects of the per-subject `ALL` scores; one table per prompt set and CLIP judge.

MLflow keys in a subject's run: `eval/dino`, `eval/clip_i`, `eval/clip_t` (first prompt set,
first CLIP judge), `eval/<judge-slug>/clip_i` for other judges, `eval/<set>/...` for other sets,
`eval/clip_t/<scene-slug>` per scene; the grid of each set as `eval/<set>.png`.
"""
from __future__ import annotations

import csv
import io
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from comfusion.config import JobConfig, flatten
from comfusion.data import load_image
from comfusion.metrics import EvalPrompt, ImageEmbeddings, Scorer, image_scores, real_images_scores, slug
from comfusion.sampling import default_device, image_grid
from jobs.eval_targets import Target

COLUMNS = ("subject", "method", "prompt_set", "prompt", "scene", "judge", "metric", "value")
ALL = "ALL"  # the prompt of a subject-level row
REAL = "Real Images"  # the method of the real-images rows
REAL_SET = "real"  # their prompt set
DISPLAY = {"comfusion": "ComFusion", "dreambooth": "DreamBooth"}
SET_TITLES = {"specific": "specific scenes (the paper's Table 1 / Table 3 protocol)",
              "unseen": "unseen scenes, the 25 DreamBooth prompts (supplement E, Table 1)"}
CSV_FILE, TABLE_FILE, CHART_FILE = "scores.csv", "table.md", "scores.png"
GRID_IMAGES = 4  # images per prompt in the sample grids


@dataclass(frozen=True)
class TableRow:
    label: str  # method (or Real Images)
    dino: float
    clip_i: float
    clip_t: float  # NaN for Real Images
    subjects: int  # how many subjects the means are over


@dataclass(frozen=True)
class Table:
    prompt_set: str
    dino_judge: str
    clip_judge: str
    rows: tuple[TableRow, ...]


# ---------------------------------------------------------------------------------------
# scores


@dataclass
class Generated:
    """What came back for one target, in (prompt set, prompt index, image index) order."""

    keys: list[tuple[str, int, int]] = field(default_factory=list)
    embeddings: ImageEmbeddings | None = None
    thumbs: dict[tuple[str, int, int], bytes] = field(default_factory=dict)


def _row(subject: str, method: str, prompt_set: str, prompt: str, scene: str, score) -> dict:
    """One CSV row (a dict with the `COLUMNS` keys) from a `metrics.Score`."""
    return dict(subject=subject, method=method, prompt_set=prompt_set, prompt=prompt, scene=scene,
                judge=score.judge, metric=score.metric, value=score.value)


def score_target(target: Target, plan: list[EvalPrompt], gen: Generated, real: ImageEmbeddings,
                 texts: dict[str, dict[str, torch.Tensor]], dino_judge: str) -> list[dict]:
    """Per-prompt and per-set (`ALL`) scores of one target. `texts`: CLIP-T text -> judge -> (1, P)."""
    by_key = {(p.prompt_set, p.index): p for p in plan}
    prompts = [by_key[(s, i)] for s, i, _ in gen.keys]  # the prompt of each image
    rows = []
    for prompt_set in dict.fromkeys(p.prompt_set for p in plan):
        for p in [p for p in plan if p.prompt_set == prompt_set]:
            idx = [k for k, q in enumerate(prompts) if q is p]
            for sc in image_scores(gen.embeddings.select(idx), real, texts[p.text], dino_judge):
                rows.append(_row(target.subject, target.method, prompt_set, p.prompt, p.scene, sc))
        idx = [k for k, q in enumerate(prompts) if q.prompt_set == prompt_set]
        per_image = {j: torch.cat([texts[prompts[k].text][j] for k in idx]) for j in real.clip}  # (N, P)
        rows += [_row(target.subject, target.method, prompt_set, ALL, "", sc)
                 for sc in image_scores(gen.embeddings.select(idx), real, per_image, dino_judge)]
    return rows


def embed_references(cfg: JobConfig, targets: list[Target], plans: list[list[EvalPrompt]],
                     progress: Callable[[str], None] | None = print) -> tuple[dict, dict, list[dict]]:
    """Real-photo embeddings per subject, CLIP text embeddings per CLIP-T text, and the Real Images rows."""
    device = default_device()
    scorer = Scorer.load(cfg.eval.dino, cfg.eval.clip_judges, seed=cfg.model.preset_seed, device=device,
                         batch_size=cfg.eval.batch_size, heldout_dino=cfg.eval.heldout_dino)
    real, rows = {}, []
    for t in targets:
        if t.subject in real:
            continue
        photos = [np.asarray(load_image(p, min_side=1, max_pixels=cfg.data.max_pixels)) for p in t.photos]
        real[t.subject] = scorer.embed_images(photos)
        ri = real_images_scores(real[t.subject], scorer.dino_name)
        if ri.reason and progress:
            progress(f"{t.subject}: no Real Images score: {ri.reason}")
        rows += [_row(t.subject, REAL, REAL_SET, ALL, "", sc) for sc in ri.scores if math.isfinite(sc.value)]
    texts_list = sorted({p.text for plan in plans for p in plan})
    emb = scorer.embed_texts(texts_list)
    texts = {text: {j: emb[j][i:i + 1] for j in emb} for i, text in enumerate(texts_list)}
    del scorer
    if device == "cuda":
        torch.cuda.empty_cache()  # the actors may share this GPU
    return real, texts, rows


# ---------------------------------------------------------------------------------------
# grids and MLflow


def sample_grids(targets: list[Target], plans: list[list[EvalPrompt]], generated: dict[int, Generated],
                 out: Path) -> dict[int, dict[str, Path]]:
    """One PNG per (target, prompt set): a row per prompt, its first GRID_IMAGES images."""
    grids: dict[int, dict[str, Path]] = defaultdict(dict)
    for t, (target, plan) in enumerate(zip(targets, plans)):
        gen = generated.get(t)
        for prompt_set in dict.fromkeys(p.prompt_set for p in plan):
            rows = [[np.asarray(Image.open(io.BytesIO(gen.thumbs[(prompt_set, p.index, j)])))
                     for j in range(GRID_IMAGES) if (prompt_set, p.index, j) in gen.thumbs]
                    for p in plan if p.prompt_set == prompt_set] if gen else []
            cols = max((len(r) for r in rows), default=0)
            if not cols:
                continue
            blank = np.zeros_like(rows[0][0])
            tiles = np.stack([im for r in rows for im in r + [blank] * (cols - len(r))])
            path = out / "grids" / f"{slug(target.subject)}--{slug(target.method)}--{prompt_set}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image_grid(tiles, cols)).save(path)
            grids[t][prompt_set] = path
    return grids


def judge_slug(name: str) -> str:
    """'openai/clip-vit-large-patch14' -> 'clip-vit-large-patch14' (a metric-key part)."""
    return slug(Path(name.rstrip("/")).name or name)


def metric_key(row: dict, first_set: str, first_clip: str) -> str | None:
    """The MLflow key of a score row, or None for rows not logged as run metrics (per-prompt DINO / CLIP-I).

    eval/dino, eval/clip_i, eval/clip_t: first prompt set, first CLIP judge; other judges
    eval/<judge-slug>/clip_i; other sets eval/<set>/...; per scene eval/clip_t/<scene-slug>.
    """
    parts = ["eval"] + ([row["prompt_set"]] if row["prompt_set"] != first_set else [])
    if row["metric"] != "dino" and row["judge"] != first_clip:
        parts.append(judge_slug(row["judge"]))
    parts.append(row["metric"])
    if row["prompt"] != ALL:
        if row["metric"] != "clip_t":
            return None
        parts.append(slug(row["scene"]))
    return "/".join(parts)


def log_to_subject_runs(client, cfg: JobConfig, targets: list[Target], rows: list[dict],
                        grids: dict[int, dict[str, Path]]) -> int:
    """`eval/...` metrics and the sample grids into each target's own run; returns runs logged."""
    from mlflow.entities import Metric  # noqa: PLC0415

    now, logged = int(time.time() * 1000), 0
    for t, target in enumerate(targets):
        if target.run_id is None:
            continue
        mine = [r for r in rows if r["subject"] == target.subject and r["method"] == target.method]
        keys = {metric_key(r, cfg.eval.prompt_sets[0], cfg.eval.clip_judges[0]): r["value"] for r in mine}
        metrics = [Metric(k, float(v), now, 0) for k, v in keys.items() if k and math.isfinite(v)]
        for k in range(0, len(metrics), 500):  # MLflow's batch limit is 1000 metrics
            client.log_batch(target.run_id, metrics=metrics[k:k + 500])
        for prompt_set, path in grids.get(t, {}).items():
            client.log_image(target.run_id, np.asarray(Image.open(path)), artifact_file=f"eval/{prompt_set}.png")
        logged += 1
    return logged


def log_evaluation_run(client, cfg: JobConfig, rows: list[dict], paths: dict, out: Path,
                       methods: list[str]) -> str:
    """An `evaluation` run in experiment `job.name`: the eval settings, the table cells, the report files."""
    from mlflow.entities import Metric, Param  # noqa: PLC0415

    from jobs.tracking import experiment_id  # noqa: PLC0415

    exp_id = experiment_id(client, cfg.job.name, cfg.job.storage)
    run = client.create_run(exp_id, run_name="evaluation", tags={"kind": "evaluation"})
    rid, now = run.info.run_id, int(time.time() * 1000)
    params = [Param(k, str(v)[:500]) for k, v in flatten(cfg).items() if k.split(".")[0] in ("eval", "sampler", "model")]
    metrics = [Metric(f"{t.prompt_set}/{judge_slug(t.clip_judge)}/{slug(r.label)}/{name}", v, now, 0)
               for t in summary_tables(rows, methods) for r in t.rows
               for name, v in (("dino", r.dino), ("clip_i", r.clip_i), ("clip_t", r.clip_t)) if math.isfinite(v)]
    client.log_batch(rid, metrics=metrics[:1000], params=params[:100])
    for path in paths.values():
        client.log_artifact(rid, str(path))
    if (out / "grids").is_dir():
        client.log_artifacts(rid, str(out / "grids"), "grids")
    client.set_terminated(rid)
    return rid


# ---------------------------------------------------------------------------------------
# the report files


def write_csv(rows: list[dict], path: str | Path) -> Path:
    """Every score, one line each, columns `COLUMNS`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: r[k] for k in COLUMNS} for r in rows)
    return path


def read_csv(path: str | Path) -> list[dict]:
    """The rows `write_csv` wrote, with `value` as a float."""
    with open(path, newline="") as f:
        return [{**r, "value": float(r["value"])} for r in csv.DictReader(f)]


def _mean(values: list[float]) -> tuple[float, int]:
    """Mean of the finite values and how many there were (NaN, 0 when none)."""
    finite = [v for v in values if math.isfinite(v)]
    return (sum(finite) / len(finite), len(finite)) if finite else (math.nan, 0)


def _cell(rows: list[dict], prompt_set: str, method: str, judge: str, metric: str) -> tuple[float, int]:
    """Mean over subjects of the subject-level score, and how many subjects it is over."""
    return _mean([r["value"] for r in rows if r["prompt_set"] == prompt_set and r["method"] == method
                  and r["judge"] == judge and r["metric"] == metric and r["prompt"] == ALL])


def summary_tables(rows: list[dict], methods: list[str] | None = None) -> list[Table]:
    """One table per (prompt set, CLIP judge), rows Real Images then the methods in order."""
    sets = list(dict.fromkeys(r["prompt_set"] for r in rows if r["method"] != REAL))
    methods = methods or list(dict.fromkeys(r["method"] for r in rows if r["method"] != REAL))
    dino_judge = next((r["judge"] for r in rows if r["metric"] == "dino"), "")
    clip_judges = list(dict.fromkeys(r["judge"] for r in rows if r["metric"] in ("clip_i", "clip_t")))
    tables = []
    for prompt_set in sets:
        for clip in clip_judges:
            out = []
            for label, s in [(REAL, REAL_SET)] + [(m, prompt_set) for m in methods]:
                (dino, n), (clip_i, _), (clip_t, _) = (_cell(rows, s, label, dino_judge, "dino"),
                                                       _cell(rows, s, label, clip, "clip_i"),
                                                       _cell(rows, s, label, clip, "clip_t"))
                if n or label != REAL:
                    out.append(TableRow(label, dino, clip_i, clip_t, n))
            tables.append(Table(prompt_set, dino_judge, clip, tuple(out)))
    return tables


def _fmt(v: float) -> str:
    """A table cell: 3 decimals, as the paper prints, or N/A."""
    return "N/A" if not math.isfinite(v) else f"{v:.3f}"


def markdown(tables: list[Table]) -> str:
    """The tables in the layout of the paper's Tables 1 and 3 (raw cosines, 3 decimals)."""
    parts = []
    for t in tables:
        parts.append(f"### {SET_TITLES.get(t.prompt_set, t.prompt_set)}\n\n"
                     f"DINO judge `{t.dino_judge}`, CLIP judge `{t.clip_judge}`; means over subjects.\n\n"
                     "| Methods | DINO (↑) | CLIP-I (↑) | CLIP-T (↑) | subjects |\n|---|---|---|---|---|")
        parts += [f"| {DISPLAY.get(r.label, r.label)} | {_fmt(r.dino)} | {_fmt(r.clip_i)} | {_fmt(r.clip_t)} "
                  f"| {r.subjects} |" for r in t.rows]
        parts.append("")
    return "\n".join(parts)


def bar_chart(tables: list[Table], path: str | Path) -> Path:
    """Grouped bars per table: DINO, CLIP-I, CLIP-T with the methods side by side."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(len(tables), 1, figsize=(8, 3.2 * len(tables)), squeeze=False)
    for ax, t in zip(axes[:, 0], tables):
        width = 0.8 / max(1, len(t.rows))
        for k, r in enumerate(t.rows):
            values = [v if math.isfinite(v) else 0.0 for v in (r.dino, r.clip_i, r.clip_t)]
            ax.bar([i + (k - (len(t.rows) - 1) / 2) * width for i in range(3)], values, width,
                   label=DISPLAY.get(r.label, r.label))
        ax.set_xticks(range(3), ["DINO", "CLIP-I", "CLIP-T"])
        ax.set_ylabel("cosine")
        ax.set_title(f"{t.prompt_set}: {t.dino_judge} / {t.clip_judge}", fontsize=9)
        ax.axhline(0, color="black", linewidth=0.5)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(rows: list[dict], out: str | Path, methods: list[str] | None = None) -> tuple[dict, str]:
    """scores.csv, table.md and scores.png in `out`; returns ({kind: path}, the Markdown)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tables = summary_tables(rows, methods)
    text = markdown(tables)
    (out / TABLE_FILE).write_text(text)
    paths = {"csv": write_csv(rows, out / CSV_FILE), "table": out / TABLE_FILE,
             "chart": bar_chart(tables, out / CHART_FILE)}
    return paths, text
