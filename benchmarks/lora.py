"""LoRA subjects against full subjects: checkpoint size, swap time, many subjects per replica, batching.

1. size: a LoRA subject (rank `--rank`, UNet attention) against a full one (UNet + text encoder,
   fp16) on `sd15-arch` shapes; the LoRA file is written for real (target: at most 1%).
2. swap: putting a subject into a loaded `sd15-arch` pipeline on this machine: a full subject
   (in-place copy) against a LoRA one through a slot padded to `--max-rank` (same shape, and
   another rank on other modules), and without padding (unload + load); target: LoRA >= 20x faster.
3. many: `--subjects` LoRA subjects registered in an MLflow sqlite registry and cycled through one
   Generator replica (tiny base, real Ray Serve and HTTP); every request must succeed; prints the
   replica's RSS against subjects seen (bounded by `--adapter-cache`).
4. batch: `--concurrency` concurrent requests for one LoRA subject, batched (`max_batch_size` 8)
   against unbatched (1): requests/s and p99 (target: >= 2x throughput at equal p99).

    nice -n 19 python benchmarks/lora.py                       # all four, CPU
    nice -n 19 python benchmarks/lora.py --only many --subjects 1000

Ratios are the figures to read on a CPU; absolute times only mean something on a GPU.
"""
import argparse
import asyncio
import itertools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import torch  # noqa: E402

from comfusion.checkpoint import SubjectMeta, load_subject_weights_, snapshot_weights  # noqa: E402
from comfusion.config import LoraSettings  # noqa: E402
from comfusion.lora import (SubjectSlot, add_adapters, read_lora_subject, save_lora_subject,  # noqa: E402
                            unload_lora)
from comfusion.models import build_base_components, load_base  # noqa: E402

SECTIONS = ("size", "swap", "many", "batch")
_PORT = 0  # Serve's HTTP port, once started


