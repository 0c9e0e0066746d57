"""Evaluation throughput: images scored per second by each judge, and generation (sample + embed)
through the Ray Data actor pool of `jobs.evaluate` against a plain loop on the same machine.

CPU default: the `tiny` preset (base and judges). CUDA default: `sd15-arch` shapes (SD 1.5 UNet /
VAE, ViT-S/16 DINO, ViT-B/32 CLIP) with random weights at 512x512. Subject checkpoints are the
base plus seeded noise, written to a temporary folder. The Ray side starts its own local cluster
(printed apart); its actors' start-up and model loading count, as they would in a job. The plain
loop's model loading is printed apart too.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from comfusion.checkpoint import SubjectMeta, load_subject_weights_, save_subject_checkpoint, snapshot_weights  # noqa: E402
from comfusion.config import from_dict  # noqa: E402
from comfusion.metrics import Scorer, evaluation_plan  # noqa: E402
from comfusion.models import load_base  # noqa: E402
from comfusion.sampling import default_device  # noqa: E402
from jobs.evaluate import EvalWorker, Target, collect, generate_plain, generate_ray, work_items  # noqa: E402


def sync(device: str) -> None:
    """Wait for queued GPU work, so timings are real."""
    if device == "cuda":
        torch.cuda.synchronize()


def judge_throughput(judges: str, device: str, n: int, size: int, batch: int) -> None:
    """Images per second of each judge's image embedding (preprocessing included), after a warm-up."""
    scorer = Scorer.load(judges, [judges], device=device, batch_size=batch)
    images = np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    name = scorer.clip_names[0]
    for label, fn in (("DINO", scorer.dino_embed), ("CLIP image", lambda x: scorer.clip_image_embed(x, name))):
        fn(images[:batch])  # warm-up
        sync(device)
        t0 = time.perf_counter()
        fn(images)
        sync(device)
        dt = time.perf_counter() - t0
        print(f"judge {label:10s} ({judges}, {device}, {torch.get_num_threads()} threads, {size}x{size} uint8 in, "
              f"batch {batch}): "
              f"{n / dt:8.1f} images/s")


def make_world(root: Path, preset: str, n_subjects: int, args) -> tuple:
    """A config and `n_subjects` subject checkpoints (the base plus seeded noise) in `root`."""
    res = 512 if preset == "sd15-arch" else 32
    cfg = from_dict({"model": {"base": preset, "dino": preset, "clip": preset, "resolution": res},
                     "sampler": {"steps": args.steps, "guidance_scale": 7.5, "batch_size": args.batch},
                     "job": {"cpus_per_trainer": args.cpus_per_actor},
                     "eval": {"images_per_prompt": args.images_per_prompt, "prompt_sets": ["specific"],
                              "dino": preset, "clip_judges": [preset], "batch_size": args.batch}})
    base = load_base(preset)
    state = snapshot_weights(base)
    targets = []
    for k in range(n_subjects):
        gen = torch.Generator().manual_seed(k)
        load_subject_weights_(base, tuple({n: v + 0.01 * torch.randn(v.shape, generator=gen)
                                           if v.is_floating_point() else v for n, v in part.items()}
                                          for part in state))
        meta = SubjectMeta(id=f"s{k}", identifier="sks", class_noun="dog", base_model=preset)
        folder = save_subject_checkpoint(root / f"s{k}", base["unet"], base["text_encoder"], meta, dtype="fp16")
        targets.append(Target(f"s{k}", "comfusion", str(folder), "sks", "dog", (), ()))
    del base
    scenes = ("in the rain", "in the snow", "on the grass", "on the bed", "in the sky")[:args.prompts]
    plans = [evaluation_plan("sks", "dog", ["specific"], scenes) for _ in targets]
    return cfg, work_items(cfg, targets, plans)


def generation(cfg, items: list[dict], device: str, threads: int, cpus: int) -> None:
    """Ray Data pool vs the plain loop over the same work items."""
    import ray

    n = sum(len(i["seed"]) for i in items)
    names = list(cfg.eval.clip_judges)
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    worker = EvalWorker(cfg, device=device)
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    collect(generate_plain(cfg, items, worker), names, n, progress=None)
    sync(device)
    t_plain = time.perf_counter() - t0
    del worker
    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=cpus, include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    t_start = time.perf_counter() - t0
    try:
        first = []

        def timed(batches):
            for b in batches:
                first.append(first[0] if first else time.perf_counter() - t0)
                yield b

        t0 = time.perf_counter()
        collect(timed(generate_ray(cfg, items)), names, n, progress=None)
        t_ray = time.perf_counter() - t0
    finally:
        ray.shutdown()
    print(f"generation: {n} images, {cfg.sampler.steps} DDIM steps, guidance {cfg.sampler.guidance_scale}, "
          f"{cfg.model.resolution}x{cfg.model.resolution}, batch {cfg.eval.batch_size}, {len(items)} work items")
    print(f"  plain loop ({threads} torch threads): {n / t_plain:7.2f} images/s ({t_plain:.1f} s; "
          f"+{t_load:.1f} s model loading)")
    print(f"  Ray Data pool ({cpus} CPUs; actor start and model loading included): {n / t_ray:7.2f} images/s "
          f"({t_ray:.1f} s, the first work item back after {first[0]:.1f} s; +{t_start:.1f} s local cluster start)")
    print(f"  ratio Ray / plain: {t_plain / t_ray:.2f}x (with the plain loop's loading: "
          f"{(t_plain + t_load) / t_ray:.2f}x)")


def main(argv: list[str] | None = None) -> int:
    """Judge throughput, then generation through Ray Data against the plain loop."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", help="tiny (CPU default) or sd15-arch (CUDA default)")
    ap.add_argument("--judge-images", type=int, default=64, help="images per judge timing")
    ap.add_argument("--judge-size", type=int, default=512, help="side of the images the judges get")
    ap.add_argument("--subjects", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=2, help="specific scenes per subject (at most 5)")
    ap.add_argument("--images-per-prompt", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4, help="DDIM steps (the paper: 30)")
    ap.add_argument("--batch", type=int, default=4, help="eval.batch_size: images per work item / judge batch")
    ap.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPU slots per actor without a GPU")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of the plain loop on CPU (default 1: the tiny model gains nothing from "
                         "more, and spinning threads on shared cores slowed it down up to 7x here)")
    ap.add_argument("--cpus", type=int, default=None, help="CPUs of the local Ray cluster (default: all)")
    ap.add_argument("--skip-judges", action="store_true")
    ap.add_argument("--skip-generation", action="store_true")
    args = ap.parse_args(argv)

    device = default_device()
    preset = args.preset or ("sd15-arch" if device == "cuda" else "tiny")
    torch.set_num_threads(args.threads)
    if not args.skip_judges:
        judge_throughput(preset, device, args.judge_images, args.judge_size, args.batch)
    if not args.skip_generation:
        with tempfile.TemporaryDirectory() as tmp:
            cfg, items = make_world(Path(tmp), preset, args.subjects, args)
            generation(cfg, items, device, args.threads, args.cpus or os.cpu_count() or 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
