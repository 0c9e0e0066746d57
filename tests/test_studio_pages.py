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
