"""The registry contract (comfusion.registry) and its writing side (jobs.tracking), on a real
MLflow sqlite backend: idempotent registration after a kill, aliases that only move forward,
concurrent ComFusion / DreamBooth registrations that agree on `serving`."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

from comfusion import registry
from comfusion.checkpoint import SubjectMeta, save_subject_checkpoint
from comfusion.registry import SERVING_ALIAS, VersionInfo, better, choose_alias_target
from jobs.tracking import (EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, MlflowOutage, PatientClient, RunLogger,
                           experiment_id, register_checkpoint)

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------
# the pure rule


def V(version, method="comfusion", subject="dog", retired=False):
    return VersionInfo(version, method, subject, retired)


def test_comfusion_beats_dreambooth_then_newer_beats_older():
    assert better(V(1), V(2, "dreambooth")) and not better(V(2, "dreambooth"), V(1))
    assert better(V(3), V(1)) and not better(V(1), V(3))
    assert better(V(2, "dreambooth"), V(1, "dreambooth"))


def test_alias_target_never_moves_backwards_nor_to_other_subjects_or_retired():
    versions = [V(1), V(2, "dreambooth"), V(3, subject="cat"), V(4, retired=True), V(5, "dreambooth")]
    assert choose_alias_target("dog", SERVING_ALIAS, None, versions) == V(1)
    assert choose_alias_target("dog", "dreambooth", None, versions) == V(5, "dreambooth")
    assert choose_alias_target("dog", SERVING_ALIAS, V(6), versions) == V(6)  # forced and newer: kept
    assert choose_alias_target("dog", SERVING_ALIAS, V(4, retired=True), versions) == V(1)
    assert choose_alias_target("dog", "comfusion", None, [V(2, "dreambooth")]) is None
    assert choose_alias_target("dog", SERVING_ALIAS, None, [V(7, subject="")]) == V(7, subject="")  # legacy


def test_contract_names():
    assert registry.model_name("duck-toy") == "duck-toy"
    with pytest.raises(ValueError, match="invalid subject id"):
        registry.model_name("../x")
    with pytest.raises(ValueError, match="unknown method"):
        registry.method_alias("textual_inversion")
    tags = registry.version_tags("dog", "sks", "dog", "comfusion", "2026-01-01T00:00:00+00:00")
    assert set(tags) == set(registry.VERSION_TAGS)
    assert registry.version_info(3, {**tags, registry.TAG_RETIRED: "true"}) == V(3, retired=True)


# ---------------------------------------------------------------------------------------
# registration on a real backend


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_base):
    """Subject checkpoints `dog` (one per method) and `cat`, saved from the tiny base."""
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for sid, method in (("dog", "comfusion"), ("dog", "dreambooth"), ("cat", "comfusion")):
        meta = SubjectMeta(id=sid, identifier="sks", class_noun=sid, base_model="tiny", method=method,
                           config={}, metrics={})
        out[(sid, method)] = save_subject_checkpoint(root / f"{sid}-{method}", tiny_base["unet"],
                                                     tiny_base["text_encoder"], meta, dtype="fp16")
    return out


@pytest.fixture
def backend(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = experiment_id(client, "regtest", tmp_path)
    return uri, client, exp


def _run(client, exp, sid="dog", method="comfusion"):
    return client.create_run(exp, tags={"subject": sid, "method": method}).info.run_id


def _serving(client, name):
    return int(client.get_model_version_by_alias(name, SERVING_ALIAS).version)


def test_experiment_is_tagged_for_the_training_view(backend, tmp_path):
    uri, client, exp = backend
    assert client.get_experiment(exp).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    old = client.create_experiment("untagged", artifact_location=(tmp_path / "a").as_uri())
    assert experiment_id(client, "untagged", tmp_path) == old
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND


KILLED_REGISTRATION = textwrap.dedent("""
    import os, signal, sys
    from mlflow import MlflowClient
    from jobs.tracking import register_checkpoint
    uri, run_id, folder = sys.argv[1:4]
    def die(*a, **k):  # the worker is killed right after the version exists, before any alias
        os.kill(os.getpid(), signal.SIGKILL)
    MlflowClient.set_registered_model_alias = die
    register_checkpoint(MlflowClient(uri), run_id, folder, "dog", "comfusion")
