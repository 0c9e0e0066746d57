"""The Serve app end to end: MLflow registry (sqlite + artifact folder in tmp), a local Ray
cluster, real HTTP. Subjects are the tiny base with seeded noise added, so their images differ.
"""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import importlib
import io
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from cluster_helpers import free_port, start_serve
import torch
import yaml
from PIL import Image

from comfusion.checkpoint import SubjectMeta, load_subject_weights_, save_subject_checkpoint, snapshot_weights
from comfusion.models import load_base

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[1]
SUBJECTS = {"alpha": ("sks", "dog"), "bravo": ("zwx", "cat"), "charlie": ("qrt", "ball"), "delta": ("vbn", "cube")}
K = 2
SIZE = 32  # the tiny preset's default


# ---------------------------------------------------------------------------------------
# fixtures: registry with subjects, a Ray cluster with the app


_free_port = free_port


class Registry:
    """An MLflow sqlite backend in tmp, and a way to train (fake) and register subjects."""

    def __init__(self, root: Path):
        from mlflow import MlflowClient

        self.root = root
        self.uri = f"sqlite:///{root}/mlflow.db"
        self.client = MlflowClient(tracking_uri=self.uri)
        self.experiment = self.client.create_experiment("serve-test", artifact_location=str(root / "artifacts"))
        self.base = load_base("tiny", seed=0)
        self.base_state = snapshot_weights(self.base)

    def checkpoint(self, subject_id: str, noise_seed: int, identifier: str = "sks", class_noun: str = "dog") -> Path:
        """The base plus seeded noise, saved as a subject checkpoint."""
        gen = torch.Generator().manual_seed(noise_seed)
        noisy = tuple({k: v + 0.05 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
                       for k, v in state.items()} for state in self.base_state)
        load_subject_weights_(self.base, noisy)
        meta = SubjectMeta(id=subject_id, identifier=identifier, class_noun=class_noun, base_model="tiny",
                           metrics={"eval/dino": 0.5})
        folder = save_subject_checkpoint(self.root / "ckpt" / f"{subject_id}-{noise_seed}", self.base["unet"],
                                         self.base["text_encoder"], meta, dtype="fp32")
        load_subject_weights_(self.base, self.base_state)
        return folder

    def add(self, subject_id: str, noise_seed: int, identifier: str = "sks", class_noun: str = "dog") -> int:
        """Log a checkpoint to its own run and register it (as the training job does)."""
        from jobs.tracking import register_checkpoint

        folder = self.checkpoint(subject_id, noise_seed, identifier, class_noun)
        run = self.client.create_run(self.experiment)
        self.client.log_metric(run.info.run_id, "eval/clip_t", 0.25)
        version = register_checkpoint(self.client, run.info.run_id, folder, subject_id, "comfusion")
        self.client.set_terminated(run.info.run_id)
        return version


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Registry:
    reg = Registry(tmp_path_factory.mktemp("serve"))
    for i, (sid, (identifier, noun)) in enumerate(SUBJECTS.items()):
        reg.add(sid, noise_seed=100 + i, identifier=identifier, class_noun=noun)
    return reg


