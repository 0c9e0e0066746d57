"""The Serve app through faults (issue 13), end to end: a real `mlflow server` on a free port that
the tests pause and stop, a local Ray cluster, the app, real HTTP.

One subject (`slow-swap`) is swapped in with an injected 1.5 s delay, so a client can hang up
deterministically while its weights are being copied.
"""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest
from cluster_helpers import start_serve
import torch

from comfusion.checkpoint import SubjectMeta, load_subject_weights_, save_subject_checkpoint, snapshot_weights
from comfusion.models import load_base
from serve.local_mlflow import LocalMlflowServer

pytestmark = pytest.mark.ray
TTL_S = 1.0
TIMEOUT_S = 8.0  # the app's request timeout
SWAP_DELAY_S = 1.5
K = 2


class Subjects:
    """Writes tiny subjects (the base plus seeded noise) and registers them through the server."""

    def __init__(self, server: LocalMlflowServer, root: Path):
        from mlflow import MlflowClient

        self.server, self.root = server, root
        self.client = MlflowClient(tracking_uri=server.uri)
        self.experiment = self.client.create_experiment("faults-test")
        self.base = load_base("tiny", seed=0)
        self.base_state = snapshot_weights(self.base)

    def add(self, subject_id: str, noise_seed: int, base_model: str = "tiny", preset_seed: int = 0) -> int:
        from jobs.tracking import register_checkpoint

        gen = torch.Generator().manual_seed(noise_seed)
        noisy = tuple({k: v + 0.05 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
                       for k, v in state.items()} for state in self.base_state)
        load_subject_weights_(self.base, noisy)
        meta = SubjectMeta(id=subject_id, identifier="sks", class_noun="dog", base_model=base_model,
                           config={"model": {"base": base_model, "preset_seed": preset_seed}})
        folder = save_subject_checkpoint(self.root / f"{subject_id}-{noise_seed}", self.base["unet"],
                                         self.base["text_encoder"], meta, dtype="fp32")
        load_subject_weights_(self.base, self.base_state)
        run = self.client.create_run(self.experiment)
        version = register_checkpoint(self.client, run.info.run_id, folder, subject_id, "comfusion")
        self.client.set_terminated(run.info.run_id)
        return version

    def stored_file(self, subject_id: str, rel: str = "unet/diffusion_pytorch_model.safetensors") -> Path:
        """The registry's own copy of a file of the subject's serving version (on the server's disk)."""
        mv = self.client.get_model_version_by_alias(subject_id, "serving")
        return next(self.server.artifacts.glob(f"*/{mv.run_id}/artifacts/checkpoint/{rel}"))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    server = LocalMlflowServer(root / "mlflow").start()
    try:
        subjects = Subjects(server, root / "ckpt")
        for i, sid in enumerate(["alpha", "bravo", "charlie", "slow-swap"]):
            subjects.add(sid, noise_seed=200 + i)
        subjects.add("other-seed", noise_seed=300, preset_seed=5)
        subjects.add("other-base", noise_seed=301, base_model="sd15-arch")
        yield subjects, root
    finally:
        server.stop()


@pytest.fixture(scope="module")
def settings(world, api_key):
    from serve.settings import ServeSettings

    subjects, root = world
    return ServeSettings(base="tiny", tracking_uri=subjects.server.uri, cache_dir=str(root / "cache"),
                         api_keys_file=api_key.file,
                         max_models_per_replica=K, default_steps=2, device="cpu", registry_ttl_s=TTL_S,
                         request_timeout_s=TIMEOUT_S, max_body_bytes=4096, registry_timeout_s=5, registry_retries=0,
                         lookup_wait_s=1.5, cache_max_mb=10.0, fault_slow_subject="slow-swap",
                         fault_swap_delay_s=SWAP_DELAY_S)


@pytest.fixture(scope="module")
def serve_port():
    """A local Ray cluster with Serve on a free port (started before the slower MLflow set-up)."""
    import ray
    from ray import serve

    port = start_serve()
    try:
        yield port
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def url(serve_port, settings):
    from ray import serve

    from serve.app import make_app

    app = make_app(settings, generator_options=dict(num_replicas=1, ray_actor_options={"num_cpus": 0.25}),
                   ingress_options=dict(num_replicas=1, ray_actor_options={"num_cpus": 0.25}))
    serve.run(app, name="faults", route_prefix="/")
    return f"http://127.0.0.1:{serve_port}"


@pytest.fixture(scope="module")
def http(url, api_key):
    with httpx.Client(base_url=url, timeout=120, headers=api_key.headers) as client:
        yield client


def body(subject: str, seed: int = 7, **extra) -> dict:
    return {"subject": subject, "scene": "in the snow", "seed": seed, **extra}


def images(http, subject: str, seed: int = 7, **extra) -> list[str]:
    r = http.post("/v1/generate", json=body(subject, seed, **extra))
    assert r.status_code == 200, r.text
    return r.json()["images"]


