"""API keys without Ray: the key file, its command line and the token bucket.

The routes' behaviour (401, 429, 403, reload on change) is tested over HTTP against the real app
in tests/test_serve.py.
"""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time

import pytest

from serve.auth import KeyStore, TokenBucket, create_key, digest, read_keys


def cli(*args: str, keys) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serve.auth", *args, "--file", str(keys)],
                          capture_output=True, text=True, timeout=120)


def test_keys_are_stored_hashed_owner_only_and_revocable(tmp_path):
    keys = tmp_path / "keys.json"
    made = cli("create", "alice", "--rate", "5", "--burst", "7", keys=keys)
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert key.startswith("cfk_") and len(key) > 40
    text = keys.read_text()
    assert key not in text and digest(key) in text  # only the digest is on disk
    assert stat.S_IMODE(os.stat(keys).st_mode) == 0o600
    (rec,) = read_keys(keys)
    assert (rec.id, rec.admin, rec.rate_per_s, rec.burst) == ("alice", False, 5.0, 7)
    listed = cli("list", keys=keys)
    assert "alice" in listed.stdout and key not in listed.stdout
    again = cli("create", "alice", keys=keys)
    assert again.returncode == 2 and "exists" in again.stderr
    assert cli("create", "no spaces", keys=keys).returncode == 2
    assert cli("revoke", "alice", keys=keys).returncode == 0
    assert read_keys(keys) == []
    assert cli("revoke", "alice", keys=keys).returncode == 1


def test_store_authenticates_reloads_and_keeps_old_keys_on_a_broken_file(tmp_path, monkeypatch):
    monkeypatch.setattr("serve.auth.RELOAD_EVERY_S", 0.0)
    keys = tmp_path / "keys.json"
    store = KeyStore(keys)
    assert store.count == 0 and store.authenticate("cfk_x") is None
    admin = create_key(keys, "ops", admin=True)
    caller = store.authenticate(admin)
    assert caller is not None and (caller.key_id, caller.admin) == ("ops", True)
    assert store.authenticate(admin + "x") is None
    keys.write_text("{not json")
    time.sleep(0.01)
    assert store.authenticate(admin) is not None  # a half-edited file does not lock everyone out
    assert store.error is not None and str(keys) in store.error
    keys.write_text(json.dumps({"keys": []}))
    assert store.authenticate(admin) is None


def test_token_bucket_gives_burst_then_rate():
    bucket = TokenBucket(rate=10.0, burst=3)
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = bucket.take()
    assert 0.05 < wait <= 0.1
    time.sleep(wait + 0.01)
    assert bucket.take() == 0.0


@pytest.mark.parametrize("entry", [{"id": "a b", "sha256": "0" * 64}, {"id": "a", "sha256": "short"},
                                   {"id": "a", "sha256": "0" * 64, "rate_per_s": 0}, {"name": "a"}])
def test_bad_entries_name_the_file(tmp_path, entry):
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [entry]}))
    with pytest.raises(ValueError, match="keys.json"):
        read_keys(keys)