def fake_lora(base: dict, folder: Path, sid: str, seed: int, rank: int, base_name: str,
              targets: tuple[str, ...] = LoraSettings.unet_targets) -> Path:
    """A LoRA subject on `base` with seeded nonzero adapters (as training leaves them)."""
    settings = LoraSettings(rank=rank, alpha=float(rank), unet_targets=targets)
    add_adapters(base["unet"], base["text_encoder"], settings, False, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in base["unet"].named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    meta = SubjectMeta(id=sid, identifier="sks", class_noun="dog", base_model=base_name)
    out = save_lora_subject(folder, base["unet"], base["text_encoder"], meta, settings, dtype="fp16")
    base["unet"].unload_lora()
    return out


def section_size(args, root: Path) -> None:
    base = build_base_components("sd15-arch")
    full = sum(p.numel() for m in ("unet", "text_encoder") for p in base[m].parameters()) * 2  # fp16 bytes
    folder = fake_lora(base, root / "size", "size", 0, args.rank, "sd15-arch")
    lora = (folder / "pytorch_lora_weights.safetensors").stat().st_size
    print(f"[size] sd15-arch full subject (UNet + text encoder, fp16): {full / 2**20:,.0f} MB; "
          f"LoRA rank {args.rank} (UNet attention): {lora / 2**20:.2f} MB = {100 * lora / full:.3f}% "
          f"(target <= 1%)", flush=True)


def _time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _alternate(slot: SubjectSlot, loras: list, repeats: int) -> float:
    """Median time of putting the other of two LoRA subjects into `slot` (after a warm-up pair)."""
    turn = itertools.count()
    for i in range(2):
        slot.use_lora(f"warm{i}", loras[i])

    def swap():
        i = next(turn)
        slot.use_lora(f"s{i}", loras[i % 2])

    return _time(swap, repeats)


def section_swap(args, root: Path) -> None:
    base = build_base_components("sd15-arch")
    shapes = [(args.rank, LoraSettings.unet_targets), (2 * args.rank, ("to_q", "to_v")),
              (args.rank, LoraSettings.unet_targets)]
    loras = [read_lora_subject(fake_lora(base, root / f"swap-{i}", f"s{i}", i, rank, "sd15-arch", targets))
             for i, (rank, targets) in enumerate(shapes)]
    full_state = snapshot_weights(base)  # a full subject's state dicts in host memory (fp32, as served on CPU)
    full_s = _time(lambda: load_subject_weights_(base, full_state), args.repeats)
    same, other = [loras[0], loras[2]], [loras[0], loras[1]]  # same shape; rank and modules differ
    padded = SubjectSlot(base, max_rank=args.max_rank)
    same_s, other_s = _alternate(padded, same, args.repeats), _alternate(padded, other, args.repeats)
    assert padded.swaps.get("unpadded_load", 0) == 0, padded.swaps
    unload_lora(base)  # the padded adapter out: the unpadded slot starts from the plain base
    cold_s = _alternate(SubjectSlot(base, max_rank=0), other, args.repeats)  # no padding: unload + load
    print(f"[swap] sd15-arch on {torch.get_num_threads()} thread(s): full subject {full_s * 1000:.0f} ms; "
          f"LoRA through a slot padded to rank {args.max_rank}: same shape {same_s * 1000:.1f} ms "
          f"({full_s / same_s:.0f}x faster), other rank and modules (r{shapes[0][0]} on 4 attention modules "
          f"<-> r{shapes[1][0]} on 2) {other_s * 1000:.1f} ms ({full_s / other_s:.0f}x); the other shape without "
          f"padding (unload + load) {cold_s * 1000:.1f} ms ({full_s / cold_s:.0f}x) (target >= 20x)", flush=True)


# ---------------------------------------------------------------------------------------
# Serve sections


class LoraMaker:
    """Many distinct LoRA subjects on one base, cheaply: the adapters are added once, and each
    subject gets its own seeded B matrices (A stays the template's) before it is saved."""

    def __init__(self, base_name: str, rank: int):
        self.base, self.base_name = load_base(base_name), base_name
        self.settings = LoraSettings(rank=rank, alpha=float(rank))
        add_adapters(self.base["unet"], self.base["text_encoder"], self.settings, False, seed=0)
        self.b_params = [p for n, p in self.base["unet"].named_parameters() if "lora_B" in n]

    def make(self, folder: Path, sid: str, seed: int) -> Path:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.b_params:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
        meta = SubjectMeta(id=sid, identifier="sks", class_noun="dog", base_model=self.base_name)
        return save_lora_subject(folder, self.base["unet"], self.base["text_encoder"], meta, self.settings,
                                 dtype="fp16")


def register_lean(client, experiment_id: str, folder: Path, sid: str) -> int:
    """Register one new subject's checkpoint with 6 MLflow calls: a run, its checkpoint folder
    logged once (the adapter file and subject.json), the registered model, one version with the
    tags Serve reads, its `serving` alias, the run's end. `jobs.tracking.register_checkpoint`
    makes about 15 (it is safe against retries and concurrent writers, so it searches the versions
    table several times and sets the method alias too), which made registering 1000 slow."""
    from comfusion import registry
    from comfusion.checkpoint import verify_checkpoint

    meta = verify_checkpoint(folder)
    run = client.create_run(experiment_id)
    client.log_artifacts(run.info.run_id, str(folder), registry.CHECKPOINT_ARTIFACT)
    client.create_registered_model(sid, description=registry.MODEL_DESCRIPTION)
    tags = registry.version_tags(sid, meta.identifier, meta.class_noun, "comfusion", meta.created, meta.kind)
    source = f"{run.info.artifact_uri.rstrip('/')}/{registry.CHECKPOINT_ARTIFACT}"
    version = client.create_model_version(sid, source=source, run_id=run.info.run_id, tags=tags).version
    client.set_registered_model_alias(sid, registry.SERVING_ALIAS, str(version))
    client.set_terminated(run.info.run_id)
    return int(version)


def register_loras(root: Path, n: int, rank: int) -> str:
    """`n` LoRA subjects on the tiny base in an MLflow sqlite registry; returns its URI."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("lora-bench", artifact_location=str(root / "artifacts"))
    maker = LoraMaker("tiny", rank)
    t0 = time.perf_counter()
    for i in range(n):
        register_lean(client, exp, maker.make(root / "ckpt" / f"lora-{i}", f"lora-{i}", i), f"lora-{i}")
        if (i + 1) % 100 == 0 or i + 1 == n:
            print(f"  registered {i + 1}/{n} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return uri


def start_app(uri: str, root: Path, name: str, **overrides) -> tuple[str, dict]:
    """Start app `name` on the tiny base; its URL and the headers carrying an admin API key."""
    import ray
    from ray import serve

    from cluster_helpers import start_serve  # tests/
    from serve.app import make_app
    from serve.auth import local_key
    from serve.settings import ServeSettings

    global _PORT
    if not ray.is_initialized():  # retried: a loaded box can miss Serve's fixed 60 s proxy start window
        _PORT = start_serve(address="local")
    keys_file, headers = local_key(root)
    settings = ServeSettings(base="tiny", tracking_uri=uri, cache_dir=str(root / f"cache-{name}"), device="cpu",
                             api_keys_file=keys_file, default_steps=2, lookup_wait_s=10.0, **overrides)
    app = make_app(settings, generator_options=dict(num_replicas=1, ray_actor_options={"num_cpus": 1}),
                   ingress_options=dict(num_replicas=1, ray_actor_options={"num_cpus": 0.25}))
    serve.run(app, name=name, route_prefix=f"/{name}")
    return f"http://127.0.0.1:{_PORT}/{name}", headers


def stop_app(name: str) -> None:
    """Free the app's CPU slots (2 CPUs hold one Generator and one Ingress at a time)."""
    from ray import serve

    serve.delete(name)


def section_many(args, root: Path) -> None:
    import httpx

    t0 = time.perf_counter()
    uri = register_loras(root, args.subjects, rank=4)
    print(f"[many] registered {args.subjects} LoRA subjects in {time.perf_counter() - t0:.0f} s "
          f"(load average {os.getloadavg()[0]:.1f})", flush=True)
    url, headers = start_app(uri, root, "many", max_adapters_per_replica=args.adapter_cache, max_models_per_replica=1)
    failures, every = 0, max(1, args.subjects // 10)
    print(f"[many] {args.subjects} LoRA subjects through one replica, adapter cache {args.adapter_cache}:", flush=True)
    with httpx.Client(base_url=url, timeout=300, headers=headers) as http:
        t0 = time.perf_counter()
        for rnd in range(args.rounds):
            for i in range(args.subjects):
                r = http.post("/v1/generate", json={"subject": f"lora-{i}", "prompt": "a sks dog", "seed": i})
                failures += r.status_code != 200
                if r.status_code != 200 and failures <= 3:
                    print(f"  lora-{i} failed: {r.status_code} {r.text[:200]}", flush=True)
                seen = rnd * args.subjects + i + 1
                if seen % every == 0 or seen == 1:
                    s = http.get("/v1/stats").json()
                    print(f"  requests {seen:5d}  adapters cached {s['adapters']:4d}  "
                          f"adapter MB {s['adapter_bytes'] / 2**20:6.2f}  RSS {s['rss_bytes'] / 2**20:7.0f} MB  "
                          f"evictions {s['adapter_evictions']}  {time.perf_counter() - t0:5.0f} s  "
                          f"load {os.getloadavg()[0]:.1f}", flush=True)
        took = time.perf_counter() - t0
        s = http.get("/v1/stats").json()
    stop_app("many")
    total = args.rounds * args.subjects
    print(f"[many] served {total - failures}/{total} requests ({failures} failed) in {took:.0f} s; "
          f"{s['adapter_evictions']} adapter evictions, {s['lora_swaps']} LoRA swaps, "
          f"{s['pipeline_builds']} pipeline build(s); load average {os.getloadavg()}", flush=True)


async def _burst(url: str, headers: dict, n: int, rounds: int) -> tuple[float, list[float], int]:
    import httpx

    lat, failures = [], 0
    async with httpx.AsyncClient(base_url=url, timeout=300, headers=headers) as client:
        async def one(i: int):
            nonlocal failures
            t0 = time.perf_counter()
            r = await client.post("/v1/generate", json={"subject": "lora-0", "prompt": "a sks dog", "seed": i})
            lat.append(time.perf_counter() - t0)
            failures += r.status_code != 200

        await one(0)  # warm: the subject is loaded and swapped in
        lat.clear()
        t0 = time.perf_counter()
        for _ in range(rounds):
            await asyncio.gather(*[one(i) for i in range(n)])
        return time.perf_counter() - t0, lat, failures


def section_batch(args, root: Path) -> None:
    (root / "batch").mkdir()
    uri = register_loras(root / "batch", 1, rank=4)
    results = {}
    for name, size in (("unbatched", 1), ("batched", 8)):
        url, headers = start_app(uri, root / "batch", name, max_batch_size=size, batch_wait_s=0.02)
        took, lat, failures = asyncio.run(_burst(url, headers, args.concurrency, args.rounds_batch))
        stop_app(name)
        n = len(lat)
        p99 = sorted(lat)[max(0, int(0.99 * n) - 1)]
        results[name] = (n / took, p99)
        print(f"[batch] {name:9s}: {n} requests ({failures} failed), {args.concurrency} concurrent: "
              f"{n / took:.2f} req/s, p50 {statistics.median(lat):.2f} s, p99 {p99:.2f} s", flush=True)
    (rb, pb), (ru, pu) = results["batched"], results["unbatched"]
    print(f"[batch] batched / unbatched throughput {rb / ru:.1f}x (target >= 2x); p99 {pb:.2f} s vs {pu:.2f} s",
          flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="sections to run")
    ap.add_argument("--rank", type=int, default=4, help="LoRA rank of the size and swap sections")
    ap.add_argument("--repeats", type=int, default=5, help="timed swaps per kind")
    ap.add_argument("--max-rank", type=int, default=16, help="lora_max_rank of the swap section's padded slot")
    ap.add_argument("--subjects", type=int, default=1000, help="LoRA subjects of the many section")
    ap.add_argument("--rounds", type=int, default=1, help="passes over all subjects in the many section")
    ap.add_argument("--adapter-cache", type=int, default=200, help="max_adapters_per_replica of the many section")
    ap.add_argument("--concurrency", type=int, default=8, help="concurrent same-subject requests (batch section)")
    ap.add_argument("--rounds-batch", type=int, default=4, help="bursts of --concurrency requests per app")
    ap.add_argument("--tmp-dir", default=None,
                    help="where the run's scratch folder (registry, checkpoints, caches) goes, e.g. /dev/shm "
                         "(default: the system temp folder)")
    args = ap.parse_args(argv)
    for name in ("rank", "repeats", "max_rank", "subjects", "rounds", "adapter_cache", "concurrency", "rounds_batch"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if "swap" in args.only and 2 * args.rank > args.max_rank:
        ap.error(f"--max-rank must be >= 2 x --rank (the swap section's second subject has rank {2 * args.rank})")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.tmp_dir is not None and not Path(args.tmp_dir).is_dir():
        print(f"--tmp-dir {args.tmp_dir!r} is not a folder", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="lora-bench-", dir=args.tmp_dir) as tmp:
        root = Path(tmp)
        for name in args.only:
            globals()[f"section_{name}"](args, root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