def stats(http) -> dict:
    return http.get("/v1/stats").json()


def wait_idle(http, timeout_s: float = 30) -> float:
    """Seconds until the Generator owns no request."""
    t0 = time.monotonic()
    while stats(http)["busy"]:
        assert time.monotonic() - t0 < timeout_s, "the Generator stayed busy"
        time.sleep(0.05)
    return time.monotonic() - t0


async def hang_up(url: str, payload: dict, after_s: float, headers: dict) -> None:
    """Send a request and drop the connection after `after_s` seconds."""
    async with httpx.AsyncClient(base_url=url, headers=headers) as client:
        with pytest.raises(httpx.TimeoutException):
            await client.post("/v1/generate", json=payload, timeout=after_s)


@pytest.fixture(scope="module")
def reference(http):
    """Images of a quiet app, one request after another."""
    return {sid: images(http, sid) for sid in ("alpha", "bravo", "slow-swap")}


# ---------------------------------------------------------------------------------------
# 1. cancellation-safe generation


def test_hang_up_during_a_slow_swap_never_mixes_weights(url, http, reference):
    images(http, "alpha")  # alpha's weights are in the pipeline
    before = stats(http)

    async def scenario():
        async with httpx.AsyncClient(base_url=url, timeout=120, headers=http.headers) as client:
            hung = asyncio.create_task(client.post("/v1/generate", json=body("slow-swap", steps=30)))
            while not (await client.get("/v1/stats")).json()["busy"]:  # slow-swap's copy has started
                await asyncio.sleep(0.02)
            alpha = asyncio.create_task(client.post("/v1/generate", json=body("alpha")))
            await asyncio.sleep(0.3)
            hung.cancel()  # the client hangs up while the copy is still running
            return await alpha

    alpha = asyncio.run(scenario())
    assert alpha.status_code == 200, alpha.text
    assert alpha.json()["images"] == reference["alpha"]  # not rendered with slow-swap's weights
    after = stats(http)
    assert after["swaps"] - before["swaps"] == 2  # the interrupted swap completed, then alpha's
    assert after["stopped"] - before["stopped"] == 1
    assert images(http, "alpha") == reference["alpha"]  # and the pipeline is not left mixed
    assert images(http, "slow-swap") == reference["slow-swap"]


def test_hang_up_stops_compute_within_one_step(url, http):
    images(http, "alpha")
    before = stats(http)
    heavy = body("alpha", steps=100, num_images=4, height=128, width=128)
    asyncio.run(hang_up(url, heavy, after_s=1.0, headers=http.headers))
    idle_after = wait_idle(http)
    after = stats(http)
    assert after["stopped"] - before["stopped"] == 1
    assert after["steps_after_stop"] - before["steps_after_stop"] <= 1
    assert after["images"] == before["images"]  # nothing rendered or decoded for the gone client
    assert idle_after < 30.0, idle_after  # one step (slow on the shared box), not the whole request


def test_request_timeout_cannot_be_lifted_by_the_client(http):
    before = stats(http)
    t0 = time.monotonic()
    r = http.post("/v1/generate", json=body("alpha", steps=100, num_images=4, height=128, width=128),
                  headers={"x-request-timeout-seconds": "0", "x-request-disconnect-disabled": "?1"})
    took = time.monotonic() - t0
    assert r.status_code == 504, r.text
    assert "request timeout" in r.json()["detail"]
    assert TIMEOUT_S - 0.5 < took < TIMEOUT_S + 6, took
    wait_idle(http)
    after = stats(http)
    assert after["stopped"] - before["stopped"] == 1 and after["images"] == before["images"]
    assert after["steps_after_stop"] - before["steps_after_stop"] <= 1


def test_body_size_is_capped(http):
    big = {"subject": "alpha", "scene": "x" * 10_000}
    r = http.post("/v1/generate", json=big)
    assert r.status_code == 413 and "4096 bytes" in r.json()["detail"]

    def chunks():  # no Content-Length: counted as it arrives
        yield b'{"subject": "alpha", "scene": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}'

    r = http.post("/v1/generate", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


# ---------------------------------------------------------------------------------------
# 4. matching bases


@pytest.mark.parametrize("subject, theirs, ours", [
    ("other-seed", "'tiny' (preset seed 5)", "'tiny' (preset seed 0)"),
    ("other-base", "'sd15-arch'", "'tiny' (preset seed 0)"),
])
def test_a_subject_of_another_base_is_refused_naming_both(http, subject, theirs, ours):
    r = http.post("/v1/generate", json=body(subject))
    assert r.status_code == 409, r.text
    detail = r.json()["detail"]
    assert subject in detail and f"trained on base {theirs}" in detail and f"serves base {ours}" in detail


# ---------------------------------------------------------------------------------------
# 3. self-healing caches


def _version_dir(settings, subject: str, version: int = 1) -> Path:
    return Path(settings.cache_dir) / subject / f"v{version}"


def _evict_from_replica(http, keep_out: str) -> None:
    for sid in ("alpha", "bravo", "charlie"):
        if sid != keep_out:
            images(http, sid)
    assert f"{keep_out}@v1" not in stats(http)["loaded"]


def test_a_damaged_cached_file_is_fetched_again(http, settings, reference):
    images(http, "bravo")
    _evict_from_replica(http, "bravo")
    weights = _version_dir(settings, "bravo") / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-16] + b"\xff" * 16)
    healed = stats(http)["healed"]
    assert images(http, "bravo") == reference["bravo"]
    assert stats(http)["healed"] == healed + 1
    from comfusion.checkpoint import verify_checkpoint

    assert verify_checkpoint(_version_dir(settings, "bravo")).id == "bravo"


