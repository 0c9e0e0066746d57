"""The evaluation report: every score as CSV, the paper's table layout in Markdown, a bar chart.

Rows of the CSV (`COLUMNS`): one per (subject, method, prompt set, prompt, judge, metric). A
row with prompt `ALL` is the subject's score over all images of the set; the "Real Images"
rows have method `Real Images` and prompt set `real`. The tables follow Tables 1 and 3 of
the paper: rows Real Images and each method, columns DINO, CLIP-I, CLIP-T, each the mean over
subjects of the per-subject `ALL` scores; one table per prompt set and CLIP judge.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

COLUMNS = ("subject", "method", "prompt_set", "prompt", "scene", "judge", "metric", "value")
ALL = "ALL"  # the prompt of a subject-level row
REAL = "Real Images"  # the method of the real-images rows
REAL_SET = "real"  # their prompt set
DISPLAY = {"comfusion": "ComFusion", "dreambooth": "DreamBooth"}
SET_TITLES = {"specific": "specific scenes (the paper's Table 1 / Table 3 protocol)",
              "unseen": "unseen scenes, the 25 DreamBooth prompts (supplement E, Table 1)"}
CSV_FILE, TABLE_FILE, CHART_FILE = "scores.csv", "table.md", "scores.png"


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
