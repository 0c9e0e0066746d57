"""Sampling throughput: images per second of `comfusion.sampling.sample`.

CPU: the `tiny` preset. CUDA: `--preset sd15-arch` at 512x512, 30 DDIM steps with guidance,
and the fraction of the compute floor (about 50.8 TFLOP per image: 30 steps x UNet at batch
2 x 0.8 TFLOP, plus a 2.5 TFLOP decode) at the card's dense bf16 rate.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from comfusion.models import load_base  # noqa: E402
from comfusion.sampling import default_device, default_dtype, sample  # noqa: E402

TFLOP_PER_IMAGE_SD15 = 30 * 2 * 0.8 + 2.5


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default=None, help="tiny (CPU default) or sd15-arch (CUDA default)")
    ap.add_argument("--images", type=int, default=None, help="images to time (default 16 CPU, 32 CUDA)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--peak-tflops", type=float, default=790.0, help="dense bf16 TFLOP/s of the GPU (H100: ~790)")
    args = ap.parse_args(argv)

    device = default_device()
    preset = args.preset or ("sd15-arch" if device == "cuda" else "tiny")
    n = args.images or (32 if device == "cuda" else 16)
    parts = load_base(preset, device=device, dtype=default_dtype(device))
    prompts = [f"a dog {s}" for s in ("in the snow", "on the grass", "in the sky", "on the bed")] * (n // 4 + 1)
    sample(parts, prompts[:args.batch], list(range(args.batch)), steps=2, guidance_scale=args.guidance,
           batch_size=args.batch)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = sample(parts, prompts[:n], list(range(n)), steps=args.steps, guidance_scale=args.guidance,
                 batch_size=args.batch)
    if device == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    h = out.images.shape[1]
    print(f"preset={preset} device={device} dtype={parts['unet'].dtype} size={h}x{h} steps={args.steps} "
          f"guidance={args.guidance} batch={args.batch}")
    print(f"images={n} seconds={dt:.2f} images_per_s={n / dt:.2f} s_per_image={dt / n:.3f}")
    if device == "cuda" and preset == "sd15-arch":
        floor = TFLOP_PER_IMAGE_SD15 / args.peak_tflops
        print(f"compute_floor_s_per_image={floor:.3f} fraction_of_floor={floor / (dt / n):.2f} "
              f"target_s_per_image<=0.6 {'OK' if dt / n <= 0.6 else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
