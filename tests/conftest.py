"""Shared test set-up: no hub access, a project-local model cache, tiny models."""
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DREAMBOOTH = REPO.parent / "shared" / "datasets" / "dreambooth"

# No machine here reaches a model hub; presets are written to a cache folder inside the repo.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# One torch thread per process: with 2 cores shared by Ray workers, more threads oversubscribe
# them badly (and thread count changes float rounding, so results stay reproducible).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Tests start their own local Ray cluster even when `make demo` left one running.
os.environ.setdefault("RAY_ADDRESS", "local")
os.environ.setdefault("COMFUSION_CACHE", str(REPO / ".cache" / "comfusion-test"))


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """One intra-op thread in the test process too (as in each 1-CPU Ray actor): on 2 shared cores
    two spinning threads ran tiny steps ~50x slower, and the plain loops then match the pipelines."""
    import torch

    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def api_key(tmp_path_factory):
    """A key file with one admin key (rate high enough for load tests): `.file`, `.key`, `.headers`."""
    from types import SimpleNamespace

    from serve.auth import local_key

    path, headers = local_key(tmp_path_factory.mktemp("keys"), "tests")
    return SimpleNamespace(file=path, headers=headers)


@pytest.fixture(scope="session")
def tiny_base():
    from comfusion.models import load_base

    return load_base("tiny")
