"""Fault benchmark of the Serve app: a bounded mixed load while, in turn, clients hang up, MLflow
stops and starts again, the Generator replica is killed, and a cached checkpoint file is damaged.

Everything is local and started here: an `mlflow server` on a free port (registry + artifacts in a
temporary folder), a Ray cluster (`ray.init`), the app on a free port, and `--subjects` tiny
subjects (the `tiny` base plus seeded noise) registered through the server. One subject swaps in
with an injected delay (`--swap-delay-s`, like SD 1.5's ~2 GB copy) so hang-ups land mid-swap.

Before the faults, every request of the mix is made once on the quiet app; every 2xx image during
the faults is compared with those bytes. One row per phase: requests, 2xx/4xx/5xx, p50/p99 against
the baseline, images that differ, seconds to recover, and the compute the Generator spent after
clients hung up (thread CPU of the denoising step each stop landed in).

Targets: 0 differing images; during the MLflow outage all requests for loaded subjects succeed with
p99 <= 2x the baseline, unknown subjects get a 503 within 2 s; after a replica kill, errors only for
requests in flight and recovery within 30 s; after a hang-up at most one denoising step.
"""
import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import httpx  # noqa: E402
import torch  # noqa: E402

from comfusion.checkpoint import (SubjectMeta, load_subject_weights_, save_subject_checkpoint,  # noqa: E402
                                  snapshot_weights)
from comfusion.models import load_base  # noqa: E402
from serve.local_mlflow import LocalMlflowServer, free_port  # noqa: E402

SLOW = "subject-0"  # swapped in with the injected delay


@dataclass
class Outcome:
    subject: str
    started: float  # monotonic
    latency: float
    status: int
    differs: bool = False


@dataclass
class Row:
    fault: str
    outcomes: list[Outcome]
    recover_s: float | None = None
    cpu_after_hangup: str = "-"
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------
# set-up: subjects in the registry, the app


def register_subjects(server: LocalMlflowServer, root: Path, names: list[str]) -> None:
    from mlflow import MlflowClient

    from jobs.tracking import register_checkpoint

    client = MlflowClient(tracking_uri=server.uri)
    experiment = client.get_experiment_by_name("faults") or client.get_experiment(client.create_experiment("faults"))
    base = load_base("tiny")
    base_state = snapshot_weights(base)
    for name in names:
        gen = torch.Generator().manual_seed(sum(map(ord, name)))
        load_subject_weights_(base, tuple({k: v + 0.05 * torch.randn(v.shape, generator=gen) if v.is_floating_point()
                                           else v for k, v in s.items()} for s in base_state))
        meta = SubjectMeta(id=name, identifier="sks", class_noun="dog", base_model="tiny",
                           config={"model": {"base": "tiny", "preset_seed": 0}})
        folder = save_subject_checkpoint(root / "ckpt" / name, base["unet"], base["text_encoder"], meta, dtype="fp32")
        run = client.create_run(experiment.experiment_id)
        register_checkpoint(client, run.info.run_id, folder, name, "comfusion")  # as the training job does
        client.set_terminated(run.info.run_id)
    load_subject_weights_(base, base_state)


def start_app(server: LocalMlflowServer, root: Path, args) -> str:
    import ray
    from ray import serve

    from serve.app import make_app
    from serve.auth import local_key
    from serve.settings import ServeSettings

    keys_file, args.headers = local_key(root)
    settings = ServeSettings(base="tiny", tracking_uri=server.uri, cache_dir=str(root / "cache"), device="cpu",
                             api_keys_file=keys_file,
                             max_models_per_replica=args.k, default_steps=args.steps, registry_ttl_s=2.0,
                             request_timeout_s=60.0, registry_timeout_s=1, registry_retries=1,
                             fault_slow_subject=SLOW, fault_swap_delay_s=args.swap_delay_s)
    repo = str(Path(__file__).resolve().parents[1])
    for attempt in range(3):  # on a busy 2-core box a raylet can miss Ray's fixed 30 s start window
        try:
            ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, configure_logging=False,
                     log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": repo, "OMP_NUM_THREADS": "1"}})
            break
        except Exception:  # noqa: BLE001
            ray.shutdown()
            if attempt == 2:
                raise
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(make_app(settings, generator_options=dict(num_replicas=1, ray_actor_options={"num_cpus": 1}),
                       ingress_options=dict(num_replicas=1, ray_actor_options={"num_cpus": 0.25})),
              name="faults", route_prefix="/")
    return f"http://127.0.0.1:{port}"


