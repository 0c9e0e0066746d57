"""Serve load and subject-swap benchmark.

1. Load: registers `--subjects` fake subjects (the base plus seeded noise) in an MLflow sqlite
   registry in a temporary folder, starts the Serve app on a local Ray cluster with K
   (`--k`) smaller than the number of subjects, sends `--requests` HTTP requests mixed over the
   subjects with at most `--concurrency` in flight, and prints requests/s, p50/p99 latency,
   the error count and the Generator replica's swap / eviction counters.
2. Swap: the time to put a subject into a loaded pipeline (in-place `load_subject_weights_`
   from its cached CPU state dicts) against building a pipeline for it (`load_base` +
   `load_subject_checkpoint`), and their ratio (target >= 10x).

CPU default: `--preset tiny`. On CUDA, `--preset sd15-arch --skip-load` times the swap with SD
1.5 shapes (the base is built in memory; the checkpoint, about 2 GB, is written to a temp folder).
"""
import argparse
import asyncio
import os
import random
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import torch  # noqa: E402

from comfusion.checkpoint import (SubjectMeta, load_subject_checkpoint, load_subject_weights_,  # noqa: E402
                                  read_subject_weights, save_subject_checkpoint, snapshot_weights)
from comfusion.models import load_base  # noqa: E402
from comfusion.sampling import default_device, default_dtype  # noqa: E402


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def write_subjects(root: Path, preset: str, n: int) -> list[Path]:
    """`n` subject checkpoints: the base's weights plus noise seeded by the subject's index."""
    base = load_base(preset)  # on the CPU, fp32
    base_state = snapshot_weights(base)
    folders = []
    for i in range(n):
        gen = torch.Generator().manual_seed(1000 + i)
        with torch.no_grad():  # in place: one extra copy of the weights at most (sd15-arch: ~4 GB)
            for module in (base["unet"], base["text_encoder"]):
                for v in module.parameters():
                    v.add_(torch.randn(v.shape, generator=gen), alpha=0.02)
        meta = SubjectMeta(id=f"subject-{i}", identifier="sks", class_noun="dog", base_model=preset)
        folders.append(save_subject_checkpoint(root / f"subject-{i}", base["unet"], base["text_encoder"], meta,
                                               dtype="fp16" if preset != "tiny" else "fp32"))
        load_subject_weights_(base, base_state)
    return folders


# ---------------------------------------------------------------------------------------
# 1. HTTP load


def register_all(root: Path, folders: list[Path]) -> str:
    """Log each checkpoint to its own MLflow run and register it; returns the tracking URI."""
    from mlflow import MlflowClient

    from jobs.tracking import register_checkpoint

    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("serve-load", artifact_location=str(root / "artifacts"))
    for folder in folders:
        run = client.create_run(experiment)
        register_checkpoint(client, run.info.run_id, folder, folder.name, "comfusion")  # as the training job does
        client.set_terminated(run.info.run_id)
    return uri


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def send_load(url: str, subjects: list[str], args) -> tuple[list[float], list[int], float]:
    """Latencies (s) and status codes of `args.requests` requests, `args.concurrency` at a time."""
    import httpx

    rng = random.Random(0)
    order = [rng.choice(subjects) for _ in range(args.requests)]
    gate = asyncio.Semaphore(args.concurrency)
    latencies, codes = [], []

    async def one(client, i, subject):
        async with gate:
            t0 = time.perf_counter()
            r = await client.post("/v1/generate", json={"subject": subject, "scene": "in the snow", "seed": i,
                                                        "steps": args.steps})
            latencies.append(time.perf_counter() - t0)
            codes.append(r.status_code)

    async with httpx.AsyncClient(base_url=url, timeout=300, headers=args.headers) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*[one(client, i, s) for i, s in enumerate(order)])
        return latencies, codes, time.perf_counter() - t0


