"""API keys: who may call the app, and how often.

Every route but `/healthz` (and the API's own description: `/docs`, `/openapi.json`) needs
`Authorization: Bearer <key>`. Keys live in a JSON file named by the Serve config
(`api_keys_file`), stored only as SHA-256 digests: a key is 32 random bytes, so a digest
cannot be turned back into one, and the file can be read by operators without leaking keys.
The Ingress re-reads the file when it changes, so creating or revoking a key needs no redeploy.

Each key has a token bucket (`rate_per_s` refills, `burst` holds): a request finding it empty is
answered 429 with `Retry-After`. Buckets live in each Ingress replica, so with N replicas a key
may reach N times its rate; the proxy spreads one client's requests over them.

    python -m serve.auth create alice [--admin] [--rate 2] [--burst 20] [--file F]   # prints the key once
    python -m serve.auth list [--file F]
    python -m serve.auth revoke alice [--file F]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import secrets
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from fastapi import HTTPException, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from comfusion.fsutil import write_file_atomic
from comfusion.fsutil import cache_root

KEY_PREFIX = "cfk_"
KEY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
RELOAD_EVERY_S = 1.0  # the key file is checked for changes at most this often


def default_keys_file() -> str:
    """`$COMFUSION_API_KEYS`, else `api_keys.json` in the comfusion cache folder."""
    return os.environ.get("COMFUSION_API_KEYS") or str(cache_root().expanduser() / "api_keys.json")


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class KeyRecord:
    """One key as stored: its name, digest, role and rate."""

    id: str
    sha256: str
    admin: bool = False
    rate_per_s: float = 2.0
    burst: int = 20
    created: str = ""


@dataclass(frozen=True)
class Caller:
    """Who sent the request (what routes see): the key's name and whether it is an admin key."""

    key_id: str
    admin: bool = False


class KeyFileError(ValueError):
    """The key file is unreadable or malformed; the message names the file and the entry."""


def read_keys(path: str | os.PathLike) -> list[KeyRecord]:
    """The keys in `path` ([] when it does not exist); KeyFileError naming the file and entry."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        entries = json.loads(path.read_text())["keys"]
        return [_record(e) for e in entries]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise KeyFileError(f"{path}: not a key file ({type(e).__name__}: {e})") from None


def _record(entry: dict) -> KeyRecord:
    rec = KeyRecord(**entry)
    if not KEY_ID.match(rec.id) or len(rec.sha256) != 64 or rec.rate_per_s <= 0 or rec.burst < 1:
        raise ValueError(f"bad entry {rec.id!r}")
    return rec


def write_keys(path: str | os.PathLike, records: list[KeyRecord]) -> None:
    """Replace the file in one step, readable by its owner only."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps({"keys": [asdict(r) for r in records]}, indent=2).encode()
    write_file_atomic(path, data)
    os.chmod(path, 0o600)


