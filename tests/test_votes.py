"""The studio's vote store (SQLAlchemy on SQLite files) and the Wilson interval, without Ray or a browser."""
from __future__ import annotations

import csv
import io
import math
import threading

import pytest

from serve import votes as V


def ballot(store: V.VoteStore, voter="alice", left="comfusion", right="dreambooth", subject="alpha") -> V.Ballot:
    return store.issue(V.Ballot(id=store.new_id(), voter=voter, subject=subject, scene="in the snow",
                                prompt="a sks dog in the snow", seed=3, steps=2, left_method=left, left_version=2,
                                right_method=right, right_version=1, session="s1"))


@pytest.mark.parametrize("wins, n, low, high", [
    (0, 10, 0.0, 0.27753),  # hand-worked: z = 1.96, centre 0.13879, half-width 0.13879
    (5, 10, 0.23659, 0.76341),
    (10, 10, 0.72246, 1.0),
    (1, 1, 0.20654, 1.0),
    (81, 100, 0.72221, 0.87485),
])
def test_wilson_interval_matches_hand_worked_values(wins, n, low, high):
    lo, hi = V.wilson_interval(wins, n)
    assert lo == pytest.approx(low, abs=5e-5) and hi == pytest.approx(high, abs=5e-5)


def test_wilson_interval_edges():
    assert V.wilson_interval(0, 0) == (0.0, 1.0)
    for n in (1, 3, 7, 100):  # no wins or all wins: the near end is exactly the rate (a chart's error bar >= 0)
        assert V.wilson_interval(0, n)[0] == 0.0 and V.wilson_interval(n, n)[1] == 1.0
    lo, hi = V.wilson_interval(50, 100)
    assert lo + hi == pytest.approx(1.0)  # symmetric about 1/2
    assert V.wilson_interval(500, 1000)[1] - V.wilson_interval(500, 1000)[0] < hi - lo  # more votes, narrower
    with pytest.raises(ValueError, match="0..n"):
        V.wilson_interval(3, 2)


def test_votes_persist_and_a_resubmit_counts_once(tmp_path):
    url = f"sqlite:///{tmp_path}/db/votes.db"
    store = V.VoteStore(url)
    b = ballot(store)
    assert store.vote(b.id, "alice", "left", "right") is True
    assert store.vote(b.id, "alice", "right", "right") is False  # the same ballot again: not counted twice
    again = V.VoteStore(url)  # a restarted replica: the schema exists, the vote is there
    (row,) = again.rows()
    assert (row["ballot_id"], row["voter"], row["text_choice"], row["subject_choice"]) == (b.id, "alice", "left", "right")
    assert (row["left_method"], row["right_method"], row["scene"], row["seed"], row["session"]) == (
        "comfusion", "dreambooth", "in the snow", 3, "s1")
    assert row["voted_at"] >= row["issued_at"] and row["seconds_to_vote"] >= 0


def test_bad_votes_are_refused_with_a_reason(tmp_path):
    store = V.VoteStore(f"sqlite:///{tmp_path}/votes.db")
    b = ballot(store)
    with pytest.raises(V.VoteError, match="not issued"):
        store.vote("f" * 32, "alice", "left", "left")
    with pytest.raises(V.VoteError, match="another voter"):
        store.vote(b.id, "mallory", "left", "left")
    with pytest.raises(V.VoteError, match="text question"):
        store.vote(b.id, "alice", "middle", "left")
    assert store.count() == 0


