"""The job's own progress lines (instead of Ray Data's operator log)."""
from jobs.priors import _Progress


def test_prior_progress_says_done_rate_and_time_left_at_most_every_interval():
    lines: list[str] = []
    tally = _Progress(total=48, every_s=3600, say=lines.append)
    for _ in range(5):
        tally.add(8)
    assert lines == []  # the interval has not passed and the work is not done
    tally.add(8)
    assert len(lines) == 1 and lines[0].startswith("priors: 48/48 images, ") and lines[0].endswith("~0 s left")
    every = _Progress(total=20, every_s=0, say=lines.append)
    every.add(5)
    assert lines[-1].startswith("priors: 5/20 images") and "/s, ~" in lines[-1]
    _Progress(total=4, every_s=0, say=None).add(4)  # no callback: silent


def test_training_progress_has_no_speed_until_two_steps(monkeypatch):
    from jobs import train_worker

    lines: list[str] = []
    monkeypatch.setattr(train_worker, "say", lines.append)
    bar = train_worker._Progress("ball · comfusion", total=10, every_s=0)
    bar.on_step(1, {"total": 0.5}, 1e-4)
    assert lines == ["[ball · comfusion] step 1/10  loss 0.5000  starting"]
    bar.on_step(2, {"total": 0.25}, 1e-4)
    assert lines[-1].startswith("[ball · comfusion] step 2/10  loss 0.2500  ") and lines[-1].endswith(" s left")
    assert "steps/s" in lines[-1]
