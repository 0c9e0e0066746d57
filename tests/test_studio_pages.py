"""The studio's page handlers without Ray or a browser: a stand-in for the Ingress that renders flat
colours, a real key store and a real vote store (SQLite in tmp)."""
from __future__ import annotations

import asyncio
import io
import re
from types import SimpleNamespace

import pytest
from PIL import Image

from serve.registry import SubjectRecord

RECORDS = {s: SubjectRecord(id=s, version=2, identifier="sks", class_noun="dog", method="comfusion", source="/none")
           for s in ("alpha", "bravo")}


class FakeIngress:
    """What `AppBackend` uses of an Ingress: settings, registry, the token check and the Generator call."""

    def __init__(self, records: dict, settings):
        self.settings, self.records, self.calls = settings, records, []
        self.registry = SimpleNamespace(list_subjects=lambda: sorted(records.values(), key=lambda r: r.id),
                                        resolve=records.get)

    def _too_long(self, prompt, field):
        return None

    async def _call_generator(self, record, prompt, seeds, steps, req, deadline):
        self.calls.append((record.id, record.version, prompt, tuple(seeds), steps))
        pngs = []
        for s in seeds:
            buf = io.BytesIO()
            Image.new("RGB", (8, 8), (s % 256, record.version, 0)).save(buf, format="PNG")
            pngs.append(buf.getvalue())
        return {"images": pngs}


@pytest.fixture()
def studio(tmp_path, api_key):
    from serve import studio as S
    from serve import votes as V
    from serve.auth import KeyStore
    from serve.settings import ServeSettings
    from serve.studio_backend import AppBackend

    class Backend(AppBackend):
        def _aliases(self, subject_id):
            return {"comfusion": 2, "dreambooth": 1, "serving": 2}

    def make(records=RECORDS):
        ingress = FakeIngress(records, ServeSettings(cache_dir=str(tmp_path / "cache")))
        st = S.Studio(Backend(ingress), KeyStore(api_key.file), V.VoteStore(f"sqlite:///{tmp_path}/v.db"), 2)
        st.ingress = ingress
        return st

    return make


def request_with(api_key, key=None):
    from serve.studio_gate import COOKIE

    key = key if key is not None else api_key.headers["Authorization"].removeprefix("Bearer ")
    return SimpleNamespace(cookies={COOKIE: key}, session_hash="sess-1")


def test_empty_registry_and_bad_key_say_so(studio, api_key):
    empty = studio({})
    who, note, *_ = asyncio.run(empty.on_load(request_with(api_key)))
    assert "signed in as" in who and "No subjects are registered yet" in note
    who, note, *_ = asyncio.run(empty.on_load(request_with(api_key, "cfk_wrong")))
    assert who == "" and "no longer valid" in note


def test_generate_and_surprise(studio, api_key):
    st = studio()
    html, status = asyncio.run(st.on_generate("bravo", "on the bed", "", 5, 3, 2, request_with(api_key)))
    assert html.count("<img") == 2 and "a sks dog on the bed" in html and "seed 6" in html
    assert st.ingress.calls[-1] == ("bravo", 2, "a sks dog on the bed", (5, 6), 3)
    html, status = asyncio.run(st.on_generate("bravo", "(free prompt)", "  ", 5, 3, 1, request_with(api_key)))
    assert html == "" and "Write a prompt" in status
    html, status = asyncio.run(st.on_surprise("alpha", 2, request_with(api_key)))
    prompts = {c[2] for c in st.ingress.calls[-4:]}
    assert html.count("<img") == 4 and len(prompts) == 4  # four different scenes
    html, status = asyncio.run(st.on_generate("", "on the bed", "", 0, 2, 1, request_with(api_key)))
    assert "Choose a subject" in status


def test_vote_pages_count_a_ballot_once(studio, api_key):
    st = studio()
    pair, ballot_id, *_ = asyncio.run(st.on_new_pair(request_with(api_key)))
    assert pair.count("<img") == 2 and re.fullmatch(r"[0-9a-f]{32}", ballot_id)
    versions = {c[1] for c in st.ingress.calls[-2:]}
    assert versions == {1, 2}  # comfusion v2 against dreambooth v1; `serving` (v2) is not a third method
    out = asyncio.run(st.on_vote(ballot_id, "left", "right", request_with(api_key)))
    assert "Vote counted (1 in all)" in out[-1]
    out = asyncio.run(st.on_vote(ballot_id, "left", "right", request_with(api_key)))
    assert "already counted" in out[-1] and st.store.count() == 1
    out = asyncio.run(st.on_vote(out[1], None, "right", request_with(api_key)))
    assert "text question" in out[-1]
    (row,) = st.store.rows()
    assert row["voter"] == "tests" and row["session"] == "sess-1"
    table, chart, status = asyncio.run(st.on_results(request_with(api_key)))
    assert 'id="res-count">1<' in status and "dreambooth" in table and chart.startswith("<img")


