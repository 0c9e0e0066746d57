"""What an evaluation scores: one trained (subject, method) checkpoint and the subject's real photos.

Its own module so that `jobs.evaluate` (which finds the targets and generates their images) and
`jobs.eval_report` (which scores and reports them) both import it without importing each other.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    """One trained (subject, method) to evaluate, with the real photos it is scored against."""

    subject: str
    method: str  # the table row: the method, or the label given with --checkpoint LABEL=DIR
    checkpoint: str  # verified local checkpoint folder
    identifier: str
    class_noun: str
    photos: tuple[str, ...]  # the subject's real photos (DINO / CLIP-I references)
    scenes: tuple[str, ...]  # the "specific" prompt set
    run_id: str | None = None  # the subject's MLflow run, when found through MLflow

    @property
    def name(self) -> str:
        """'subject/method', for progress lines."""
        return f"{self.subject}/{self.method}"