def request_mix(subjects: list[str], seeds: int) -> list[dict]:
    return [{"subject": s, "scene": "in the snow", "seed": k} for s in subjects for k in range(seeds)]


def key(req: dict) -> tuple:
    return req["subject"], req["seed"]


async def references(client: httpx.AsyncClient, mix: list[dict]) -> dict:
    """The images of every request of the mix on the quiet app, one at a time."""
    refs = {}
    for req in mix:
        r = await client.post("/v1/generate", json=req)
        r.raise_for_status()
        refs[key(req)] = r.json()["images"]
    return refs


# ---------------------------------------------------------------------------------------
# load


async def load(client: httpx.AsyncClient, mix: list[dict], refs: dict, seconds: float, concurrency: int,
               seed: int) -> list[Outcome]:
    """`concurrency` clients, each sending the next request when its last one is answered."""
    rng, out, stop_at = random.Random(seed), [], time.monotonic() + seconds

    async def client_loop():
        while time.monotonic() < stop_at:
            req = rng.choice(mix)
            t0 = time.monotonic()
            try:
                r = await client.post("/v1/generate", json=req)
                status = r.status_code
            except httpx.HTTPError:
                status = 599  # the connection failed
            o = Outcome(req["subject"], t0, time.monotonic() - t0, status)
            o.differs = status == 200 and r.json()["images"] != refs[key(req)]
            out.append(o)

    await asyncio.gather(*[client_loop() for _ in range(concurrency)])
    return out


async def stats(client: httpx.AsyncClient) -> dict:
    return (await client.get("/v1/stats")).json()


# ---------------------------------------------------------------------------------------
# faults: each runs beside the load and returns (recovery seconds, notes)


async def hang_ups(ctx, phase_s: float) -> tuple[float | None, list[str]]:
    """`--hangups` heavy requests (100 steps x 4 images) whose clients leave after `--hangup-after-s`."""
    before = await stats(ctx.client)
    subjects = [SLOW] + ctx.subjects[1:]
    for i in range(ctx.args.hangups):
        heavy = {"subject": subjects[i % len(subjects)], "scene": "on the grass", "seed": i, "steps": 100,
                 "num_images": 4}
        try:
            await ctx.client.post("/v1/generate", json=heavy, timeout=ctx.args.hangup_after_s)
        except httpx.TimeoutException:
            pass
        await asyncio.sleep(max(phase_s * 0.8 / ctx.args.hangups - ctx.args.hangup_after_s, 0))
    while (after := await stats(ctx.client))["busy"]:
        await asyncio.sleep(0.05)
    stopped = after["stopped"] - before["stopped"]
    ctx.cpu_after = (f"{after['cpu_after_stop'] - before['cpu_after_stop']:.3f} s, "
                     f"{after['steps_after_stop'] - before['steps_after_stop']} steps / {stopped} stopped")
    rendered = after["images"] - before["images"]
    return None, [f"{ctx.args.hangups} clients hung up after {ctx.args.hangup_after_s} s, {stopped} requests "
                  f"stopped in the Generator; {rendered} images rendered in the phase (its 2xx: one each)"]