@pytest.fixture(scope="module")
def settings(registry, api_key):
    from serve.settings import ServeSettings

    return ServeSettings(base="tiny", tracking_uri=registry.uri, cache_dir=str(registry.root / "cache"),
                         api_keys_file=api_key.file,
                         max_models_per_replica=K, default_steps=2, device="cpu", registry_ttl_s=1.0,
                         lookup_wait_s=10.0)  # the box is shared: a first sqlite lookup can take seconds


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster and Serve on a free port for the whole module."""
    import ray
    from ray import serve

    port = start_serve()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def url(cluster, settings):
    """The app, one replica of each deployment (so the stats are the replica's)."""
    from ray import serve
    from serve.app import make_app

    app = make_app(settings, generator_options=dict(num_replicas=1, ray_actor_options={"num_cpus": 0.25}),
                   ingress_options=dict(num_replicas=1, ray_actor_options={"num_cpus": 0.25}))
    serve.run(app, name="comfusion", route_prefix="/")
    return cluster


@pytest.fixture(scope="module")
def http(url, api_key):
    with httpx.Client(base_url=url, timeout=120, headers=api_key.headers) as client:
        yield client


def generate(http, subject="alpha", **body):
    body = {"subject": subject, "scene": "in the snow", "seed": 7, **body}
    return http.post("/v1/generate", json=body)


def decode(b64: str) -> Image.Image:
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    img.load()
    return img


# ---------------------------------------------------------------------------------------
# registry (no Ray)


def test_registry_resolves_lists_and_fetches(registry, tmp_path):
    from serve.registry import SubjectRegistry

    reg = SubjectRegistry(registry.uri, tmp_path / "cache", lookup_wait_s=60)  # a first sqlite call can be slow
    assert reg.resolve("nobody") is None and reg.resolve("../x") is None and reg.resolve("A") is None
    rec = reg.resolve("bravo")
    assert (rec.identifier, rec.class_noun, rec.method, rec.version) == ("zwx", "cat", "comfusion", 1)
    assert {r.id for r in reg.list_subjects()} >= set(SUBJECTS)
    folder = reg.fetch("bravo")
    assert folder == (tmp_path / "cache" / "bravo" / "v1").resolve() and (folder / "subject.json").is_file()
    assert [p.name for p in folder.parent.iterdir()] == ["v1"]  # no temporary folder left
    assert reg.fetch("bravo") == folder


def test_registration_refuses_bad_ids(registry):
    from jobs.tracking import register_checkpoint

    run = registry.client.create_run(registry.experiment)
    folder = registry.checkpoint("echo", 5)
    with pytest.raises(ValueError, match="invalid subject id"):
        register_checkpoint(registry.client, run.info.run_id, folder, "../echo", "comfusion")
    with pytest.raises(ValueError, match="is subject 'echo'"):
        register_checkpoint(registry.client, run.info.run_id, folder, "foxtrot", "comfusion")


def test_serve_yaml_parses_and_builds():
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load((REPO / "configs" / "serve.yaml").read_text()))
    (app_cfg,) = config.applications
    module, attr = app_cfg.import_path.split(":")
    builder = getattr(importlib.import_module(module), attr)
    assert callable(builder)
    app = builder(app_cfg.args)
    assert {d.name for d in app_cfg.deployments} == {"Ingress", "Generator"}
    assert app._bound_deployment.name == "Ingress"
    gen = next(d for d in app_cfg.deployments if d.name == "Generator")
    assert gen.ray_actor_options.num_gpus == 0 and gen.max_queued_requests > 0


# ---------------------------------------------------------------------------------------
# the app


def test_health_docs_and_subjects(http):
    assert http.get("/healthz").status_code == 200
    docs = http.get("/docs")
    assert docs.status_code == 200 and "https://" not in docs.text
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):  # served by the app: /docs works offline
        r = http.get(f"/docs/assets/{asset}")
        assert r.status_code == 200 and len(r.content) > 1000
    assert "/v1/generate" in http.get("/openapi.json").json()["paths"]
    listed = {s["id"]: s for s in http.get("/v1/subjects").json()["subjects"]}
    for sid, (identifier, noun) in SUBJECTS.items():
        assert (listed[sid]["identifier"], listed[sid]["class_noun"]) == (identifier, noun)
    assert listed["alpha"]["metrics"]["eval/clip_t"] == 0.25


