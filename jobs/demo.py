"""`make demo`: the most complete path that exists, on the built-in default (CPU, tiny preset).

Renders the demo subjects' photos, validates them, and samples one image per subject and
scene with the shared sampler into demo_out/.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    ap.add_argument("--out", default=str(REPO / "demo_out"))
    ap.add_argument("--stop", action="store_true", help="stop what the demo started")
    args = ap.parse_args(argv)
    if args.stop:
        print("nothing to stop")
        return 0

    from comfusion.config import load_config
    from comfusion.data import format_subject_errors, validate_subjects
    from comfusion.models import load_base
    from comfusion.prompts import instance_scene_text
    from comfusion.sampling import image_grid, sample, to_pil
    from jobs.demo_subjects import write_demo_subjects

    photos = REPO / "storage" / "demo_subjects"
    write_demo_subjects(photos)
    cfg = load_config(args.config, [f"data.root={photos}", f"job.storage={REPO / 'storage'}"])
    subjects, errors = validate_subjects(cfg.data.subjects, cfg.data, cfg.model.resolution)
    if errors:
        print(format_subject_errors(errors), file=sys.stderr)
        return 1
    parts = load_base(cfg.model.base, seed=cfg.model.preset_seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for s in subjects:
        prompts = [instance_scene_text(s.identifier, s.class_noun, sc) for sc in s.scenes]
        res = sample(parts, prompts, list(range(len(prompts))), steps=cfg.sampler.steps,
                     guidance_scale=cfg.sampler.guidance_scale)
        path = out / f"{s.id}.png"
        to_pil(image_grid(res.images)).save(path)
        print(f"{s.id}: {len(prompts)} scenes -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
