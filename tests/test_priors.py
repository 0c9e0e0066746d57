"""Class-scene priors: the plan, the Parquet cache, the plain loop and the Ray Data pipeline."""
import collections
import hashlib
import json
import threading

import numpy as np
import pytest
import torch

from comfusion.config import ConfigError, PriorConfig, from_dict
from comfusion.prompts import PAPER_SCENES
from comfusion.priors import (PriorCacheError, commit_shard, generate_missing, missing_indices, open_cache,
                              plan_priors, prior_batches, read_priors)

SCENES = ["in the rain", "in the snow", "on the bed"]
CLASSES = ["dog", "cat"]


def tiny_cfg(**priors):
    """Tiny model, 3 DDIM steps, batches of 2, 6 priors over 3 scenes; one 2-CPU prior actor."""
    return from_dict({"model": {"base": "tiny"}, "data": {"scenes": SCENES},
                      "sampler": {"steps": 3, "guidance_scale": 7.5, "batch_size": 2},
                      "priors": {"count": 6, "seed": 0, **priors}, "job": {"cpus_per_trainer": 2}})


def unchecked_priors(cfg, **fields):
    """A config whose priors section skipped validation (as a hand-built object could)."""
    priors = PriorConfig()
    for k, v in {**vars(cfg.priors), **fields}.items():
        object.__setattr__(priors, k, v)
    object.__setattr__(cfg, "priors", priors)
    return cfg


def pngs_of(folder):
    return list(read_priors(folder).pngs)


def plain_run(storage, class_noun, tiny_base, **kw):
    """The no-Ray path, with as many torch threads as the Ray actor holds (2), so pixels match."""
    cfg = tiny_cfg()
    plan = plan_priors(class_noun, cfg)
    cache = open_cache(storage, plan)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        return generate_missing(plan, cache, tiny_base, cfg.sampler, progress=None, **kw), cache
    finally:
        torch.set_num_threads(threads)


def drop_shard(cache, which=0):
    """Delete one shard file and its manifest entry; returns the indices it held."""
    manifest = json.loads((cache.folder / "manifest.json").read_text())
    entry = manifest["shards"].pop(which)
    (cache.folder / entry["file"]).unlink()
    (cache.folder / "manifest.json").write_text(json.dumps(manifest))
    return entry["indices"]


def shard_file(cache, which=0):
    entry = json.loads((cache.folder / "manifest.json").read_text())["shards"][which]
    return cache.folder / entry["file"], entry["indices"]


# ---------------------------------------------------------------------------------------
# the plan (no Ray)


@pytest.mark.parametrize("count, scenes, sizes", [(200, PAPER_SCENES, {13, 14}), (6, SCENES, {2})])
def test_plan_balances_scenes(count, scenes, sizes):
    cfg = from_dict({"data": {"scenes": list(scenes)}, "priors": {"count": count}})
    rows = plan_priors("dog", cfg).rows()
    per_scene = collections.Counter(r.scene for r in rows)
    assert set(per_scene) == set(scenes) and set(per_scene.values()) == sizes
    assert sum(per_scene.values()) == count
    assert [r.index for r in rows] == list(range(count))
    assert all(r.prompt == f"a dog {r.scene}" for r in rows)


def test_seeds_are_deterministic_and_distinct():
    a, b = plan_priors("dog", tiny_cfg(count=200, max_count=200)), plan_priors("dog", tiny_cfg(count=200))
    assert [r.seed for r in a.rows()] == [r.seed for r in b.rows()]
    assert len({r.seed for r in a.rows()}) == 200
    expected = int.from_bytes(hashlib.sha256(b"0\x00dog\x003").digest()[:8], "big") & (2**63 - 1)
    assert a.row(3).seed == expected  # sha256 of (seed, class noun, index): stable across processes
    assert a.row(3).seed != plan_priors("cat", tiny_cfg()).row(3).seed
    assert a.row(3).seed != plan_priors("dog", tiny_cfg(seed=1)).row(3).seed


@pytest.mark.parametrize("override", [
    {"model.base": "sd15-arch"}, {"model.revision": "main"}, {"model.preset_seed": 1},
    {"data.scenes": ["in the rain", "in the snow"]}, {"priors.count": 5}, {"priors.seed": 1},
    {"sampler.steps": 4}, {"sampler.guidance_scale": 5.0}, {"model.resolution": 64},
])
def test_key_changes_with_every_keyed_field(override):
    cfg = tiny_cfg()
    assert plan_priors("dog", cfg).key == plan_priors("dog", tiny_cfg()).key
    assert plan_priors("dog", cfg.replace(**override)).key != plan_priors("dog", cfg).key


def test_key_ignores_unkeyed_fields():
    cfg = tiny_cfg()
    assert plan_priors("dog", cfg.replace(**{"sampler.batch_size": 7, "train.steps": 3})).key == \
        plan_priors("dog", cfg).key
    assert plan_priors("cat", cfg).key != plan_priors("dog", cfg).key


