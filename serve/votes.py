"""The studio's user study (the paper's Table 2): ballots, votes and their win rates, in SQL.

A *ballot* is one blind pair shown to one voter: a subject, a scene, a seed, and two methods'
images in a random order (`left` / `right`). It is written when the pair is shown, under a
random id the page carries. A *vote* answers the paper's two questions for one ballot
(which image matches the text better; which keeps the subject better) and is keyed by the
ballot id, so submitting it twice (a double click, a retried request) counts it once, and a
vote that the database acknowledged is never lost (one transaction, committed before the
page is told).

Any SQLAlchemy URL works: SQLite in the job storage by default (one file, created with its
schema on start), Postgres on a cluster with several Ingress replicas.

`results` turns votes into per (method pair, subject, question) win rates with Wilson 95%
intervals; `results_csv` / `votes_csv` export them.
"""
from __future__ import annotations

import csv
import io
import math
import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import (Column, DateTime, Float, ForeignKey, Integer, MetaData, String, Table, create_engine, event,
                        func, select)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

QUESTIONS = {"text": "Which image matches the text better?", "subject": "Which image keeps the subject better?"}
SIDES = ("left", "right")
ALL_SUBJECTS = "(all)"

metadata = MetaData()
ballots = Table(
    "ballots", metadata,
    Column("id", String(32), primary_key=True),
    Column("voter", String(64), nullable=False),  # the API key's name
    Column("session", String(64), nullable=False, default=""),  # the browser session (Gradio's session hash)
    Column("issued_at", DateTime(timezone=True), nullable=False),
    Column("subject", String(64), nullable=False),
    Column("scene", String(200), nullable=False),
    Column("prompt", String(400), nullable=False),
    Column("seed", Integer, nullable=False),
    Column("steps", Integer, nullable=False),
    Column("left_method", String(64), nullable=False),
    Column("left_version", Integer, nullable=False),
    Column("right_method", String(64), nullable=False),
    Column("right_version", Integer, nullable=False),
)
votes = Table(
    "votes", metadata,
    Column("ballot_id", String(32), ForeignKey("ballots.id"), primary_key=True),  # one vote per ballot
    Column("voter", String(64), nullable=False),
    Column("voted_at", DateTime(timezone=True), nullable=False),
    Column("text_choice", String(8), nullable=False),  # "left" or "right"
    Column("subject_choice", String(8), nullable=False),
    Column("seconds_to_vote", Float, nullable=True),
)


class VoteError(ValueError):
    """A vote that cannot be counted: the message says why (shown to the voter)."""


@dataclass(frozen=True)
class Ballot:
    """One blind pair as shown: the methods behind `left` and `right` stay on the server."""

    id: str
    voter: str
    subject: str
    scene: str
    prompt: str
    seed: int
    steps: int
    left_method: str
    left_version: int
    right_method: str
    right_version: int
    session: str = ""


def default_votes_url(cache_dir: str | Path) -> str:
    """SQLite next to the app's checkpoint cache: `<cache_dir>/../studio_votes.db` (the job storage when
    the cache is `<storage>/serve-cache`, as in `make demo`)."""
    return f"sqlite:///{(Path(cache_dir).expanduser().resolve().parent / 'studio_votes.db')}"


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _utc(t: datetime) -> datetime:
    """SQLite hands datetimes back without their zone; they were written in UTC."""
    return t if t.tzinfo is not None else t.replace(tzinfo=timezone.utc)


def make_engine(url: str) -> Engine:
    """An engine for `url`; SQLite gets its folder created, a busy timeout and WAL (several writers)."""
    if url.startswith("sqlite:///") and ":memory:" not in url:
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, pool_pre_ping=True, connect_args={"timeout": 30} if url.startswith("sqlite") else {})
    if url.startswith("sqlite"):
        @event.listens_for(engine, "connect")
        def _pragmas(conn, _record):
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()
    return engine


