"""Training-step time and memory of DreamBooth, ComFusion and the Table 3 ablations, in one run,
plus the levers of the toy study (`comfusion.config.LEVERS`: e.g. `loss.fusion_backprop: last`).

CPU (the default there): the `tiny` preset, fp32, torch AdamW.
CUDA (the default there): `--preset sd15-arch` at 512x512 with bf16 autocast, gradient
checkpointing and 8-bit AdamW; judges `sd15-arch` (DINO ViT-S/16 and CLIP ViT-B/32 shapes).

Model-FLOP utilisation (CUDA) counts the model FLOPs of a step, not the recomputation that
gradient checkpointing adds: DreamBooth (and "w/o fusion") ~4.9 TFLOP; a fusion step
~4.9 + 2.4 tau + 7.9 TFLOP (tau UNet calls at 0.8 TFLOP x 3 for training, the VAE decode
2.5 x 3 and the judges), i.e. ~20 TFLOP at tau = 3 (STACK-NOTES), against --peak-tflops.

    python benchmarks/train_step.py --steps 5 --warmup 2
    python benchmarks/train_step.py --only dreambooth,comfusion,backprop_last   # the backprop speed-up
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from comfusion.config import LEVERS, VARIANTS, JobConfig  # noqa: E402
from comfusion.data import Subject  # noqa: E402
from comfusion.models import BASE_PRESETS  # noqa: E402
from comfusion.prompts import PAPER_SCENES, class_scene_text  # noqa: E402
from comfusion.sampling import default_device  # noqa: E402
from comfusion.train import Priors, SubjectTrainer  # noqa: E402


def step_tflop(cfg: JobConfig) -> float:
    if cfg.method == "dreambooth" or not cfg.loss.fusion:
        return 4.9
    if cfg.loss.fusion_backprop == "last":  # tau - 1 forward-only calls (0.8 each), one trained call
        return 4.9 + 0.8 * (cfg.loss.tau - 1) + 2.4 + 7.9
    return 4.9 + 2.4 * cfg.loss.tau + 7.9


def base_config(preset: str, cuda: bool) -> JobConfig:
    res = BASE_PRESETS[preset].resolution
    cfg = JobConfig().replace(**{"model.base": preset, "model.dino": preset, "model.clip": preset,
                                 "model.resolution": res, "train.gradient_checkpointing": cuda,
                                 "train.optimizer": "adamw8bit" if cuda else "adamw"})
    precision = "bf16" if cuda else "no"  # "no" cannot go through replace(): YAML reads it as false
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, mixed_precision=precision))


def synthetic_inputs(preset: str, n_priors: int) -> tuple[Subject, Priors]:
    """Random pixels and prior latents of the right shapes: speed does not depend on content."""
    res = BASE_PRESETS[preset].resolution
    f = 2 ** (len(BASE_PRESETS[preset].vae["block_out_channels"]) - 1)
    g = torch.Generator().manual_seed(0)
    subject = Subject(id="bench", identifier="sks", class_noun="dog", image_paths=("bench.png",),
                      scenes=PAPER_SCENES, pixels=torch.rand(1, 3, res, res, generator=g) * 2 - 1)
    scenes = [PAPER_SCENES[i % len(PAPER_SCENES)] for i in range(n_priors)]
    priors = Priors(latents=torch.randn(n_priors, 4, res // f, res // f, generator=g),
                    prompts=[class_scene_text("dog", s) for s in scenes], scenes=scenes)
    return subject, priors


def measure(cfg: JobConfig, subject: Subject, priors: Priors, device: str, warmup: int, steps: int) -> dict:
    cuda = device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trainer = SubjectTrainer(cfg, subject, priors, device=device)
    for _ in range(warmup):
        trainer.train_step()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        trainer.train_step()  # ends in .float() of the losses: a device sync every step
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    del trainer
    gc.collect()
    return {"sec": statistics.mean(times), "median": statistics.median(times), "peak_gib": peak / 2**30}


def measure_interleaved(cfgs: dict[str, JobConfig], subject: Subject, priors: Priors, warmup: int,
                        steps: int) -> dict[str, dict]:
    """CPU under a varying load: one step of each row in turn, so every row sees the same load;
    returns mean and median seconds per row (no memory figure)."""
    trainers = {k: SubjectTrainer(c, subject, priors, device="cpu") for k, c in cfgs.items()}
    times: dict[str, list[float]] = {k: [] for k in cfgs}
    for i in range(warmup + steps):
        for k, trainer in trainers.items():
            t0 = time.perf_counter()
            trainer.train_step()
            if i >= warmup:
                times[k].append(time.perf_counter() - t0)
    return {k: {"sec": statistics.mean(v), "median": statistics.median(v), "peak_gib": float("nan")}
            for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default=None, help="tiny (CPU default) or sd15-arch (CUDA default)")
    ap.add_argument("--device", default=None, help="cuda if available, else cpu")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per method")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--only", default="", help="comma-separated row keys to run, e.g. dreambooth,comfusion (default: all)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--run-steps", type=int, default=1200, help="steps of the projected run (paper: 1200)")
    ap.add_argument("--peak-tflops", type=float, default=790.0, help="dense bf16 TFLOP/s (H100: ~790)")
    ap.add_argument("--interleave", action="store_true",
                    help="CPU: time the rows step by step in turn (fair under a varying load; no memory figure)")
    args = ap.parse_args(argv)

    device = default_device(args.device)
    cuda = device == "cuda"
    preset = args.preset or ("sd15-arch" if cuda else "tiny")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg0 = base_config(preset, cuda)
    subject, priors = synthetic_inputs(preset, n_priors=len(PAPER_SCENES))
    t = cfg0.train
    print(f"preset={preset} device={device} res={cfg0.model.resolution} precision={t.mixed_precision} "
          f"checkpointing={t.gradient_checkpointing} optimizer={t.optimizer} threads={torch.get_num_threads()} "
          f"warmup={args.warmup} steps={args.steps}")
    wanted = {s.strip() for s in args.only.split(",") if s.strip()}
    mem_name = "peak GiB" if cuda else "RSS peak GiB*"
    print(f"{'method':<34} {'ms/step':>9} {'median':>7} {'x DB':>6} {mem_name:>13} {'TFLOP':>6} {'MFU':>6} "
          f"{f'{args.run_steps} steps':>12}")
    rows = [(key, label, cfg0.replace(**o) if o else cfg0) for key, label, o in VARIANTS + LEVERS
            if not wanted or key in wanted]
    if args.interleave and not cuda:
        results = measure_interleaved({k: c for k, _, c in rows}, subject, priors, args.warmup, args.steps)
    db_sec = None
    for key, label, cfg in rows:
        r = results[key] if args.interleave and not cuda else measure(cfg, subject, priors, device, args.warmup,
                                                                       args.steps)
        db_sec = r["sec"] if key == "dreambooth" else db_sec
        ratio = f"{r['sec'] / db_sec:6.2f}" if db_sec else f"{'-':>6}"
        sd15 = preset == "sd15-arch"  # the TFLOP figures are SD 1.5's
        tflop = f"{step_tflop(cfg):6.1f}" if sd15 else f"{'-':>6}"
        mfu = f"{step_tflop(cfg) / r['sec'] / args.peak_tflops:6.1%}" if cuda and sd15 else f"{'-':>6}"
        print(f"{label:<34} {r['sec'] * 1e3:9.1f} {r['median'] * 1e3:7.1f} {ratio} {r['peak_gib']:13.2f} {tflop} {mfu} "
              f"{r['sec'] * args.run_steps / 60:9.1f} min", flush=True)
    if not cuda:
        print("* CPU: the process's peak RSS so far (it only grows; rows are in run order)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
