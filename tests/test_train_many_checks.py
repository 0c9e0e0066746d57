"""jobs/train_many.py's checks before any compute (no Ray): a subject with fewer photos than the
training setting uses is reported by name with the field; the others go on."""
from pathlib import Path

from comfusion.config import load_config
from jobs import train_many
from jobs.demo_subjects import write_demo_subjects

DEMO = Path(__file__).parents[1] / "configs" / "demo.yaml"


def test_too_few_photos_for_num_instance_images(tmp_path):
    write_demo_subjects(tmp_path)
    subjects = ("[{id: one-photo, class_noun: ball, images: [yellow-ball/00.png]},"
                " {id: three, class_noun: box, images: [blue-box/00.png, blue-box/01.png, blue-box/02.png]}]")
    cfg = load_config(DEMO, [f"data.root={tmp_path}", f"data.subjects={subjects}", "train.num_instance_images=2"])
    good, errors = train_many.check_subjects(cfg)
    assert [s.id for s in good] == ["three"]
    assert list(errors) == ["one-photo"]
    assert "1 photo(s)" in errors["one-photo"][0] and "train.num_instance_images is 2" in errors["one-photo"][0]


def test_one_line_errors_show_a_workers_cause():
    from jobs.train_worker import one_line

    ray_error = RuntimeError("Training failed due to worker errors: [Rank 0 Error Snippet]: "
                             "Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n"
                             "ValueError: subject 'can' has 1 image(s)\n")
    assert one_line(ray_error) == "ValueError: subject 'can' has 1 image(s)"
    assert one_line(ValueError("subject 'x' is invalid:\n  - a.png: truncated")) == \
        "ValueError: subject 'x' is invalid: - a.png: truncated"
    assert len(one_line(ValueError("y" * 1000))) <= 320