def test_every_route_but_health_and_docs_needs_a_key(url, http, api_key):
    from serve.auth import create_key, revoke_key

    anonymous = httpx.Client(base_url=url, timeout=60)
    assert anonymous.get("/healthz").status_code == 200 and anonymous.get("/docs").status_code == 200
    for method, path in [("GET", "/v1/subjects"), ("GET", "/v1/stats"), ("POST", "/v1/generate")]:
        r = anonymous.request(method, path, json={"subject": "alpha", "scene": "x"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (path, r.text)
        r = anonymous.request(method, path, headers={"Authorization": "Bearer cfk_not-a-key"})
        assert r.status_code == 401 and r.json()["detail"] == "invalid API key"
    schema = http.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["API key"] == {
        "type": "http", "scheme": "bearer", "description": schema["components"]["securitySchemes"]["API key"]["description"]}
    assert schema["paths"]["/v1/generate"]["post"]["security"] == [{"API key": []}]
    assert "security" not in schema["paths"]["/healthz"]["get"]

    slow = create_key(api_key.file, "slow-user", rate_per_s=0.2, burst=2, replace=True)  # not an admin
    user = {"Authorization": f"Bearer {slow}"}
    deadline = time.monotonic() + 10  # the Ingress re-reads the key file within a second
    while anonymous.get("/v1/subjects", headers=user).status_code == 401:
        assert time.monotonic() < deadline, "a new key was not taken up"
        time.sleep(0.3)
    codes = [anonymous.get("/v1/subjects", headers=user) for _ in range(3)]
    assert codes[-1].status_code == 429 and int(codes[-1].headers["retry-after"]) >= 1, [c.status_code for c in codes]
    time.sleep(5.5)  # one token back at 0.2/s
    assert anonymous.get("/v1/stats", headers=user).status_code == 403  # stats: admin keys only
    assert revoke_key(api_key.file, "slow-user")
    deadline = time.monotonic() + 10
    while anonymous.get("/v1/subjects", headers=user).status_code != 401:
        assert time.monotonic() < deadline, "a revoked key kept working"
        time.sleep(0.3)
    anonymous.close()


def test_a_key_sees_its_own_and_the_operators_subjects_only(url, http, registry, api_key):
    from comfusion.registry import TAG_OWNER
    from serve.auth import create_key

    registry.add("owned", noise_seed=150)
    registry.client.set_registered_model_tag("owned", TAG_OWNER, "alice")  # made through the self-service API
    bob = {"Authorization": f"Bearer {create_key(api_key.file, 'bob', rate_per_s=100, burst=100, replace=True)}"}
    alice = {"Authorization": f"Bearer {create_key(api_key.file, 'alice', rate_per_s=100, burst=100, replace=True)}"}
    deadline = time.monotonic() + 20  # keys are re-read within a second; the listing within registry_ttl_s
    while "owned" not in {s["id"] for s in http.get("/v1/subjects").json()["subjects"]}:  # the admin key sees all
        assert time.monotonic() < deadline, "the owned subject was never listed"
        time.sleep(0.5)
    while http.get("/v1/subjects", headers=alice).status_code == 401:
        assert time.monotonic() < deadline, "the new keys were not taken up"
        time.sleep(0.3)
    listed = {who: {s["id"] for s in http.get("/v1/subjects", headers=h).json()["subjects"]}
              for who, h in (("alice", alice), ("bob", bob))}
    assert "owned" in listed["alice"] and "owned" not in listed["bob"]
    assert "alpha" in listed["alice"] and "alpha" in listed["bob"]  # subjects without an owner: everyone's
    body = {"subject": "owned", "scene": "in the snow", "seed": 1, "steps": 1}
    assert http.post("/v1/generate", json=body, headers=bob).status_code == 404
    assert http.post("/v1/generate", json=body, headers=alice).status_code == 200


def test_two_subjects_generate_distinct_valid_pngs(http):
    a, b = generate(http, "alpha", num_images=2), generate(http, "bravo", num_images=2)
    assert a.status_code == 200 and b.status_code == 200, (a.text, b.text)
    ja, jb = a.json(), b.json()
    assert ja["prompt"] == "a sks dog in the snow" and jb["prompt"] == "a zwx cat in the snow"
    assert ja["seeds"] == [7, 8] and ja["version"] == 1 and ja["subject"] == "alpha"
    for img in map(decode, ja["images"] + jb["images"]):
        assert img.format == "PNG" and img.size == (SIZE, SIZE)
    assert ja["images"][0] != jb["images"][0] and ja["images"][0] != ja["images"][1]
    again = generate(http, "alpha", num_images=2).json()
    assert again["images"] == ja["images"]  # same seed, same bytes


def test_size_prompt_and_random_seed(http):
    r = http.post("/v1/generate", json={"subject": "bravo", "prompt": "a zwx cat", "height": 48, "width": 64})
    assert r.status_code == 200, r.text
    body = r.json()
    assert decode(body["images"][0]).size == (64, 48) and body["prompt"] == "a zwx cat"
    assert isinstance(body["seeds"][0], int) and body["seeds"][0] >= 0


def test_accept_png_returns_the_image(http):
    r = http.post("/v1/generate", json={"subject": "alpha", "scene": "on the grass", "seed": 3},
                  headers={"Accept": "image/png"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content.startswith(b"\x89PNG") and r.headers["x-seed"] == "3"


@pytest.mark.parametrize("body, field", [
    ({"num_images": 5}, "num_images"),
    ({"steps": 0}, "steps"),
    ({"steps": 101}, "steps"),
    ({"guidance_scale": 21}, "guidance_scale"),
    ({"height": 30}, "height"),
    ({"width": 2048}, "width"),
    ({"seed": -1}, "seed"),
    ({"colour": "red"}, "colour"),
    ({"prompt": "a sks dog"}, "body"),  # scene and prompt both
    ({"scene": None}, "body"),  # neither
    ({"subject": "../x"}, "subject"),
    ({"subject": "a/b"}, "subject"),
    ({"subject": "%2e%2e"}, "subject"),
    ({"subject": "a" * 300}, "subject"),
    ({"subject": "Alpha"}, "subject"),
    ({"scene": "x" * 201}, "scene"),
])
def test_bad_requests_are_422_naming_the_field(http, body, field):
    r = generate(http, **body)
    assert r.status_code == 422, r.text
    assert field in r.json()["message"]


def test_malformed_json_and_unknown_subject(http):
    r = http.post("/v1/generate", content=b'{"subject": "alpha", "scene": ', headers={"content-type": "application/json"})
    assert r.status_code == 422
    r = http.post("/v1/generate", content=b"[1, 2]", headers={"content-type": "application/json"})
    assert r.status_code == 422
    r = generate(http, "nobody")
    assert r.status_code == 404 and "nobody" in r.json()["detail"]


def test_too_many_tokens_is_422_with_the_count(http):
    r = http.post("/v1/generate", json={"subject": "alpha", "prompt": "x" * 200})
    assert r.status_code == 422
    assert "202 tokens" in r.json()["message"] and "77" in r.json()["message"]
    assert r.json()["detail"][0]["field"] == "prompt"
    assert generate(http, scene="y" * 160).status_code == 422  # "a sks dog " + scene: > 77 tokens


def test_eviction_keeps_k_subjects_and_one_pipeline(http):
    for _ in range(2):
        for sid in SUBJECTS:
            r = generate(http, sid)
            assert r.status_code == 200, r.text
    stats = http.get("/v1/stats").json()
    assert stats["pipeline_builds"] == 1
    assert len(stats["loaded"]) <= K and stats["evictions"] >= len(SUBJECTS)
    assert stats["swaps"] >= 2 * len(SUBJECTS) and stats["rss_bytes"] > 0


def test_concurrent_requests_match_sequential(url, http, api_key):
    reqs = [(sid, 20 + i) for i, sid in enumerate(["alpha", "bravo"] * 3)]
    sequential = [generate(http, sid, seed=seed).json()["images"] for sid, seed in reqs]

    async def burst():
        async with httpx.AsyncClient(base_url=url, timeout=120, headers=api_key.headers) as client:
            rs = await asyncio.gather(*[client.post("/v1/generate", json={"subject": sid, "scene": "in the snow",
                                                                           "seed": seed}) for sid, seed in reqs])
        return [r.json()["images"] for r in rs]

    # Same-subject requests that arrive together share one sampler call (@serve.batch): a batch of 3
    # may round a pixel differently from 3 single calls, never more. Another subject's weights
    # (mixed in by a race) would change the picture entirely.
    together = asyncio.run(burst())
    for got, want in zip(together, sequential, strict=True):
        diff = [np.abs(np.asarray(decode(a), np.int16) - np.asarray(decode(b), np.int16)) for a, b in zip(got, want)]
        assert max(int(d.max()) for d in diff) <= 2 and max(float(d.mean()) for d in diff) < 0.05
    assert sequential[0] != sequential[1]


def test_subject_registered_after_start_becomes_servable(http, registry):
    assert generate(http, "late").status_code == 404
    registry.add("late", noise_seed=7)
    first = _poll(http, "late", version=1)
    registry.add("late", noise_seed=8)  # retrained: the alias moves to version 2
    second = _poll(http, "late", version=2)
    assert first["images"] != second["images"]
    assert {s["id"]: s["version"] for s in http.get("/v1/subjects").json()["subjects"]}["late"] == 2


def _poll(http, subject: str, version: int, timeout_s: float = 15) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        r = generate(http, subject)
        if r.status_code == 200 and r.json()["version"] == version:
            return r.json()
        assert time.monotonic() < deadline, (r.status_code, r.text)
        time.sleep(0.3)


def test_corrupt_checkpoint_is_a_500_with_a_message(http, registry, settings):
    registry.add("broken", noise_seed=9)
    source = registry.client.get_model_version_by_alias("broken", "serving").source
    weights = Path(source) / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    r = generate(http, "broken")
    assert r.status_code == 500
    assert "sha256" in r.json()["detail"] and "Traceback" not in r.text and settings.cache_dir not in r.text
    assert not (Path(settings.cache_dir) / "broken" / "v1").exists()
    assert generate(http, "alpha").status_code == 200  # the replica still serves


def test_overload_gives_503_with_retry_after(cluster, settings, api_key):
    """A second app whose Generator takes one request and queues one: a burst overflows."""
    from ray import serve
    from serve.app import make_app

    settings = dataclasses.replace(settings, request_timeout_s=600.0)  # a busy box: 503s, never a 504
    app = make_app(settings, generator_options=dict(num_replicas=1, max_ongoing_requests=1, max_queued_requests=1,
                                                    ray_actor_options={"num_cpus": 0.25}),
                   ingress_options=dict(num_replicas=1, ray_actor_options={"num_cpus": 0.25}))
    serve.run(app, name="overload", route_prefix="/overload")
    body = {"subject": "alpha", "scene": "in the rain", "seed": 1, "steps": 40, "height": 64, "width": 64}

    async def burst():
        async with httpx.AsyncClient(base_url=f"{cluster}/overload", timeout=120, headers=api_key.headers) as client:
            await client.post("/v1/generate", json={**body, "steps": 1})  # load the subject first
            return await asyncio.gather(*[client.post("/v1/generate", json=body) for _ in range(10)])

    try:
        rs = asyncio.run(burst())
    finally:
        serve.delete("overload")
    codes = [r.status_code for r in rs]
    assert 200 in codes and 503 in codes and set(codes) <= {200, 503}, codes
    assert all(r.headers.get("retry-after") == "1" for r in rs if r.status_code == 503)