def test_prior_batches_are_aligned_groups():
    assert prior_batches(range(6), 4) == [[0, 1, 2, 3], [4, 5]]
    assert prior_batches([5, 1, 2], 2) == [[1], [2], [5]]


# ---------------------------------------------------------------------------------------
# the cache and the plain loop (no Ray)


def test_plain_loop_fills_cache_and_reads_back(tmp_path, tiny_base):
    report, cache = plain_run(tmp_path, "dog", tiny_base, shard_rows=2)
    assert (report.generated, report.reused) == (6, 0) and missing_indices(cache) == []
    assert len(json.loads((cache.folder / "manifest.json").read_text())["shards"]) == 3
    priors = read_priors(cache.folder)
    plan = plan_priors("dog", tiny_cfg())
    assert list(priors.prompts) == [r.prompt for r in plan.rows()]
    assert list(priors.seeds) == [r.seed for r in plan.rows()]
    assert priors.latents.shape == (6, 4, 16, 16) and priors.latents.dtype == torch.float32
    assert priors.image(0).shape == (32, 32, 3)
    again, _ = plain_run(tmp_path, "dog", tiny_base)
    assert (again.generated, again.reused) == (0, 6)


@pytest.mark.parametrize("damage", ["flip", "truncate", "rows", "gone"])
def test_damaged_shard_is_dropped_on_open(tmp_path, tiny_base, damage):
    _, cache = plain_run(tmp_path, "dog", tiny_base, shard_rows=2)
    path, indices = shard_file(cache, 1)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(bytes(data[:100]))
    elif damage == "gone":
        path.unlink()
    else:  # the manifest claims another row count
        manifest = json.loads((cache.folder / "manifest.json").read_text())
        manifest["shards"][1]["rows"] = 3
        (cache.folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PriorCacheError, match="damaged"):
        read_priors(cache.folder)
    reopened = open_cache(tmp_path, cache.plan)
    assert missing_indices(reopened) == indices
    assert len(json.loads((cache.folder / "manifest.json").read_text())["shards"]) == 2
    with pytest.raises(PriorCacheError, match="missing"):
        read_priors(cache.folder)


