"""Typed settings of the Serve app: the `args:` of `configs/serve.yaml`, checked once.

The frozen dataclass, not the raw dict, is what crosses the Ray boundary into the deployments.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from comfusion import registry
from comfusion.fsutil import cache_root
from serve.auth import default_keys_file


def default_cache_dir() -> str:
    return str(cache_root().expanduser().resolve() / "serve")


def _is_db_url(url: str) -> bool:
    """'' (the default database) or a URL SQLAlchemy can parse."""
    if not url:
        return True
    from sqlalchemy.engine import make_url  # noqa: PLC0415
    from sqlalchemy.exc import ArgumentError  # noqa: PLC0415

    try:
        return bool(make_url(url).drivername)
    except ArgumentError:
        return False


def default_job_storage() -> str:
    return str(cache_root().expanduser().resolve() / "storage")


@dataclass(frozen=True)
class ServeSettings:
    """What the app serves and how; every field has a default that runs the tiny model on a CPU."""

    base: str = "tiny"  # base model the subjects were trained from: preset, folder or hub id
    preset_seed: int = 0  # seed of the built-in presets' random weights (must match training)
    # MLflow tracking + registry URI; default: $MLFLOW_TRACKING_URI, else <cwd>/storage/mlflow.db (the jobs' default)
    tracking_uri: str = field(default_factory=registry.tracking_uri)
    cache_dir: str = field(default_factory=default_cache_dir)  # where fetched checkpoints are kept
    max_models_per_replica: int = 3  # K: subjects whose weights a replica keeps in memory (LRU)
    default_steps: int = 30  # DDIM steps when a request gives none
    device: str = "auto"  # "auto" (cuda when present), "cuda" or "cpu"
    registry_ttl_s: float = 2.0  # how long a subject lookup is cached
    retry_after_s: int = 1  # the Retry-After of a 503 when the model is overloaded
    request_timeout_s: float = 60.0  # a generate request is answered 504 and its compute stopped after this
    max_body_bytes: int = 65536  # larger request bodies are refused with 413 before they are read whole
    registry_timeout_s: int = 2  # MLflow HTTP timeout per call (MLflow takes whole seconds)
    registry_retries: int = 1  # MLflow HTTP retries per call
    lookup_wait_s: float = 1.5  # the longest a request waits on MLflow (only for subjects not seen before)
    max_lookups: int = 1024  # unknown ids remembered (a bounded negative cache)
    cache_max_mb: float = 20000.0  # disk cache bound; least recently used subject versions go first
    api_keys_file: str = field(default_factory=default_keys_file)  # hashed API keys (python -m serve.auth create)
    fault_slow_subject: str = ""  # fault injection (tests, benchmarks/faults.py): swapping this subject in
    fault_swap_delay_s: float = 0.0  # sleeps this long first, like a large model's copy (widens the cancel window)
    votes_url: str = ""  # the studio's vote database (SQLAlchemy URL); "": sqlite <cache_dir>/../studio_votes.db
    # self-service training (POST /v1/subjects, /v1/jobs): serve/selfservice.py
    ray_address: str = "http://127.0.0.1:8265"  # the Ray dashboard (job API) trainings are submitted to
    ray_token_file: str = ""  # Ray's auth token for it; "": $RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token (if present)
    job_storage: str = field(default_factory=default_job_storage)  # uploaded photos, job configs, the job's storage
    train_config: str = "configs/demo.yaml"  # the job config uploads train with (relative: to the repository)
    max_upload_bytes: int = 20 * 2**20  # a POST /v1/subjects body larger than this gets a 413
    max_photos: int = 5  # photos per subject (at most the manifest's 5)
    max_trainings_per_key: int = 2  # one key's trainings queued or running at once; more get a 429
    max_train_steps: int = 2000  # the most training steps a client may ask for
    max_adapters_per_replica: int = 1000  # LoRA subjects a replica keeps in host memory (LRU; a few MB each)
    adapter_cache_mb: float = 8192.0  # and at most this many MB of them
    # LoRA subjects up to this rank swap in place (one adapter padded to it); higher ranks unload + load; 0: no padding
    lora_max_rank: int = 16
    max_batch_size: int = 8  # same-subject requests rendered in one sampler call (1: no batching)
    batch_wait_s: float = 0.01  # how long a request waits for others of its subject to join its batch

    def __post_init__(self):
        checks = [
            (bool(self.base.strip()), "base", "must name a preset, folder or hub id"),
            (bool(self.tracking_uri.strip()), "tracking_uri", "must be a tracking URI"),
            (bool(self.cache_dir.strip()), "cache_dir", "must be a folder"),
            (bool(self.api_keys_file.strip()), "api_keys_file", "must name the API key file"),
            (self.max_models_per_replica >= 1, "max_models_per_replica", "must be >= 1"),
            (1 <= self.default_steps <= 100, "default_steps", "must be in 1..100"),
            (self.device in ("auto", "cuda", "cpu"), "device", "must be 'auto', 'cuda' or 'cpu'"),
            (self.registry_ttl_s >= 0, "registry_ttl_s", "must be >= 0"),
            (self.retry_after_s >= 1, "retry_after_s", "must be >= 1"),
            (self.request_timeout_s > 0, "request_timeout_s", "must be > 0"),
            (self.max_body_bytes >= 1024, "max_body_bytes", "must be >= 1024"),
            (self.registry_timeout_s >= 1, "registry_timeout_s", "must be >= 1 (whole seconds)"),
            (0 <= self.registry_retries <= 5, "registry_retries", "must be in 0..5"),
            (0 < self.lookup_wait_s <= 10, "lookup_wait_s", "must be in (0, 10]"),
            (self.max_lookups >= 1, "max_lookups", "must be >= 1"),
            (self.cache_max_mb > 0, "cache_max_mb", "must be > 0"),
            (self.fault_swap_delay_s >= 0, "fault_swap_delay_s", "must be >= 0"),
            (_is_db_url(self.votes_url), "votes_url", "must be empty or an SQLAlchemy URL, e.g. "
                                                      "sqlite:////abs/votes.db or postgresql://host/db"),
            (self.ray_address.startswith(("http://", "https://")), "ray_address", "must be the dashboard's http(s) URL"),
            (bool(self.job_storage.strip()), "job_storage", "must be a folder"),
            (bool(self.train_config.strip()), "train_config", "must name a job config YAML"),
            (self.max_upload_bytes >= 1024, "max_upload_bytes", "must be >= 1024"),
            (1 <= self.max_photos <= 5, "max_photos", "must be in 1..5"),
            (self.max_trainings_per_key >= 1, "max_trainings_per_key", "must be >= 1"),
            (self.max_train_steps >= 1, "max_train_steps", "must be >= 1"),
            (self.max_adapters_per_replica >= 1, "max_adapters_per_replica", "must be >= 1"),
            (self.adapter_cache_mb > 0, "adapter_cache_mb", "must be > 0"),
            (0 <= self.lora_max_rank <= 256, "lora_max_rank", "must be in 0..256 (0: no padding)"),
            (1 <= self.max_batch_size <= 64, "max_batch_size", "must be in 1..64"),
            (0 <= self.batch_wait_s <= 1, "batch_wait_s", "must be in [0, 1] seconds"),
        ]
        for ok, key, message in checks:
            if not ok:
                raise ValueError(f"serve arg '{key}': {message}")

    @classmethod
    def from_args(cls, args: dict | None) -> ServeSettings:
        """Settings from the app builder's args; unknown keys and wrong types raise ValueError."""
        args = dict(args or {})
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(args) - set(fields))
        if unknown:
            raise ValueError(f"unknown serve args {unknown}; known: {sorted(fields)}")
        values = {}
        for key, value in args.items():
            kind = {"int": int, "float": float, "str": str}[fields[key].type]
            if isinstance(value, bool) or not isinstance(value, (kind, int) if kind is float else kind):
                raise ValueError(f"serve arg '{key}': expected {kind.__name__}, got {value!r}")
            values[key] = kind(value)
        if "tracking_uri" in values:
            values["tracking_uri"] = registry.absolute_tracking_uri(values["tracking_uri"])
        return cls(**values)