@pytest.mark.parametrize("text_choice", ["left", "right"])
def test_results_chart_of_a_one_sided_vote(text_choice):
    """Every vote for one method (a win rate of 0 or 1): the chart and table still render."""
    from serve import votes as V
    from serve.studio import results_chart, results_table

    rows = [dict(subject="bravo", left_method="comfusion", right_method="dreambooth", text_choice=text_choice,
                 subject_choice=text_choice) for _ in range(3)]
    table = V.results(rows)
    assert {r["a_win_rate"] for r in table} == {0.0 if text_choice == "right" else 1.0}
    png = results_chart(table)
    assert Image.open(io.BytesIO(png)).size[0] > 100 and "<td class=\"res-votes\">3</td>" in results_table(table)


# ---------------------------------------------------------------------------------------
# the Train page: the app's real self-service routes (serve.app's FastAPI app, called in-process as the
# page does), real MLflow (sqlite) and real photo checks; only Ray's job API is a stand-in, since no
# Ray job can run here


class StandInJobs:
    """What `serve.selfservice` uses of Ray's `JobSubmissionClient`: it keeps the submitted jobs, and a
    test moves them through Ray's states."""

    def __init__(self):
        self.jobs: dict[str, SimpleNamespace] = {}

    def submit_job(self, *, entrypoint, submission_id, runtime_env, metadata):
        self.jobs[submission_id] = SimpleNamespace(submission_id=submission_id, status="PENDING", metadata=metadata,
                                                   start_time=1000 + len(self.jobs), end_time=None, message="",
                                                   entrypoint=entrypoint, runtime_env=runtime_env)
        return submission_id

    def list_jobs(self):
        return list(self.jobs.values())

    def stop_job(self, job_id):
        self.jobs[job_id].status = "STOPPED"
        return True

    def get_job_logs(self, job_id):
        return ""


@pytest.fixture()
def trainer(tmp_path):
    """A studio whose Train page calls serve.app's routes, as the keys `ann` and `ben`; its stand-in jobs."""
    from jobs.demo_subjects import write_demo_subjects
    from serve import selfservice
    from serve import studio as S
    from serve import votes as V
    from serve.app import api
    from serve.auth import KeyStore, create_key
    from serve.settings import ServeSettings
    from serve.studio_backend import AppBackend

    keys_file = tmp_path / "keys.json"
    keys = {name: create_key(keys_file, name, rate_per_s=1e6, burst=10**6) for name in ("ann", "ben")}
    settings = ServeSettings(cache_dir=str(tmp_path / "cache"), tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
                             job_storage=str(tmp_path / "storage"), max_upload_bytes=200_000, max_trainings_per_key=1)
    api.state.keys = KeyStore(str(keys_file))
    selfservice.install(api, settings)
    api.state.trainings._client = jobs = StandInJobs()
    st = S.Studio(AppBackend(FakeIngress(dict(RECORDS), settings)), api.state.keys,
                  V.VoteStore(f"sqlite:///{tmp_path}/v.db"), 2)
    st.backend.attach_api(api, "/studio/gradio_api/upload")
    photos = write_demo_subjects(tmp_path / "photos")
    try:
        yield SimpleNamespace(studio=st, tab=st.train, jobs=jobs, keys=keys, photos=photos, settings=settings,
                              as_=lambda name: request_with(None, keys[name]))
    finally:
        for name in ("keys", "trainings", "body_limits"):
            if hasattr(api.state, name):
                delattr(api.state, name)


def stored_files(settings) -> list:
    from pathlib import Path

    uploads = Path(settings.job_storage) / "uploads"
    return sorted(uploads.rglob("*")) if uploads.exists() else []


def test_train_page_without_self_service_says_so(studio, api_key):
    st = studio()
    note, jobs, _ = asyncio.run(st.train.on_open(request_with(api_key)))
    assert "not set up on this app" in note and jobs == ""
    status, *_ = asyncio.run(st.train.on_start([], "dog", "", "", ["comfusion"], None, request_with(api_key)))
    assert "not set up on this app" in status and "Traceback" not in status


def test_train_page_refuses_bad_uploads_naming_the_field(trainer, tmp_path):
    tab, ann = trainer.tab, trainer.as_("ann")
    good = [str(p) for p in trainer.photos["yellow-ball"]]
    text = tmp_path / "notes.png"
    text.write_text("just some text")
    huge = tmp_path / "huge.png"
    huge.write_bytes(trainer.photos["yellow-ball"][0].read_bytes() + b"\0" * 250_000)
    cases = [
        (([str(text)], "ball", "", "", ["comfusion"], None), "notes.png"),
        (([], "ball", "", "", ["comfusion"], None), "photos"),
        ((good, "", "", "", ["comfusion"], None), "class_noun"),
        ((good, "x" * 8000, "", "", ["comfusion"], None), "class_noun"),
        ((good, "ball", "", "", ["comfusion"], "99999"), "steps"),
        ((good, "ball", "", "", ["comfusion"], "ten"), "steps"),
        ((good, "ball", "Bad Id!", "", ["comfusion"], None), "id"),
        ((good * 2, "ball", "", "", ["comfusion"], None), "6 photos"),
        (([str(huge)], "ball", "", "", ["comfusion"], None), "too large"),
    ]
    for args, said in cases:
        status, *_ = asyncio.run(tab.on_start(*args, ann))
        assert status.startswith("**Error:**") and said in status, (said, status)
        assert "Traceback" not in status
    status, *_ = asyncio.run(tab.on_start(good, "ball", "", "", ["comfusion"], None, request_with(None, "cfk_nope")))
    assert "no longer valid" in status
    assert stored_files(trainer.settings) == [] and trainer.jobs.jobs == {}  # nothing stored, nothing submitted


