"""The subject registry contract that the training jobs write and the Serve app reads.

Names and pure rules only: no MLflow here (`jobs.tracking` writes with these names,
`serve.registry` reads with them).

- A subject is one registered model whose name is the subject id (`model_name`).
- Each trained checkpoint is one model version, created from the run that trained it (at most
  one version per run), tagged with `version_tags`.
- Aliases: the method name (`comfusion`, `dreambooth`) names the best version of that method;
  `serving` names the version Serve renders.
- An alias moves only to a better version (`better`): the preferred method first
  (ComFusion over the DreamBooth baseline), then the higher version number (newer). So a retried
  or late registration never moves an alias backwards. `choose_alias_target` applies the rule
  to every version of the subject, which makes concurrent registrations converge on one answer
  (see `jobs.tracking.point_aliases`). A forced move sets the alias directly; the next
  registration moves it again to the best version. A rollback that sticks tags the bad versions
  `retired=true`: no alias names a retired version again.
- Where the registry lives (`tracking_uri`): `MLFLOW_TRACKING_URI` when set, else the sqlite
  file `<storage>/mlflow.db` of the job storage (`job.storage`, default `storage`), relative
  sqlite paths made absolute. Jobs and the Serve app find the same registry by default.
- Which base model a subject fits (`serving_base`): the Serve app must load the base the subjects
  were trained from.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from comfusion.config import METHODS, JobSection, ModelConfig
from comfusion.data import SUBJECT_ID_PATTERN, is_valid_subject_id

SERVING_ALIAS = "serving"
CHECKPOINT_ARTIFACT = "checkpoint"  # the run's artifact folder holding the subject checkpoint
MODEL_DESCRIPTION = "ComFusion subject checkpoint"

# version tags
TAG_SUBJECT = "subject"
TAG_IDENTIFIER = "identifier"
TAG_CLASS_NOUN = "class_noun"
TAG_METHOD = "method"
TAG_CREATED = "created"  # when the checkpoint was trained (subject.json), ISO 8601
TAG_KIND = "kind"  # "full" or "lora" (comfusion.checkpoint.KINDS); untagged versions are full
TAG_OWNER = "comfusion.owner"  # registered-model (and run) tag: the API key that created the subject
TAG_RETIRED = "retired"  # "true": never named by an alias again (an operator's rollback that sticks)
VERSION_TAGS = (TAG_SUBJECT, TAG_IDENTIFIER, TAG_CLASS_NOUN, TAG_METHOD, TAG_CREATED, TAG_KIND)

# Which method's checkpoint a subject serves when it has several: the paper's method first.
SERVING_PREFERENCE: tuple[str, ...] = METHODS


SQLITE_PREFIX = "sqlite:///"


def absolute_tracking_uri(uri: str) -> str:
    """`sqlite:///mlflow.db` relative to the current folder -> an absolute sqlite URI; other URIs as given.

    Workers and replicas run in other working folders; a relative path would open an empty database there.
    """
    if uri.startswith(SQLITE_PREFIX) and not uri.startswith(SQLITE_PREFIX + "/") and ":memory:" not in uri:
        return SQLITE_PREFIX + str(Path(uri[len(SQLITE_PREFIX):]).resolve())
    return uri


def tracking_uri(storage: str | os.PathLike = JobSection.storage, configured: str = "") -> str:
    """The MLflow tracking and registry URI: `configured` (a job's `job.tracking_uri`) when given,
    else `MLFLOW_TRACKING_URI` when set (a server), else the sqlite file `mlflow.db` in the job
    storage `storage`."""
    uri = (configured or os.environ.get("MLFLOW_TRACKING_URI")
           or f"{SQLITE_PREFIX}{Path(storage).resolve() / 'mlflow.db'}")
    return absolute_tracking_uri(uri)


def serving_base(model: ModelConfig) -> dict:
    """The Serve app's settings (`serve.settings.ServeSettings`) that must match the model a job
    trained its subjects from: the base model and the presets' weight seed."""
    return {"base": model.base, "preset_seed": model.preset_seed}


@dataclass(frozen=True)
class VersionInfo:
    """What the alias rule needs to know of one model version."""

    version: int
    method: str
    subject: str  # the version's subject tag ("" when untagged)
    retired: bool = False


def model_name(subject_id: str) -> str:
    """The registered model name of a subject (its id); ValueError for an id that is not one."""
    if not is_valid_subject_id(subject_id):
        raise ValueError(f"invalid subject id {subject_id!r}: must match {SUBJECT_ID_PATTERN.pattern}")
    return subject_id


def method_alias(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    return method


def version_tags(subject_id: str, identifier: str, class_noun: str, method: str, created: str | None,
                 kind: str = "full") -> dict:
    """The tags every version carries (Serve shows identifier, class noun, method, created, and
    loads the weights by kind)."""
    tags = {TAG_SUBJECT: subject_id, TAG_IDENTIFIER: identifier, TAG_CLASS_NOUN: class_noun, TAG_METHOD: method,
            TAG_KIND: kind}
    if created:
        tags[TAG_CREATED] = created
    return tags


def visible_to(owner: str | None, key_id: str, admin: bool = False) -> bool:
    """Whether a key may list and render a subject: admin keys see all; a subject with an owner
    (one made through the self-service API) is its owner's; subjects without one (trained by a
    job an operator submitted) are everyone's."""
    return admin or not owner or owner == key_id


def version_kind(tags: Mapping[str, str] | None) -> str:
    """The checkpoint kind a version's tags record ("full" for versions from before the tag)."""
    return (tags or {}).get(TAG_KIND) or "full"


def version_info(version: int | str, tags: Mapping[str, str] | None) -> VersionInfo:
    tags = tags or {}
    return VersionInfo(int(version), tags.get(TAG_METHOD, ""), tags.get(TAG_SUBJECT, ""),
                       retired=str(tags.get(TAG_RETIRED, "")).lower() == "true")


def _rank(method: str) -> int:
    """Higher is preferred; methods outside SERVING_PREFERENCE rank below all of them."""
    return len(SERVING_PREFERENCE) - SERVING_PREFERENCE.index(method) if method in SERVING_PREFERENCE else 0


def better(a: VersionInfo, b: VersionInfo) -> bool:
    """Whether `a` should replace `b` under an alias: a preferred method, else a newer version."""
    return (_rank(a.method), a.version) > (_rank(b.method), b.version)


def eligible(info: VersionInfo, subject_id: str, alias: str) -> bool:
    """Whether a version may ever be named by `alias` of `subject_id`: it is that subject's, and
    for a method alias, of that method."""
    if info.subject not in ("", subject_id) or info.retired:  # "": a version from before the tag
        return False
    return alias == SERVING_ALIAS or info.method == alias


def choose_alias_target(subject_id: str, alias: str, current: VersionInfo | None,
                        versions: Iterable[VersionInfo]) -> VersionInfo | None:
    """The version `alias` should name: the best of the current one and every eligible version.

    Never worse than `current`, so an alias only moves forward; None when there is nothing to name.
    """
    best = current if current is not None and eligible(current, subject_id, alias) else None
    for info in versions:
        if eligible(info, subject_id, alias) and (best is None or better(info, best)):
            best = info
    return best