""")


def test_worker_killed_between_version_and_alias_then_retried(backend, checkpoints):
    uri, client, exp = backend
    run_id = _run(client, exp)
    folder = checkpoints[("dog", "comfusion")]
    child = subprocess.run([sys.executable, "-c", KILLED_REGISTRATION, uri, run_id, str(folder)],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
    assert child.returncode == -9, child.stderr[-2000:]
    assert len(client.search_model_versions(f"run_id = '{run_id}'")) == 1  # the version exists ...
    assert not client.get_registered_model("dog").aliases  # ... but nothing serves it
    with pytest.raises(MlflowException):
        client.get_model_version_by_alias("dog", SERVING_ALIAS)

    version = RunLogger(uri, run_id).finish(folder, "dog", "comfusion", {"final/step": 3})  # the retry
    versions = client.search_model_versions(f"run_id = '{run_id}'")
    assert [int(v.version) for v in versions] == [version] == [1]
    assert _serving(client, "dog") == 1
    assert int(client.get_model_version_by_alias("dog", "comfusion").version) == 1
    mv = client.get_model_version("dog", "1")
    assert mv.tags[registry.TAG_SUBJECT] == "dog" and mv.tags[registry.TAG_METHOD] == "comfusion"
    assert RunLogger(uri, run_id).finish(folder, "dog", "comfusion", {"final/step": 3}) == 1  # and again
    assert len(client.search_model_versions("name = 'dog'")) == 1
    assert len(client.get_metric_history(run_id, "final/step")) == 1


def test_serving_moves_only_forward_unless_forced(backend, checkpoints):
    uri, client, exp = backend
    reg = lambda method, **kw: register_checkpoint(client, _run(client, exp, method=method),  # noqa: E731
                                                   checkpoints[("dog", method)], "dog", method, **kw)
    assert reg("comfusion") == 1 and _serving(client, "dog") == 1
    assert reg("dreambooth") == 2 and _serving(client, "dog") == 1  # the baseline never displaces ComFusion
    assert int(client.get_model_version_by_alias("dog", "dreambooth").version) == 2
    assert reg("comfusion") == 3 and _serving(client, "dog") == 3  # a newer ComFusion version does
    assert reg("dreambooth", force_serving=True) == 4 and _serving(client, "dog") == 4  # forced
    client.set_model_version_tag("dog", "3", registry.TAG_RETIRED, "true")  # roll back v3 for good
    client.set_registered_model_alias("dog", SERVING_ALIAS, "1")
    assert reg("dreambooth") == 5 and _serving(client, "dog") == 1  # v3 retired, v1 beats every DreamBooth
    with pytest.raises(ValueError, match="is subject 'cat'"):
        register_checkpoint(client, _run(client, exp), checkpoints[("cat", "comfusion")], "dog", "comfusion")


def test_concurrent_registrations_agree_on_serving(backend, checkpoints):
    """Six jobs register at once (4 ComFusion, 2 DreamBooth): serving ends on the newest ComFusion
    version, whatever order the check-then-set steps interleave in."""
    uri, client, exp = backend
    jobs = ["dreambooth", "comfusion", "dreambooth", "comfusion", "comfusion", "comfusion"]
    runs = [(_run(client, exp, method=m), m) for m in jobs]
    errors = []

    def register(run_id, method):
        try:
            register_checkpoint(PatientClient(MlflowClient(uri), 60), run_id, checkpoints[("dog", method)], "dog",
                                method)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=register, args=r) for r in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert errors == []
    versions = {int(v.version): v.tags[registry.TAG_METHOD] for v in client.search_model_versions("name = 'dog'")}
    assert len(versions) == 6
    assert _serving(client, "dog") == max(v for v, m in versions.items() if m == "comfusion")
    assert int(client.get_model_version_by_alias("dog", "dreambooth").version) == \
        max(v for v, m in versions.items() if m == "dreambooth")


# ---------------------------------------------------------------------------------------
# the patient client, with a fake clock


class _Flaky:
    def __init__(self, failures, exc):
        self.failures, self.exc, self.calls = failures, exc, 0

    def __call__(self):
        self.calls += 1
        if self.calls <= self.failures:
            raise self.exc
        return "ok"


def _patient(outage_s):
    now = [0.0]
    client = PatientClient(MlflowClient("sqlite:///:memory:"), outage_s, sleep=lambda s: now.__setitem__(0, now[0] + s),
                           clock=lambda: now[0])
    return client, now


def test_patient_client_retries_transient_failures_within_the_limit():
    client, now = _patient(30)
    flaky = _Flaky(5, MlflowException("connection refused"))  # INTERNAL_ERROR: 500
    assert client.call(flaky) == "ok" and flaky.calls == 6 and now[0] < 30
    flaky = _Flaky(100, ConnectionError("down"))
    with pytest.raises(MlflowOutage, match="more than 30 s"):
        client.call(flaky)
    assert 30 <= now[0] < 70
    bad = _Flaky(1, MlflowException("no such run", error_code=RESOURCE_DOES_NOT_EXIST))
    with pytest.raises(MlflowException, match="no such run"):  # a client error is not retried
        client.call(bad)
    assert bad.calls == 1