def test_concurrent_commits_keep_every_shard(tmp_path):
    plan = plan_priors("dog", tiny_cfg(count=16))
    caches = [open_cache(tmp_path, plan) for _ in range(8)]  # eight writers of one key
    z = np.zeros((2, 4, 16, 16), np.float32)
    threads = [threading.Thread(target=commit_shard, args=(c, [2 * k, 2 * k + 1], [b"x", b"y"], z))
               for k, c in enumerate(caches)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert missing_indices(open_cache(tmp_path, plan)) == []
    assert len(json.loads((caches[0].folder / "manifest.json").read_text())["shards"]) == 8


def test_open_cleans_temp_files_of_dead_writers_only(tmp_path):
    """A writer killed mid-shard leaves a temporary file; the next open removes it, a live one's stays."""
    import multiprocessing
    import os

    from comfusion import fsutil

    plan = plan_priors("dog", tiny_cfg())
    folder = open_cache(tmp_path, plan).folder
    child = multiprocessing.get_context("fork").Process(target=os.getpid)
    child.start()
    child.join()
    dead = folder / f".shard-0.parquet.tmp-{fsutil._HOST}-{child.pid}-0123abcd"
    live = fsutil.temp_sibling(folder / "shard-1.parquet")  # this process: alive
    dead.write_bytes(b"half a shard")
    live.write_bytes(b"being written")
    cache = open_cache(tmp_path, plan)
    assert not dead.exists() and live.exists()
    assert missing_indices(cache) == list(range(plan.count))


def test_commit_refuses_mismatched_rows(tmp_path):
    cache = open_cache(tmp_path, plan_priors("dog", tiny_cfg()))
    with pytest.raises(ValueError, match="matching"):
        commit_shard(cache, [0, 1], [b"x"], np.zeros((2, 4, 2, 2), np.float32))
    with pytest.raises(IndexError):
        commit_shard(cache, [6], [b"x"], np.zeros((1, 4, 2, 2), np.float32))


# ---------------------------------------------------------------------------------------
# Ray Data


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_run(ray_cluster, tmp_path_factory):
    """2 classes x 6 priors through one Ray Data pipeline."""
    from jobs.priors import make_priors

    storage = str(tmp_path_factory.mktemp("storage-a"))
    return storage, make_priors(tiny_cfg(), CLASSES, storage, progress=None)


@pytest.fixture
def no_ray_data(monkeypatch):
    """Records every Ray Data pipeline started (there should be none)."""
    import ray.data

    started = []
    real = ray.data.from_items
    monkeypatch.setattr(ray.data, "from_items", lambda *a, **k: started.append(a) or real(*a, **k))
    return started


@pytest.mark.ray
def test_ray_two_classes_rows_and_balance(ray_run):
    _, reports = ray_run
    assert set(reports) == set(CLASSES)
    for noun, report in reports.items():
        assert (report.generated, report.reused) == (6, 0)
        plan = plan_priors(noun, tiny_cfg())
        assert report.key == plan.key and report.folder.endswith(plan.key)
        priors = read_priors(report.folder)
        assert list(priors.prompts) == [r.prompt for r in plan.rows()]
        assert list(priors.seeds) == [r.seed for r in plan.rows()]
        assert collections.Counter(priors.scenes) == {s: 2 for s in SCENES}
        assert priors.latents.shape == (6, 4, 16, 16)
    assert pngs_of(reports["dog"].folder) != pngs_of(reports["cat"].folder)


@pytest.mark.ray
def test_ray_same_plan_twice_identical_and_matches_plain_loop(ray_run, tmp_path, tiny_base):
    from jobs.priors import make_priors

    _, first = ray_run
    second = make_priors(tiny_cfg(), ["dog"], str(tmp_path / "b"), progress=None)["dog"]
    assert second.generated == 6
    assert pngs_of(second.folder) == pngs_of(first["dog"].folder)
    assert torch.equal(read_priors(second.folder).latents, read_priors(first["dog"].folder).latents)
    plain, _ = plain_run(tmp_path / "c", "dog", tiny_base)
    assert pngs_of(plain.folder) == pngs_of(first["dog"].folder)


@pytest.mark.ray
def test_ray_second_run_generates_nothing(ray_run, no_ray_data, capsys):
    from jobs.priors import make_priors

    storage, first = ray_run
    again = make_priors(tiny_cfg(), CLASSES, storage)
    assert all((r.generated, r.reused) == (0, 6) for r in again.values())
    assert no_ray_data == []
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [f"priors for '{n}' (3 scenes): generated 0, reused 6 (key {first[n].key}, {first[n].folder})"
                     for n in CLASSES]


@pytest.mark.ray
def test_ray_completes_partial_and_damaged_sets(ray_run, tmp_path, tiny_base):
    from jobs.priors import make_priors

    _, first = ray_run
    _, dog = plain_run(tmp_path, "dog", tiny_base, shard_rows=2)  # 3 shards of one sampler batch each
    _, cat = plain_run(tmp_path, "cat", tiny_base, shard_rows=2)
    dropped = drop_shard(dog, 1)
    path, damaged = shard_file(cat, 2)
    path.write_bytes(path.read_bytes()[:-10])  # truncated
    reports = make_priors(tiny_cfg(), CLASSES, str(tmp_path), progress=None)
    assert (reports["dog"].generated, reports["dog"].reused) == (len(dropped), 6 - len(dropped)) == (2, 4)
    assert (reports["cat"].generated, reports["cat"].reused) == (len(damaged), 6 - len(damaged)) == (2, 4)
    for noun in CLASSES:  # same batches, same threads: the completed set is the from-scratch set
        assert pngs_of(reports[noun].folder) == pngs_of(first[noun].folder)


@pytest.mark.ray
@pytest.mark.parametrize("nouns, fields, error", [
    (["dog", ""], {}, ValueError),
    (["dog", "   "], {}, ValueError),
    (["dog"], {"count": 0}, ConfigError),
    (["dog"], {"count": 5001}, ConfigError),
    (["dog"], {"count": 7, "max_count": 6}, ConfigError),
])
def test_ray_bad_input_refused_before_any_work(ray_cluster, tmp_path, no_ray_data, nouns, fields, error):
    from jobs.priors import make_priors

    cfg = unchecked_priors(tiny_cfg(), **fields)
    with pytest.raises(error):
        make_priors(cfg, nouns, str(tmp_path / "s"), progress=None)
    assert no_ray_data == [] and not (tmp_path / "s").exists()


def test_config_refuses_bad_counts():
    with pytest.raises(ConfigError, match="priors.count"):
        tiny_cfg(count=0)
    with pytest.raises(ConfigError, match="priors.count"):
        tiny_cfg(count=7, max_count=6)


def test_plan_refuses_no_scenes():
    cfg = tiny_cfg()
    with pytest.raises(ConfigError, match="data.scenes"):
        plan_priors("dog", cfg, scenes=[])


def test_ensure_priors_plain_path(tmp_path, tiny_base):
    from comfusion.priors import ensure_priors

    first = ensure_priors("dog", tiny_cfg(), tmp_path, components=tiny_base, progress=None)
    again = ensure_priors("dog", tiny_cfg(), tmp_path, progress=None)  # nothing missing: no model load
    assert (first.generated, again.generated, again.reused) == (6, 0, 6)
    (tmp_path / "priors" / first.key / "manifest.json").write_text("{not json")
    healed = ensure_priors("dog", tiny_cfg(), tmp_path, components=tiny_base, progress=None)
    assert healed.generated == 6 and len(read_priors(healed.folder)) == 6
