"""Procedural photos of the demo subjects (the project ships no photos).

Each subject is a fixed object — a shape with a colour and a surface pattern that no caption
word names — drawn on a plain background from a few viewpoints (position, size, rotation).
"""
from __future__ import annotations

import argparse
import math
import random
from pathlib import Path

from PIL import Image, ImageDraw

DEMO_SUBJECTS = {
    # id: (shape, body colour, pattern colour, number of photos)
    "red-ball": ("ball", (200, 40, 40), (250, 220, 60), 2),
    "blue-cube": ("cube", (40, 70, 200), (240, 240, 240), 1),
}


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    corners = 4 if shape == "cube" else 48
    return [(cx + r * math.cos(angle + 2 * math.pi * k / corners), cy + r * math.sin(angle + 2 * math.pi * k / corners))
            for k in range(corners)]


def render_subject(shape: str, body, pattern, view: int, size: int = 128) -> Image.Image:
    rng = random.Random(view)
    img = Image.new("RGB", (size, size), (235, 232, 225))
    draw = ImageDraw.Draw(img)
    cx, cy = size * (0.45 + 0.1 * rng.random()), size * (0.45 + 0.1 * rng.random())
    r = size * (0.28 + 0.05 * rng.random())
    angle = rng.random() * math.pi / 2
    draw.polygon(_polygon(shape, cx, cy, r, angle), fill=body)
    # the instance's own marks: three dots at fixed places on the body
    for k in range(3):
        a = angle + 2.1 * k
        px, py = cx + 0.45 * r * math.cos(a), cy + 0.45 * r * math.sin(a)
        draw.ellipse([px - r * 0.12, py - r * 0.12, px + r * 0.12, py + r * 0.12], fill=pattern)
    return img


def write_demo_subjects(folder: str | Path, size: int = 128) -> dict[str, list[Path]]:
    """Write <folder>/<id>/<nn>.png for every demo subject; returns the paths."""
    out: dict[str, list[Path]] = {}
    for sid, (shape, body, pattern, n) in DEMO_SUBJECTS.items():
        (Path(folder) / sid).mkdir(parents=True, exist_ok=True)
        out[sid] = []
        for view in range(n):
            p = Path(folder) / sid / f"{view:02d}.png"
            render_subject(shape, body, pattern, view, size).save(p)
            out[sid].append(p)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Render the demo subjects' photos.")
    ap.add_argument("folder", help="output folder (one subfolder per subject)")
    ap.add_argument("--size", type=int, default=128)
    a = ap.parse_args()
    for sid, paths in write_demo_subjects(a.folder, a.size).items():
        print(f"{sid}: {len(paths)} photos in {Path(a.folder) / sid}")
