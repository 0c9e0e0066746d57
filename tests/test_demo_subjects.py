"""The demo subjects: held-out toy-world instances whose photos pass the photo checks of demo.yaml."""
from pathlib import Path

import numpy as np
from PIL import Image

from comfusion.toy import world
from comfusion.config import load_config
from comfusion.data import check_subject
from jobs.demo_subjects import DEMO_SUBJECTS, demo_instance, write_demo_subjects

DEMO = Path(__file__).parents[1] / "configs" / "demo.yaml"


def test_demo_subjects_are_unseen_instances_named_by_their_colour():
    for sid, (seed, class_noun, _) in DEMO_SUBJECTS.items():
        instance = demo_instance(sid)
        assert seed >= world.HELD_OUT_SEED_START  # pretraining never drew it
        assert sid == f"{instance.colour}-{class_noun}" and instance.class_noun == class_noun


def test_photos_are_the_instances_in_the_room_and_pass_the_demo_checks(tmp_path):
    written = write_demo_subjects(tmp_path)
    cfg = load_config(DEMO, [f"data.root={tmp_path}"])
    assert {s.id for s in cfg.data.subjects} == set(written)
    for spec in cfg.data.subjects:
        subject = check_subject(spec, cfg.data, cfg.model.resolution)
        assert len(subject.pixels) >= cfg.train.num_instance_images
    for sid, paths in written.items():
        photo = np.asarray(Image.open(paths[0]))
        assert photo.shape == (32, 32, 3)
        assert np.array_equal(photo, world.instance_photos(demo_instance(sid), 1)[0])
        assert world.scene_of(photo)[0] == world.PHOTO_SCENE
        assert world.instance_distance(photo, demo_instance(sid), world.PHOTO_SCENE) < 1.0
