"""Full and LoRA subjects served side by side by one Generator replica (real MLflow registry,
local Ray, HTTP): each renders what the subject alone renders offline, LoRA subjects sit in their
own (larger) host-memory LRU, and same-subject requests arriving together share one sampler call."""
from __future__ import annotations

import asyncio
import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from comfusion.lora import SubjectSlot
from comfusion.models import load_base
from comfusion.sampling import sample
from test_lora_slot import _lora
from test_serve import Registry, cluster  # noqa: F401  (fixture)

pytestmark = pytest.mark.ray
FULL = {"alpha": 100}
LORA = {"lora-a": 2, "lora-b": 3, "lora-c": 4, "lora-d": 5}
SHAPES = {"lora-c": dict(rank=4, targets=("to_q", "to_v"))}  # the others: rank 2 on the four attention modules


class LoraRegistry(Registry):
    def add_lora(self, subject_id: str, seed: int) -> int:
        from jobs.tracking import register_checkpoint

        folder = _lora(self.root / "ckpt" / subject_id, seed, sid=subject_id, **SHAPES.get(subject_id, {}))
        run = self.client.create_run(self.experiment)
        version = register_checkpoint(self.client, run.info.run_id, folder, subject_id, "comfusion")
        self.client.set_terminated(run.info.run_id)
        self.folders[subject_id] = folder
        return version


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    reg = LoraRegistry(tmp_path_factory.mktemp("lora-serve"))
    reg.folders = {}
    for sid, seed in FULL.items():
        reg.add(sid, noise_seed=seed)
        reg.folders[sid] = next((reg.root / "ckpt").glob(f"{sid}-{seed}"))
    for sid, seed in LORA.items():
        reg.add_lora(sid, seed)
    return reg


@pytest.fixture(scope="module")
def http(cluster, registry, api_key):  # noqa: F811
    from ray import serve
    from serve.app import make_app
    from serve.settings import ServeSettings

    settings = ServeSettings(base="tiny", tracking_uri=registry.uri, cache_dir=str(registry.root / "cache"),
                             api_keys_file=api_key.file,
                             max_models_per_replica=1, max_adapters_per_replica=3, lora_max_rank=8,
                             default_steps=2, device="cpu",
                             registry_ttl_s=1.0, lookup_wait_s=10.0, batch_wait_s=0.3)
    app = make_app(settings, generator_options=dict(num_replicas=1, ray_actor_options={"num_cpus": 0.25}),
                   ingress_options=dict(num_replicas=1, ray_actor_options={"num_cpus": 0.25}))
    serve.run(app, name="lora", route_prefix="/")
    with httpx.Client(base_url=cluster, timeout=180, headers=api_key.headers) as client:
        yield client


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")).astype(int)


def request(subject: str, seed: int = 7) -> dict:
    return {"subject": subject, "prompt": "a sks dog in the snow", "seed": seed}


def offline(registry, subject: str, seeds: list[int]) -> np.ndarray:
    components = load_base("tiny")
    SubjectSlot(components).use_folder(registry.folders[subject])
    return sample(components, ["a sks dog in the snow"] * len(seeds), seeds, steps=2).images.astype(int)


def test_full_and_lora_subjects_side_by_side(http, registry):
    listed = {s["id"]: s["kind"] for s in http.get("/v1/subjects").json()["subjects"]}
    assert listed == {"alpha": "full", **{sid: "lora" for sid in LORA}}
    for sid in ["lora-a", "alpha", "lora-b", "lora-a", "alpha", "lora-c", "lora-d", "lora-a"]:
        r = http.post("/v1/generate", json=request(sid))
        assert r.status_code == 200, r.text
        assert np.abs(pixels(r.json()["images"][0]) - offline(registry, sid, [7])[0]).max() <= 1, sid
    stats = http.get("/v1/stats").json()
    assert stats["pipeline_builds"] == 1
    assert stats["adapters"] <= 3 and stats["adapter_evictions"] >= 1  # 4 LoRA subjects, room for 3
    assert len(stats["loaded"]) <= 1 and stats["lora_swaps"] >= 6
    # every LoRA swap into the padded adapter (rank 8), the rank-4 subject on fewer modules included:
    # rebuilt only after a full subject displaced it, never an unpadded load
    assert stats["slot_swaps"].get("unpadded_load", 0) == 0 and stats["slot_swaps"]["in_place"] >= 3, stats


def test_same_subject_requests_share_one_sampler_call(http, registry, cluster, api_key):  # noqa: F811
    before = http.get("/v1/stats").json()

    async def burst():
        async with httpx.AsyncClient(base_url=cluster, timeout=180, headers=api_key.headers) as client:
            return await asyncio.gather(*[client.post("/v1/generate", json=request("lora-b", seed=20 + i))
                                          for i in range(8)])

    responses = asyncio.run(burst())
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    after = http.get("/v1/stats").json()
    requests = after["batched_requests"] - before["batched_requests"]
    batches = after["batches"] - before["batches"]
    assert requests == 8 and batches < 8, (requests, batches)
    expected = offline(registry, "lora-b", [20 + i for i in range(8)])
    for i, r in enumerate(responses):
        assert r.json()["seeds"] == [20 + i]
        assert np.abs(pixels(r.json()["images"][0]) - expected[i]).max() <= 1