def test_train_page_starts_watches_cancels_and_opens_generate(trainer):
    tab, ann, ben = trainer.tab, trainer.as_("ann"), trainer.as_("ben")
    ball = [str(p) for p in trainer.photos["yellow-ball"]]
    status, progress, timer, use, jobs, job = asyncio.run(
        tab.on_start(ball, "ball", "alpha", "", ["comfusion"], "4", ann))
    assert "Training submitted" in status and 'id="train-state">queued<' in progress, status
    (job_id,) = trainer.jobs.jobs
    assert job.value == job_id and job_id in jobs and timer.active is True and use.visible is False
    submitted = trainer.jobs.jobs[job_id]
    assert submitted.metadata["owner"] == "ann" and submitted.metadata["steps"] == "4"  # tagged with the page's key
    assert "jobs/train_many.py" in submitted.entrypoint and len(stored_files(trainer.settings)) == 3

    again, *_ = asyncio.run(tab.on_start(ball, "ball", "alpha", "", ["comfusion"], "4", ann))
    assert f"following job `{job_id}`" in again  # the API's duplicate answer, not a second job
    box = [str(p) for p in trainer.photos["blue-box"]]
    busy, *_ = asyncio.run(tab.on_start(box, "box", "", "", ["comfusion"], "4", ann))
    assert "trainings queued or running" in busy and "try again in 30 s" in busy  # the API's 429
    taken, *_ = asyncio.run(tab.on_start(box, "box", "alpha", "", ["comfusion"], "4", ben))
    assert "taken by another key" in taken  # 409
    assert len(trainer.jobs.jobs) == 1
    not_yours = asyncio.run(tab.on_poll(job_id, ben))
    assert f"no job '{job_id}'" in not_yours[0] and not_yours[2].active is False  # 404: the timer stops

    trainer.jobs.jobs[job_id].status = "RUNNING"
    status, progress, timer, use, listed = asyncio.run(tab.on_poll(job_id, ann))
    assert 'id="train-state">preparing priors<' in progress and "0/4" in progress and timer.active is True
    assert "not done yet" in asyncio.run(tab.on_use(job_id, ann))[3]

    trainer.jobs.jobs[job_id].status = "SUCCEEDED"
    status, progress, timer, use, listed = asyncio.run(tab.on_poll(job_id, ann))
    assert "is ready" in status and timer.active is False and use.visible is True and ">done<" in listed
    tabs, gen, cmp, said, notice = asyncio.run(tab.on_use(job_id, ann))
    assert notice == "" and tabs.selected == "generate" and gen.value == "alpha" and ("alpha", "alpha") in gen.choices

    # a second job of ann's, cancelled from the page
    status, *_, job = asyncio.run(tab.on_start(box, "box", "", "", ["comfusion", "dreambooth"], "", ann))
    second = job.value
    assert "Training submitted" in status and second != job_id
    status, progress, timer, use, jobs = asyncio.run(tab.on_cancel(second, ann))
    assert "Cancelling" in status and 'id="train-state">cancelled<' in progress and "comfusion" in progress
    again = asyncio.run(tab.on_cancel(second, ann))
    assert "already ended" in again[0]  # the API's 409
    note, jobs, choices = asyncio.run(tab.on_open(ann))
    assert note == "" and jobs.count("<tr>") == 3  # the header and ann's two jobs


def test_job_routes_answer_503_while_mlflow_does_not(trainer, monkeypatch):
    """MLflow down (nothing listens at its address) while a job exists: the job routes say 503 with
    Retry-After and the field `registry`, never a 500."""
    import dataclasses

    from cluster_helpers import free_port
    from serve.app import api

    tab, ann = trainer.tab, trainer.as_("ann")
    status, *_ = asyncio.run(tab.on_start([str(p) for p in trainer.photos["yellow-ball"]], "ball", "", "",
                                          ["comfusion"], None, ann))
    assert trainer.jobs.jobs, status
    job_id = next(iter(trainer.jobs.jobs))
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    tr = api.state.trainings
    tr.settings = dataclasses.replace(tr.settings, tracking_uri=f"http://127.0.0.1:{free_port()}")
    backend = trainer.studio.backend
    for method, path in (("GET", "/v1/jobs"), ("GET", f"/v1/jobs/{job_id}")):
        answer = asyncio.run(backend.call_api(method, path, trainer.keys["ann"]))
        assert answer.status_code == 503 and answer.headers["retry-after"], (path, answer.text)
        assert "registry does not answer" in answer.json()["detail"]
