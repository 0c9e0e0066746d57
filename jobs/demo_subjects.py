"""Photos of the demo subjects (the project ships no photos): instances of the toy world.

Each subject is one fixed object of `comfusion.toy.world` (a class noun, a named colour, and a
pattern and marks that no caption word names), photographed from a few views on the world's
one photo background, "in the room", at the toy model's 32x32. The instance seeds are in the
held-out range, so the pretrained `toy` model never saw these objects: only their photos can
teach them, and `world.instance_distance` / `world.scene_of` judge what the app draws.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from comfusion.toy import world

DEMO_SUBJECTS = {
    # id: (instance seed, class noun, number of photos); the id names the colour the seed gives
    "yellow-ball": (world.HELD_OUT_SEED_START + 1, "ball", 3),  # light dots, one black mark
    "blue-box": (world.HELD_OUT_SEED_START + 7, "box", 3),  # light checks, one black mark
}


def demo_instance(subject_id: str) -> world.Instance:
    """The toy-world instance a demo subject's photos show."""
    seed, class_noun, _ = DEMO_SUBJECTS[subject_id]
    return world.make_instance(seed, class_noun)


def write_demo_subjects(folder: str | Path, size: int = world.DEFAULT_SIZE) -> dict[str, list[Path]]:
    """Write <folder>/<id>/<nn>.png (size x size) for every demo subject; returns the paths."""
    out: dict[str, list[Path]] = {}
    for sid, (_, _, n) in DEMO_SUBJECTS.items():
        instance = demo_instance(sid)
        (Path(folder) / sid).mkdir(parents=True, exist_ok=True)
        out[sid] = []
        for i, pixels in enumerate(world.instance_photos(instance, n, size)):
            p = Path(folder) / sid / f"{i:02d}.png"
            Image.fromarray(pixels).save(p)
            out[sid].append(p)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Write the demo subjects' photos (toy-world instances "
                                             "'in the room'), one subfolder per subject.")
    ap.add_argument("folder", help="output folder (one subfolder per subject)")
    ap.add_argument("--size", type=int, default=world.DEFAULT_SIZE,
                    help="photo side in pixels (default: the toy model's %(default)s)")
    a = ap.parse_args()
    for sid, paths in write_demo_subjects(a.folder, a.size).items():
        print(f"{sid}: {len(paths)} photos in {Path(a.folder) / sid}")