class VoteStore:
    """Ballots and votes in one SQL database; the schema is created when missing."""

    def __init__(self, url: str):
        self.url = url
        self.engine = make_engine(url)
        metadata.create_all(self.engine)

    def issue(self, ballot: Ballot) -> Ballot:
        with self.engine.begin() as conn:
            conn.execute(ballots.insert().values(issued_at=_now(), **ballot.__dict__))
        return ballot

    @staticmethod
    def new_id() -> str:
        return uuid.uuid4().hex

    def vote(self, ballot_id: str, voter: str, text_choice: str, subject_choice: str) -> bool:
        """Count one vote; True when counted now, False when this ballot's vote was already counted.

        VoteError for an unknown ballot, another voter's ballot or an answer that is not left/right."""
        for name, choice in (("text", text_choice), ("subject", subject_choice)):
            if choice not in SIDES:
                raise VoteError(f"answer the {name} question with left or right (got {choice!r})")
        with self.engine.connect() as conn:
            row = conn.execute(select(ballots.c.voter, ballots.c.issued_at).where(ballots.c.id == ballot_id)).first()
        if row is None:
            raise VoteError("this pair was not issued here (reload the Vote page for a new one)")
        if row.voter != voter:
            raise VoteError("this pair was shown to another voter")
        now = _now()
        try:
            with self.engine.begin() as conn:
                conn.execute(votes.insert().values(ballot_id=ballot_id, voter=voter, voted_at=now,
                                                   text_choice=text_choice, subject_choice=subject_choice,
                                                   seconds_to_vote=(now - _utc(row.issued_at)).total_seconds()))
        except IntegrityError:
            return False  # the primary key: this ballot has its vote
        return True

    def count(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(votes)).scalar_one()

    def rows(self) -> list[dict]:
        """Every counted vote joined with what was shown, oldest first."""
        query = select(votes, *[c for c in ballots.c if c.name not in ("id", "voter")]).join(
            ballots, ballots.c.id == votes.c.ballot_id).order_by(votes.c.voted_at)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]


# ---------------------------------------------------------------------------------------
# win rates


def wilson_interval(wins: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95% for the default z); (0, 1) when n == 0.

    centre = (p + z^2 / 2n) / (1 + z^2 / n), half-width = z sqrt(p(1-p)/n + z^2 / 4n^2) / (1 + z^2 / n)
    """
    if not 0 <= wins <= n:
        raise ValueError(f"wins must be in 0..n, got {wins} of {n}")
    if n == 0:
        return 0.0, 1.0
    p, z2 = wins / n, z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    # the interval holds p; at 0 and n wins its near end is exactly 0 or 1 (rounding would leave 1e-17)
    return min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half))


RESULT_COLUMNS = ("method_a", "method_b", "subject", "question", "votes", "a_wins", "a_win_rate", "ci_low", "ci_high")


def results(rows: list[dict]) -> list[dict]:
    """Win rates of `method_a` over `method_b` (names sorted) per subject and question, plus each pair's
    all-subjects row; each with its vote count and Wilson 95% interval."""
    tally: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])  # (a, b, subject, question) -> [a wins, votes]
    for r in rows:
        methods = {"left": r["left_method"], "right": r["right_method"]}
        a, b = sorted(methods.values())
        for question in QUESTIONS:
            winner = methods[r[f"{question}_choice"]]
            for subject in (r["subject"], ALL_SUBJECTS):
                cell = tally[(a, b, subject, question)]
                cell[0] += winner == a
                cell[1] += 1
    out = []
    for (a, b, subject, question), (wins, n) in sorted(tally.items()):
        low, high = wilson_interval(wins, n)
        out.append(dict(method_a=a, method_b=b, subject=subject, question=question, votes=n, a_wins=wins,
                        a_win_rate=wins / n, ci_low=low, ci_high=high))
    return out


def _csv(rows: list[dict], columns: tuple[str, ...]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in r.items()})
    return buf.getvalue()


def results_csv(table: list[dict]) -> str:
    return _csv(table, RESULT_COLUMNS)


VOTE_COLUMNS = ("ballot_id", "voter", "session", "issued_at", "voted_at", "seconds_to_vote", "subject", "scene",
                "prompt", "seed", "steps", "left_method", "left_version", "right_method", "right_version",
                "text_choice", "subject_choice")


def votes_csv(rows: list[dict]) -> str:
    return _csv(rows, VOTE_COLUMNS)
