"""Toy-world scores without the confounds of issue 16: references in the asked scene (never the
training photo), scores over scene-correct pictures, paired bootstrap intervals."""
import math

import numpy as np
import pytest

from comfusion.toy import scores, world

SCENES = ["in the snow", "on the grass"]


def test_paired_bootstrap_hand_values():
    assert scores.paired_bootstrap([0.5, 0.5, 0.5]) == (0.5, 0.5, 0.5)  # no spread: a point
    mean, lo, hi = scores.paired_bootstrap([0.0, 1.0, 2.0, float("nan")], n_boot=20000)
    assert mean == 1.0 and 0.0 <= lo < 1.0 < hi <= 2.0  # NaN units dropped; the interval holds the mean
    assert lo == pytest.approx(2 - hi, abs=0.05)  # symmetric data, symmetric interval
    assert all(math.isnan(x) for x in scores.paired_bootstrap([float("nan")]))
    assert scores.paired_bootstrap([1.0, 2.0], seed=3) == scores.paired_bootstrap([1.0, 2.0], seed=3)


def test_frontier_gap_hand_values():
    # base: y = x through (0, 0) and (2, 2), the same for 3 instances; other lies 0.5 above it at x = 1
    base = {0: np.array([[0.0, 0.0]] * 3), 1: np.array([[2.0, 2.0]] * 3)}
    above = {0: np.array([[1.0, 1.5]] * 3)}
    assert scores.frontier_gap(base, above, n_boot=50) == (0.5, 0.5, 0.5, 1)
    outside = {0: np.array([[3.0, 9.0]] * 3)}  # beyond base's x range: not compared
    mean, lo, hi, n = scores.frontier_gap(base, outside, n_boot=50)
    assert n == 0 and math.isnan(mean) and math.isnan(lo)
    noisy = {0: np.array([[1.0, 0.0], [1.0, 1.0], [1.0, 2.0]])}  # per instance y - 1 = -1, 0, 1
    mean, lo, hi, n = scores.frontier_gap(base, noisy, n_boot=2000)
    assert mean == pytest.approx(0.0) and -1 <= lo < 0 < hi <= 1 and n == 1


def test_references_are_rendered_in_the_asked_scene_and_are_not_the_training_photo():
    inst = world.make_instance(world.HELD_OUT_SEED_START + 5, "ball")
    refs = scores.scene_references(inst, SCENES, n=3)
    assert refs.shape == (2, 3, 32, 32, 3) and refs.dtype == np.uint8
    assert [world.scene_of(im)[0] for im in refs.reshape(-1, 32, 32, 3)] == [s for s in SCENES for _ in range(3)]
    photo = world.instance_photos(inst, 1)[0]
    assert not any(np.array_equal(photo, r) for r in refs.reshape(-1, 32, 32, 3))


@pytest.fixture(scope="module")
def scorer():
    return scores.load_scorers(["toy"])


def test_scores_of_the_instance_beat_another_instance_and_ok_masks(scorer):
    inst = world.make_instance(world.HELD_OUT_SEED_START + 5, "ball")
    other = world.make_instance(world.HELD_OUT_SEED_START + 6, "ball")
    own = np.stack([[world.render(inst, s, 70_000 + i) for i in range(2)] for s in SCENES])  # (S, n, H, W, 3)
    wrong = np.stack([[world.render(other, s, 70_000 + i) for i in range(2)] for s in SCENES])
    room = np.stack([[world.render(inst, "in the room", 70_000 + i) for i in range(2)] for _ in SCENES])
    a, b, c = (scores.score_images(scorer, x, inst, SCENES) for x in (own, wrong, room))
    assert a["scene"] == 1.0 and a["inst"] < 1.0 and a["inst|ok"] == a["inst"] and a["both"] == 1.0
    assert a["toy/dino"] > b["toy/dino"] and a["inst"] < b["inst"]
    assert a["toy/clip_t"] > c["toy/clip_t"]  # the asked scene scores above the photo's room
    assert c["scene"] == 0.0 and math.isnan(c["inst|ok"]) and math.isnan(c["toy/dino|ok"])  # no right scene
    assert {"toy/dino", "toy/dino|ok", "toy/clip_i", "toy/clip_i|ok", "toy/clip_t", "toy/dino_photo"} <= set(a)