def run_load(root: Path, folders: list[Path], args, device: str) -> None:
    import httpx
    import ray
    from ray import serve

    from serve.app import make_app
    from serve.auth import local_key
    from serve.settings import ServeSettings

    keys_file, args.headers = local_key(root)
    settings = ServeSettings(base=args.preset, tracking_uri=register_all(root, folders), cache_dir=str(root / "cache"),
                             api_keys_file=keys_file,
                             max_models_per_replica=args.k, default_steps=args.steps, device=device)
    actor = {"num_gpus": 1, "num_cpus": 1} if device == "cuda" else {"num_cpus": 0.5}
    repo = str(Path(__file__).resolve().parents[1])  # replicas import serve.app from here
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, configure_logging=False,
             log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": repo}})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(make_app(settings, generator_options=dict(num_replicas=1, ray_actor_options=actor,
                                                            max_queued_requests=-1),
                           ingress_options=dict(num_replicas=1, ray_actor_options={"num_cpus": 0.25})),
                  name="load", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        httpx.post(f"{url}/v1/generate", json={"subject": folders[0].name, "scene": "x", "steps": 1}, timeout=300,
                   headers=args.headers)
        latencies, codes, wall = asyncio.run(send_load(url, [f.name for f in folders], args))
        stats = httpx.get(f"{url}/v1/stats", timeout=60, headers=args.headers).json()
    finally:
        serve.shutdown()
        ray.shutdown()
    q = statistics.quantiles(latencies, n=100)
    errors = sum(c != 200 for c in codes)
    print(f"load: subjects={len(folders)} K={args.k} requests={len(codes)} concurrency={args.concurrency} "
          f"steps={args.steps} device={device}")
    print(f"load: requests_per_s={len(codes) / wall:.2f} p50_s={q[49]:.3f} p99_s={q[98]:.3f} errors={errors}")
    print(f"load: replica loads={stats['loads']} evictions={stats['evictions']} swaps={stats['swaps']} "
          f"mean_swap_s={stats['swap_seconds'] / max(stats['swaps'], 1):.4f} loaded={stats['loaded']} "
          f"pipeline_builds={stats['pipeline_builds']} rss_mb={stats['rss_bytes'] / 2**20:.0f}")


# ---------------------------------------------------------------------------------------
# 2. swap vs build


def time_swap(preset: str, folders: list[Path], device: str, repeats: int) -> tuple[float, float]:
    """Median seconds of an in-place swap (alternating two cached subjects) and of a fresh build."""
    dtype = default_dtype(device)
    parts = load_base(preset, device=device, dtype=dtype)
    states = [cached_state(folder, device, dtype) for folder in folders[:2]]
    swaps = []
    for i in range(repeats * 2):
        sync(device)
        t0 = time.perf_counter()
        load_subject_weights_(parts, states[i % 2])
        sync(device)
        swaps.append(time.perf_counter() - t0)
    del parts, states  # free the memory before building
    builds = []
    for _ in range(max(1, repeats // 2)):
        t0 = time.perf_counter()
        fresh = load_base(preset, device=device, dtype=dtype)
        fresh["unet"] = fresh["text_encoder"] = None  # replaced by the subject's modules
        fresh["unet"], fresh["text_encoder"], _ = load_subject_checkpoint(folders[0], device=device, dtype=dtype)
        sync(device)
        builds.append(time.perf_counter() - t0)
        del fresh
    return statistics.median(swaps), statistics.median(builds)


def cached_state(folder: Path, device: str, dtype: torch.dtype) -> tuple:
    """A subject's weights as the Generator caches them: CPU state dicts, pinned for CUDA."""
    unet, text, meta = read_subject_weights(folder, device="cpu", dtype=dtype)
    if device == "cuda":
        unet, text = ({k: v.pin_memory() for k, v in s.items()} for s in (unet, text))
    return unet, text, meta


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", help="base preset: tiny (CPU) or sd15-arch (CUDA)")
    ap.add_argument("--subjects", type=int, default=4, help="subjects registered")
    ap.add_argument("--k", type=int, default=2, help="max subjects per Generator replica (< --subjects)")
    ap.add_argument("--requests", type=int, default=40, help="requests sent")
    ap.add_argument("--concurrency", type=int, default=4, help="requests in flight at most")
    ap.add_argument("--steps", type=int, default=4, help="DDIM steps per image")
    ap.add_argument("--repeats", type=int, default=6, help="timed swaps per subject (builds: half as many)")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--threads", type=int, default=1, help="CPU torch threads for the swap timing (a Ray replica "
                                                          "with <= 1 CPU gets OMP_NUM_THREADS=1)")
    ap.add_argument("--skip-load", action="store_true", help="only time swap vs build (no Ray, no HTTP)")
    args = ap.parse_args(argv)
    if args.k >= args.subjects:
        ap.error("--k must be smaller than --subjects, so that subjects are evicted")
    device = default_device(args.device)

    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        folders = write_subjects(root / "ckpt", args.preset, args.subjects if not args.skip_load else 2)
        print(f"setup: {len(folders)} {args.preset} subject checkpoints in {time.perf_counter() - t0:.1f}s")
        if not args.skip_load:
            run_load(root, folders, args, device)
        if device == "cpu":
            torch.set_num_threads(args.threads)
        swap_s, build_s = time_swap(args.preset, folders, device, args.repeats)
    ratio = build_s / swap_s
    print(f"swap: preset={args.preset} device={device} swap_in_place_s={swap_s:.4f} build_pipeline_s={build_s:.3f} "
          f"ratio={ratio:.0f}x target>=10x {'OK' if ratio >= 10 else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
