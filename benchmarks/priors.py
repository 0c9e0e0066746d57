"""Prior generation speed: Ray Data pipeline vs the plain loop, same sampler, same machine.

Both paths generate the same plan into a fresh empty storage and are timed end to end,
base-model loading included (the plain loop loads it in-process, the Ray path in its
actor); `ray.init` is outside the timing. On a CPU the Ray path gets one actor holding all
CPU slots, so both use the same threads; on a GPU one actor per GPU.

    python benchmarks/priors.py                                   # tiny preset, CPU
    python benchmarks/priors.py --preset sd15-arch --count 200 --resolution 512 --steps 30
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = str(Path(__file__).resolve().parents[1])
sys.path.insert(0, REPO)  # runnable as a script from anywhere
from comfusion.config import from_dict  # noqa: E402
from comfusion.models import load_base  # noqa: E402
from comfusion.priors import generate_missing, open_cache, plan_priors  # noqa: E402
from comfusion.sampling import default_device, default_dtype  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help="base model: tiny, sd15-arch, or a folder / hub id")
    p.add_argument("--count", type=int, default=32, help="priors per class")
    p.add_argument("--classes", default="dog", help="comma-separated class nouns (one pipeline for all)")
    p.add_argument("--resolution", type=int, default=32, help="image side in pixels")
    p.add_argument("--steps", type=int, default=4, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per UNet batch")
    p.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray cluster")
    p.add_argument("--repeats", type=int, default=1, help="alternate the two paths this often; best time kept")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    return p.parse_args(argv)


def job_config(args):
    """The JobConfig both paths share; on a CPU one prior actor holds every CPU slot."""
    return from_dict({
        "model": {"base": args.preset, "resolution": args.resolution},
        "sampler": {"steps": args.steps, "guidance_scale": args.guidance, "batch_size": args.batch_size},
        "priors": {"count": args.count, "max_count": max(args.count, 5000)},
        "job": {"cpus_per_trainer": float(args.num_cpus)},
    })


def time_plain(cfg, classes: list[str], device: str) -> float:
    """Seconds for the plain loop (model load included) into a fresh storage."""
    storage = tempfile.mkdtemp(prefix="priors-plain-")
    try:
        start = time.perf_counter()
        components = load_base(cfg.model.base, revision=cfg.model.revision, seed=cfg.model.preset_seed,
                               device=device, dtype=default_dtype(device))
        for noun in classes:
            plan = plan_priors(noun, cfg)
            generate_missing(plan, open_cache(storage, plan), components, cfg.sampler, progress=None)
        _sync(device)
        return time.perf_counter() - start
    finally:
        shutil.rmtree(storage, ignore_errors=True)


def time_ray(cfg, classes: list[str]) -> float:
    """Seconds for the Ray Data pipeline (actor start and model load included) into a fresh storage."""
    from jobs.priors import make_priors  # noqa: PLC0415

    storage = tempfile.mkdtemp(prefix="priors-ray-")
    try:
        start = time.perf_counter()
        reports = make_priors(cfg, classes, storage, progress=None)
        elapsed = time.perf_counter() - start
        assert all(r.generated == cfg.priors.count for r in reports.values()), reports
        return elapsed
    finally:
        shutil.rmtree(storage, ignore_errors=True)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> dict:
    args = parse_args(argv)
    import ray  # noqa: PLC0415

    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    cfg = job_config(args)
    device = default_device()
    torch.set_num_threads(args.num_cpus)  # the Ray actor gets the same number of threads
    pythonpath = os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))
    ray.init(num_cpus=args.num_cpus, include_dashboard=False,  # workers import comfusion / jobs from REPO
             runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    n = args.count * len(classes)
    try:  # alternating, best of --repeats: other load on a shared machine hits both paths alike
        times = [(time_plain(cfg, classes, device), time_ray(cfg, classes)) for _ in range(args.repeats)]
        plain_s, ray_s = min(t[0] for t in times), min(t[1] for t in times)
    finally:
        ray.shutdown()
    out = dict(preset=args.preset, device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
               priors=n, steps=args.steps, resolution=args.resolution, batch_size=args.batch_size,
               plain_s=round(plain_s, 2), ray_s=round(ray_s, 2), plain_per_s=round(n / plain_s, 3),
               ray_per_s=round(n / ray_s, 3), ratio=round(plain_s / ray_s, 3),
               runs_s=[[round(a, 2), round(b, 2)] for a, b in times], load_avg=round(os.getloadavg()[0], 2))
    print(f"plain loop: {n} priors in {plain_s:.2f} s = {n / plain_s:.3f} priors/s")
    print(f"Ray Data:   {n} priors in {ray_s:.2f} s = {n / ray_s:.3f} priors/s")
    print(f"ratio Ray / plain: {plain_s / ray_s:.3f} (target >= 0.9 on one device); "
          f"runs (plain, Ray) s: {out['runs_s']}; load average {out['load_avg']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