def test_concurrent_resubmits_count_once(tmp_path):
    """Eight threads submit the same ballot at once (two replicas, a double click): one vote."""
    store = V.VoteStore(f"sqlite:///{tmp_path}/votes.db")
    b = ballot(store)
    results, barrier = [], threading.Barrier(8)

    def submit():
        barrier.wait()
        results.append(V.VoteStore(store.url).vote(b.id, "alice", "left", "left"))

    threads = [threading.Thread(target=submit) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 7 + [True] and store.count() == 1


def test_results_per_pair_subject_and_question(tmp_path):
    store = V.VoteStore(f"sqlite:///{tmp_path}/votes.db")
    # comfusion shown left in two ballots and right in one; it wins text 3 of 3, subject 1 of 3
    for left, right, text, subj in [("comfusion", "dreambooth", "left", "left"),
                                    ("comfusion", "dreambooth", "left", "right"),
                                    ("dreambooth", "comfusion", "right", "left")]:
        store.vote(ballot(store, left=left, right=right).id, "alice", text, subj)
    store.vote(ballot(store, subject="bravo").id, "alice", "right", "right")
    table = {(r["subject"], r["question"]): r for r in V.results(store.rows())}
    alpha_text = table[("alpha", "text")]
    assert (alpha_text["method_a"], alpha_text["method_b"], alpha_text["votes"], alpha_text["a_wins"]) == (
        "comfusion", "dreambooth", 3, 3)
    assert alpha_text["ci_low"] == pytest.approx(V.wilson_interval(3, 3)[0])
    assert table[("alpha", "subject")]["a_wins"] == 1
    assert (table[(V.ALL_SUBJECTS, "text")]["votes"], table[(V.ALL_SUBJECTS, "text")]["a_wins"]) == (4, 3)
    assert table[("bravo", "subject")]["a_win_rate"] == 0.0
    parsed = list(csv.DictReader(io.StringIO(V.results_csv(V.results(store.rows())))))
    assert len(parsed) == 6 and set(parsed[0]) == set(V.RESULT_COLUMNS)
    assert math.isclose(float(parsed[0]["a_win_rate"]), V.results(store.rows())[0]["a_win_rate"])
    raw = list(csv.DictReader(io.StringIO(V.votes_csv(store.rows()))))
    assert len(raw) == 4 and raw[0]["voter"] == "alice" and raw[0]["voted_at"].endswith("+00:00") is not None


def test_default_url_is_beside_the_cache_and_settings_check_the_url(tmp_path):
    from serve.settings import ServeSettings

    assert V.default_votes_url(tmp_path / "serve-cache") == f"sqlite:///{tmp_path.resolve()}/studio_votes.db"
    assert ServeSettings(votes_url="postgresql://db.internal/comfusion").votes_url.startswith("postgresql")
    with pytest.raises(ValueError, match="votes_url"):
        ServeSettings(votes_url="not a url")
    with pytest.raises(ValueError, match="votes_url"):
        ServeSettings.from_args({"votes_url": 3})


def test_results_are_logged_to_the_evaluation_run(tmp_path):
    """Into the newest `evaluation` run when there is one (jobs/evaluate.py makes it), else a new one."""
    from mlflow import MlflowClient

    from serve.studio_backend import log_user_study

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    store = V.VoteStore(f"sqlite:///{tmp_path}/votes.db")
    for text in ("left", "left", "right"):
        store.vote(ballot(store).id, "alice", text, "left")
    rows = store.rows()
    table = V.results(rows)
    client = MlflowClient(tracking_uri=uri)
    first = log_user_study(uri, table, V.results_csv(table), V.votes_csv(rows))
    run = client.get_run(first)
    assert run.info.run_name == "evaluation" and run.data.tags["kind"] == "evaluation"
    assert client.get_experiment(run.info.experiment_id).name == "studio"
    key = "user_study/comfusion_vs_dreambooth/all/text"
    assert run.data.metrics[f"{key}/votes"] == 3 and run.data.metrics[f"{key}/a_win_rate"] == pytest.approx(2 / 3)
    assert run.data.metrics["user_study/comfusion_vs_dreambooth/alpha/subject/a_win_rate"] == 1.0
    exp = client.create_experiment("demo", artifact_location=str(tmp_path / "art"))
    evaluation = client.create_run(exp, run_name="evaluation", tags={"kind": "evaluation"}).info.run_id
    assert log_user_study(uri, table, V.results_csv(table), V.votes_csv(rows)) == evaluation  # the newest one
    names = {a.path for a in client.list_artifacts(evaluation, "user_study")}
    assert names == {"user_study/results.csv", "user_study/votes.csv"}