async def mlflow_outage(ctx, phase_s: float) -> tuple[float | None, list[str]]:
    """Stop the server for the phase; unknown subjects are asked for meanwhile."""
    await asyncio.to_thread(ctx.server.stop)
    unknown = []
    t_end = time.monotonic() + phase_s - 1
    while time.monotonic() < t_end:
        t0 = time.monotonic()
        r = await ctx.client.post("/v1/generate", json={"subject": f"new-{len(unknown)}", "scene": "x"})
        unknown.append((r.status_code, time.monotonic() - t0))
        await asyncio.sleep(2)
    codes = sorted({c for c, _ in unknown})
    return None, [f"unknown subjects during the outage: {len(unknown)} asked, status {codes}, "
                  f"slowest {max(t for _, t in unknown):.2f} s"]


async def replica_kill(ctx, phase_s: float) -> tuple[float | None, list[str]]:
    """`ray.kill` the Generator replica 1 s into the phase."""
    import ray

    await asyncio.sleep(1)
    name = next(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "#Generator#" in a["name"])
    ctx.fault_at = time.monotonic()
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    return None, ["killed " + name.split("#")[-1]]


async def damaged_cache(ctx, phase_s: float) -> tuple[float | None, list[str]]:
    """Damage the unet weights of a cached subject that is not in the replica's memory."""
    loaded = {m.split("@")[0] for m in (await stats(ctx.client))["loaded"]}
    victim = next(s for s in ctx.subjects if s not in loaded)
    weights = next((ctx.root / "cache" / victim).glob("v*/unet/diffusion_pytorch_model.safetensors"))
    data = weights.read_bytes()
    weights.write_bytes(data[:-64] + bytes(64))
    ctx.fault_at, ctx.victim = time.monotonic(), victim
    return None, [f"damaged {victim}'s cached unet weights"]


# ---------------------------------------------------------------------------------------
# phases and the table


class Context:
    def __init__(self, client, server, root, subjects, args):
        self.client, self.server, self.root, self.subjects, self.args = client, server, root, subjects, args
        self.fault_at, self.victim, self.cpu_after = None, None, "-"


def first_success_after(outcomes: list[Outcome], t: float, subject: str | None = None) -> float | None:
    done = [o.started + o.latency for o in outcomes
            if o.status == 200 and o.started >= t and (subject is None or o.subject == subject)]
    return min(done) - t if done else None


async def phase(ctx, name: str, fault, mix, refs, seed: int) -> Row:
    ctx.fault_at, ctx.victim, ctx.cpu_after = None, None, "-"
    healed = (await stats(ctx.client)).get("healed", 0)
    results = await asyncio.gather(load(ctx.client, mix, refs, ctx.args.phase_s, ctx.args.concurrency, seed),
                                   fault(ctx, ctx.args.phase_s) if fault else asyncio.sleep(0, (None, [])))
    outcomes, (recover_s, notes) = results
    if ctx.fault_at is not None:
        recover_s = first_success_after(outcomes, ctx.fault_at, ctx.victim)
    if name == "damaged cache":
        notes.append(f"healed {(await stats(ctx.client))['healed'] - healed}")
    return Row(name, outcomes, recover_s, ctx.cpu_after, notes)


async def mlflow_back(ctx) -> tuple[float, float]:
    """Start the server again; seconds it took, and seconds until a newly registered subject serves."""
    t0 = time.monotonic()
    await asyncio.to_thread(ctx.server.start)
    restart_s = time.monotonic() - t0
    await asyncio.to_thread(register_subjects, ctx.server, ctx.root, ["after-outage"])
    t0 = time.monotonic()
    while (await ctx.client.post("/v1/generate", json={"subject": "after-outage", "scene": "x"})).status_code != 200:
        await asyncio.sleep(0.2)
    return restart_s, time.monotonic() - t0


def quantiles(outcomes: list[Outcome]) -> tuple[float, float]:
    lat = sorted(o.latency for o in outcomes if o.status == 200) or [float("nan")]
    return statistics.median(lat), lat[min(len(lat) - 1, int(round(0.99 * (len(lat) - 1))))]


