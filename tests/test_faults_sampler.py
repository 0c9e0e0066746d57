"""The sampler's per-step cancel hook: no effect on the numbers, and a stop within one step."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from comfusion.sampling import SamplingCancelled, sample
from serve.guards import StopFlag, base_mismatch
from comfusion.checkpoint import SubjectMeta


def test_a_cancel_hook_that_never_fires_changes_nothing(tiny_base):
    plain = sample(tiny_base, ["a sks dog", "a cat"], [3, 4], steps=4)
    checked = sample(tiny_base, ["a sks dog", "a cat"], [3, 4], steps=4, cancel=StopFlag())
    assert np.array_equal(plain.images, checked.images) and torch.equal(plain.latents, checked.latents)


def test_a_stop_lands_before_the_next_step(tiny_base):
    calls = []

    def cancel() -> bool:
        calls.append(1)
        return len(calls) > 3  # three steps run, the fourth check stops

    with pytest.raises(SamplingCancelled):
        sample(tiny_base, ["a sks dog"], [1], steps=10, cancel=cancel)
    assert len(calls) == 4


def test_stop_flag_deadline_and_reason():
    flag = StopFlag(deadline=0.0)  # long past
    assert flag() and flag.reason == "timed out" and flag.steps == 0
    flag = StopFlag()
    assert not flag() and not flag() and flag.steps == 2
    flag.set("cancelled")
    assert flag() and flag.reason == "cancelled" and flag.cpu_after_stop >= 0


@pytest.mark.parametrize("base_model, seed, app_base, app_seed, ok", [
    ("tiny", 0, "tiny", 0, True),
    ("tiny", None, "tiny", 0, True),  # no seed recorded: only the base is compared
    ("tiny", 1, "tiny", 0, False),
    ("toy", 3, "toy", 0, True),  # a committed preset: its weights do not depend on a seed
    ("sd15-arch", 0, "tiny", 0, False),
])
def test_base_mismatch(base_model, seed, app_base, app_seed, ok):
    config = {} if seed is None else {"model": {"preset_seed": seed}}
    meta = SubjectMeta(id="x", identifier="sks", class_noun="dog", base_model=base_model, config=config)
    why = base_mismatch(meta, app_base, app_seed)
    assert (why is None) == ok
    if not ok:
        assert repr(base_model) in why and repr(app_base) in why