def create_key(path: str | os.PathLike, key_id: str, *, admin: bool = False, rate_per_s: float = 2.0,
               burst: int = 20, replace: bool = False) -> str:
    """A new key named `key_id`, stored hashed in `path`; the key itself is returned, never stored."""
    if not KEY_ID.match(key_id):
        raise ValueError(f"key id {key_id!r}: 1 to 64 letters, digits, '_', '.', '-', starting with a letter or digit")
    if rate_per_s <= 0 or burst < 1:
        raise ValueError("rate_per_s must be > 0 and burst >= 1")
    records = read_keys(path)
    if any(r.id == key_id for r in records) and not replace:
        raise ValueError(f"{path}: a key named {key_id!r} exists; revoke it first (or replace it)")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    rec = KeyRecord(key_id, digest(key), admin, float(rate_per_s), int(burst),
                    time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    write_keys(path, [r for r in records if r.id != key_id] + [rec])
    return key


def local_key(folder: str | os.PathLike, key_id: str = "local") -> tuple[str, dict]:
    """A key file in `folder` with one admin key at a rate no load test reaches (tests, benchmarks):
    the file's path and the request headers that carry the key."""
    path = Path(folder) / "api_keys.json"
    key = create_key(path, key_id, admin=True, rate_per_s=1e6, burst=10**6, replace=True)
    return str(path), {"Authorization": f"Bearer {key}"}


def revoke_key(path: str | os.PathLike, key_id: str) -> bool:
    records = read_keys(path)
    kept = [r for r in records if r.id != key_id]
    if len(kept) != len(records):
        write_keys(path, kept)
    return len(kept) != len(records)


class TokenBucket:
    """`rate` tokens a second up to `burst`; `take()` is 0 when a token was taken, else the wait."""

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = rate, burst
        self.tokens, self.stamp = float(burst), time.monotonic()

    def take(self) -> float:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class KeyStore:
    """The Ingress's view of the key file: digests -> keys, one bucket per key, reloaded on change."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._by_digest: dict[str, KeyRecord] = {}
        self._by_id: dict[str, KeyRecord] = {}
        self._buckets: dict[str, TokenBucket] = {}
        self._seen: tuple | None = None
        self._checked = 0.0
        self.error: str | None = None  # why the last reload failed (the old keys stay in force)
        self._reload()

    def _stamp(self) -> tuple | None:
        try:
            st = self.path.stat()
            return (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            return None

    def _reload(self) -> None:
        self._checked = time.monotonic()
        stamp = self._stamp()
        if stamp == self._seen and self._seen is not None:
            return
        try:
            records = read_keys(self.path)
        except KeyFileError as e:
            self.error = str(e)
            return
        self._seen, self.error = stamp, None
        self._by_digest = {r.sha256: r for r in records}
        self._by_id = {r.id: r for r in records}
        self._buckets = {k: b for k, b in self._buckets.items() if k in self._by_id}

    @property
    def count(self) -> int:
        return len(self._by_digest)

    def authenticate(self, key: str) -> Caller | None:
        with self._lock:
            if time.monotonic() - self._checked >= RELOAD_EVERY_S:
                self._reload()
            rec = self._by_digest.get(digest(key))
        return None if rec is None else Caller(rec.id, rec.admin)

    def admit(self, caller: Caller) -> float:
        """0 when the key may go on now, else the seconds until it may."""
        with self._lock:
            rec = self._by_id.get(caller.key_id)
            if rec is None:
                return 0.0
            bucket = self._buckets.get(rec.id)
            if bucket is None or (bucket.rate, bucket.burst) != (rec.rate_per_s, rec.burst):
                bucket = self._buckets[rec.id] = TokenBucket(rec.rate_per_s, rec.burst)
            return bucket.take()


bearer = HTTPBearer(auto_error=False, scheme_name="API key",
                    description="`Authorization: Bearer <key>`; create keys with `python -m serve.auth create NAME`")


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(status_code=401, detail=detail, headers={"WWW-Authenticate": "Bearer"})


async def require_key(request: Request,
                      credentials: HTTPAuthorizationCredentials | None = Security(bearer)) -> Caller:
    """The FastAPI dependency on every route but /healthz: the caller, or 401 / 429."""
    store: KeyStore | None = getattr(request.app.state, "keys", None)
    if credentials is None:
        raise _unauthorized("this route needs an API key: send 'Authorization: Bearer <key>'")
    caller = store.authenticate(credentials.credentials) if store is not None else None
    if caller is None:
        raise _unauthorized("invalid API key")
    wait = store.admit(caller)
    if wait > 0:
        raise HTTPException(status_code=429, detail=f"key {caller.key_id!r} is over its request rate",
                            headers={"Retry-After": str(max(1, math.ceil(wait)))})
    request.state.caller = caller
    return caller


# ---------------------------------------------------------------------------------------
# command line


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m serve.auth", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    create = sub.add_parser("create", help="create a key and print it (shown once)")
    create.add_argument("id", help="the key's name, e.g. a user or service")
    create.add_argument("--admin", action="store_true", help="may see every user's jobs and subjects")
    create.add_argument("--rate", type=float, default=2.0, help="requests a second, sustained (default 2)")
    create.add_argument("--burst", type=int, default=20, help="requests at once after a pause (default 20)")
    create.add_argument("--replace", action="store_true", help="replace an existing key of that name")
    sub.add_parser("list", help="list key names, roles and rates (never the keys)")
    revoke = sub.add_parser("revoke", help="remove a key (the app stops taking it within a second)")
    revoke.add_argument("id")
    for p in sub.choices.values():
        p.add_argument("--file", default=default_keys_file(), help="the key file (default: %(default)s)")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "create":
            print(create_key(args.file, args.id, admin=args.admin, rate_per_s=args.rate, burst=args.burst,
                             replace=args.replace))
        elif args.cmd == "list":
            for r in read_keys(args.file):
                print(f"{r.id}\t{'admin' if r.admin else 'user'}\t{r.rate_per_s:g}/s burst {r.burst}\t{r.created}")
        elif not revoke_key(args.file, args.id):
            print(f"{args.file}: no key named {args.id!r}", file=sys.stderr)
            return 1
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