def test_a_subject_that_cannot_be_made_whole_is_named(http, world, settings):
    subjects, root = world
    subjects.add("broken", noise_seed=400)
    stored = subjects.stored_file("broken")
    stored.write_bytes(stored.read_bytes()[:-16] + b"\0" * 16)  # the registry's copy is damaged too
    r = http.post("/v1/generate", json=body("broken"))
    assert r.status_code == 500, r.text
    detail = r.json()["detail"]
    assert "'broken' version 1" in detail and "sha256" in detail
    assert str(root) not in r.text and "artifacts" not in r.text
    assert images(http, "alpha")  # the replica still serves


def test_disk_cache_stays_under_its_bound(http, settings):
    for sid in ("alpha", "bravo", "charlie", "slow-swap"):
        images(http, sid)
    folders = [p for p in Path(settings.cache_dir).glob("*/v*") if (p / "subject.json").is_file()]
    total = sum(f.stat().st_size for p in folders for f in p.rglob("*") if f.is_file())
    assert total <= settings.cache_max_mb * 2**20, (total, folders)
    assert _version_dir(settings, "slow-swap").is_dir()  # the one fetched last stays
    assert len(folders) < 4


def test_a_new_version_evicts_the_old_one_from_the_disk_cache(http, world, settings):
    subjects, _ = world
    subjects.add("retrained", noise_seed=600)
    first = _poll_version(http, "retrained", 1)
    subjects.add("retrained", noise_seed=601)
    second = _poll_version(http, "retrained", 2)
    assert first != second
    assert sorted(p.name for p in (Path(settings.cache_dir) / "retrained").iterdir()) == ["v2"]


def _poll_version(http, subject: str, version: int) -> list[str]:
    t0 = time.monotonic()
    while True:
        r = http.post("/v1/generate", json=body(subject))
        if r.status_code == 200 and r.json()["version"] == version:
            return r.json()["images"]
        assert time.monotonic() - t0 < TTL_S + 15, r.text
        time.sleep(0.2)


# ---------------------------------------------------------------------------------------
# 2. serving through a registry outage (last: the server is paused, then stopped)


def test_known_subjects_are_served_while_mlflow_hangs(url, http, world, reference):
    subjects, _ = world
    quiet = max(_timed(http, "alpha", reference) for _ in range(3))
    listed = http.get("/v1/subjects").json()
    subjects.server.pause()
    try:
        time.sleep(TTL_S + 0.5)  # every cached record is now older than the TTL
        for _ in range(3):  # one MLflow wait would add >= 1.5 s (lookup_wait_s), a call 5 s
            assert _timed(http, "alpha", reference) < 2 * quiet + 1.0  # 2x, and 1 s for the shared box
        t0 = time.monotonic()
        r = http.get("/v1/subjects")
        assert r.status_code == 200 and r.json() == listed and time.monotonic() - t0 < 2 * quiet + 1.0
        for unknown in ("nobody", "nobody-else"):
            t0 = time.monotonic()
            r = http.post("/v1/generate", json=body(unknown))
            assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
            assert time.monotonic() - t0 < 2.0
    finally:
        subjects.server.resume()
    subjects.add("after-outage", noise_seed=500)
    t0 = time.monotonic()
    while (r := http.post("/v1/generate", json=body("after-outage"))).status_code != 200:
        assert time.monotonic() - t0 < TTL_S + 10, r.text
        time.sleep(0.2)


def _timed(http, subject: str, reference: dict) -> float:
    t0 = time.monotonic()
    assert images(http, subject) == reference[subject]
    return time.monotonic() - t0


def test_known_subjects_are_served_while_mlflow_is_stopped(http, world, reference):
    subjects, _ = world
    subjects.server.stop()
    time.sleep(TTL_S + 0.5)
    assert images(http, "alpha") == reference["alpha"]
    assert http.get("/v1/subjects").status_code == 200
    t0 = time.monotonic()
    r = http.post("/v1/generate", json=body("nobody-at-all"))
    assert r.status_code == 503 and time.monotonic() - t0 < 2.0