def print_table(rows: list[Row]) -> None:
    base50, base99 = quantiles(rows[0].outcomes)
    print("| fault | requests | 2xx | 4xx | 5xx | p50 s (x base) | p99 s (x base) | differing images | "
          "recovery s | CPU after hang-ups |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        codes = [o.status for o in row.outcomes]
        p50, p99 = quantiles(row.outcomes)
        rec = "-" if row.recover_s is None else f"{row.recover_s:.1f}"
        print(f"| {row.fault} | {len(codes)} | {sum(200 <= c < 300 for c in codes)} | "
              f"{sum(400 <= c < 500 for c in codes)} | {sum(c >= 500 for c in codes)} | "
              f"{p50:.2f} ({p50 / base50:.1f}x) | {p99:.2f} ({p99 / base99:.1f}x) | "
              f"{sum(o.differs for o in row.outcomes)} | {rec} | {row.cpu_after_hangup} |")
    for row in rows:
        for note in row.notes:
            print(f"- {row.fault}: {note}")


async def run_phases(url: str, server: LocalMlflowServer, root: Path, subjects: list[str], args) -> list[Row]:
    mix = request_mix(subjects, args.seeds)
    async with httpx.AsyncClient(base_url=url, timeout=120, headers=args.headers) as client:
        refs = await references(client, mix)
        ctx = Context(client, server, root, subjects, args)
        rows = [await phase(ctx, "baseline", None, mix, refs, 1),
                await phase(ctx, "clients hang up", hang_ups, mix, refs, 2),
                await phase(ctx, "MLflow stopped", mlflow_outage, mix, refs, 3)]
        restart_s, rows[-1].recover_s = await mlflow_back(ctx)
        rows[-1].notes.append(f"server restart took {restart_s:.1f} s; recovery = a subject registered after "
                              f"the restart served {rows[-1].recover_s:.1f} s later")
        rows.append(await phase(ctx, "Generator replica killed", replica_kill, mix, refs, 4))
        rows[-1].notes.append("recovery = first success of a request sent after the kill")
        rows.append(await phase(ctx, "damaged cache", damaged_cache, mix, refs, 5))
        rows[-1].notes.append("recovery = first success for the damaged subject after the damage")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subjects", type=int, default=4, help="subjects registered (>= 3)")
    ap.add_argument("--k", type=int, default=2, help="subjects per Generator replica (< --subjects)")
    ap.add_argument("--seeds", type=int, default=2, help="seeds per subject in the request mix")
    ap.add_argument("--steps", type=int, default=8, help="DDIM steps of the mixed load")
    ap.add_argument("--concurrency", type=int, default=3, help="clients of the mixed load")
    ap.add_argument("--phase-s", type=float, default=20.0, help="seconds of load per phase")
    ap.add_argument("--hangups", type=int, default=12, help="clients that hang up mid-request")
    ap.add_argument("--hangup-after-s", type=float, default=0.3, help="when they hang up")
    ap.add_argument("--swap-delay-s", type=float, default=0.5, help=f"injected delay of swapping {SLOW} in")
    args = ap.parse_args(argv)
    if args.subjects < 3 or args.k >= args.subjects:
        ap.error("need --subjects >= 3 and --k < --subjects (so that subjects are evicted)")
    torch.set_num_threads(1)
    import ray
    from ray import serve

    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="faults-") as tmp:
        root = Path(tmp)
        server = LocalMlflowServer(root / "mlflow")
        try:
            server.start()
            subjects = [f"subject-{i}" for i in range(args.subjects)]
            register_subjects(server, root, subjects)
            url = start_app(server, root, args)
            print(f"setup: mlflow server, {len(subjects)} subjects, app in {time.monotonic() - t_start:.0f} s")
            rows = asyncio.run(run_phases(url, server, root, subjects, args))
        finally:
            if ray.is_initialized():
                serve.shutdown()
                ray.shutdown()
            server.stop()
    print(f"faults: {args.subjects} subjects, K={args.k}, {args.concurrency} clients, {args.steps} steps, "
          f"{args.phase_s:.0f} s per phase, {SLOW} swap delay {args.swap_delay_s} s, "
          f"total {time.monotonic() - t_start:.0f} s")
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
