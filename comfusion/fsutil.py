"""Publishing files and folders atomically, and cleaning up after writers that died.

One rule for every writer: build the new content under a hidden temporary sibling, flush it to
disk, then make it visible in one step.

- `publish_dir(src, folder)` puts a complete folder in place. Replacing an existing folder uses
  the kernel's atomic exchange (Linux `renameat2(RENAME_EXCHANGE)`), so a reader always finds
  either the old or the new folder, never none. Where the file system cannot exchange (some
  network file systems) the old folder is renamed aside to `.<name>.old-<tag>` first and put
  back if the second rename fails; a crash in between leaves that `.old-*` copy, which
  `clean_stale` renames back into place.
- `atomic_dir(folder)` is the usual way to call it: a context manager that yields the
  temporary folder to write into and publishes it when the block ends without an error.
  `scratch_dir(folder)` yields the same temporary folder without publishing it, for a writer
  that makes its own subfolder there (a download) and publishes that.
- `write_file_atomic(path, data)` is the same for one file (`os.replace` is atomic for files).
- `clean_stale(parent)` removes temporary entries whose writer is gone and restores `.old-*`
  copies whose folder is missing. A temporary name carries its writer's host and process id:
  on the same host an entry is stale as soon as that process is gone; from another host (shared
  storage) only after `max_age_s` without a change.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

STALE_AFTER_S = 24 * 3600.0  # an entry from another host is left alone for this long without a change
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
# .<name>.tmp-<host>-<pid>-<random> and .<name>.old-<host>-<pid>-<random>
_ENTRY = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[0-9a-f]{8}$")
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def cache_root() -> Path:
    """The project's cache folder: `$COMFUSION_CACHE`, else `~/.cache/comfusion`."""
    return Path(os.environ.get("COMFUSION_CACHE", Path.home() / ".cache" / "comfusion"))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def temp_sibling(path: str | os.PathLike, kind: str = "tmp") -> Path:
    """A hidden, unique sibling name of `path` that `clean_stale` recognises."""
    path = Path(path)
    return path.with_name(f".{path.name}.{kind}-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def fsync_tree(folder: Path) -> None:
    """Flush every file under `folder` (and the folder entries) to disk before a rename publishes them."""
    for path in sorted(folder.rglob("*"), reverse=True):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a directory be opened for sync
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _exchange(a: Path, b: Path) -> None:
    """Swap two existing paths in one step; OSError(EINVAL/ENOSYS/...) where that is unsupported."""
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(b))


def _swap_aside(src: Path, folder: Path) -> None:
    """Replace `folder` by `src` with two renames; the old folder comes back if the second fails."""
    old = temp_sibling(folder, "old")
    os.rename(folder, old)
    try:
        os.rename(src, folder)
    except OSError:
        os.rename(old, folder)
        raise
    shutil.rmtree(old, ignore_errors=True)


def publish_dir(src: str | os.PathLike, folder: str | os.PathLike, *, replace: bool = True) -> Path:
    """Make the complete folder `src` visible as `folder` in one step; returns `folder`.

    `replace=False`: an existing `folder` wins (another process published it first) and `src`
    is discarded. `replace=True`: an existing `folder` is swapped out atomically and removed.
    `src` must be on the same file system as `folder` (a sibling, see `temp_sibling`).
    """
    src, folder = Path(src), Path(folder)
    fsync_tree(src)
    if not folder.exists():
        try:
            os.rename(src, folder)
            _fsync_dir(folder.parent)
            return folder
        except OSError:
            if not folder.exists():
                raise  # a real failure, not a concurrent writer that got there first
    if not replace:
        shutil.rmtree(src, ignore_errors=True)
        return folder
    try:
        _exchange(src, folder)  # `src` now holds the old folder
        shutil.rmtree(src, ignore_errors=True)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        _swap_aside(src, folder)
    _fsync_dir(folder.parent)
    return folder


@contextlib.contextmanager
def scratch_dir(folder: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary sibling of `folder`, removed when the block ends.

    For a writer that makes its own subfolder (a download): it publishes that subfolder with
    `publish_dir(sub, folder)` inside the block. Stale entries left beside `folder` by dead
    writers are cleaned first.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(folder.parent)
    tmp = temp_sibling(folder)
    tmp.mkdir()
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when it was published itself


@contextlib.contextmanager
def atomic_dir(folder: str | os.PathLike, *, replace: bool = True) -> Iterator[Path]:
    """Yield an empty temporary sibling of `folder`; publish it as `folder` when the block succeeds.

    Stale entries left beside `folder` by dead writers are cleaned first. On an error the
    temporary folder is removed and `folder` stays as it was.
    """
    with scratch_dir(folder) as tmp:
        yield tmp
        publish_dir(tmp, folder, replace=replace)


def write_file_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to a temporary sibling, flush it and rename it over `path`."""
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return path


# ---------------------------------------------------------------------------------------
# cleaning up after dead writers


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


def _last_change(path: Path) -> float:
    """Newest mtime of `path` and (for a folder) anything in it."""
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for p in path.rglob("*"):
            with contextlib.suppress(OSError):
                newest = max(newest, p.lstat().st_mtime)
    return newest


def is_stale(path: Path, *, max_age_s: float = STALE_AFTER_S, now: float | None = None) -> bool:
    """Whether a temporary entry named by `temp_sibling` belongs to a writer that is gone."""
    m = _ENTRY.match(path.name)
    if m is None:
        return False
    if m["host"] == _HOST and int(m["pid"]) != os.getpid() and not _pid_alive(int(m["pid"])):
        return True
    try:
        return (now if now is not None else time.time()) - _last_change(path) > max_age_s
    except FileNotFoundError:
        return False


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def clean_stale(parent: str | os.PathLike, *, max_age_s: float = STALE_AFTER_S) -> list[str]:
    """Restore or remove the stale temporary entries in `parent`; returns what was done, one line each.

    A stale `.<name>.old-*` whose `<name>` is missing is renamed back to `<name>` (a replace
    that crashed between its two renames); other stale entries are removed.
    """
    parent = Path(parent)
    try:
        entries = sorted(parent.iterdir(), key=lambda p: p.name)
    except FileNotFoundError:
        return []
    done = []
    for path in entries:
        if not is_stale(path, max_age_s=max_age_s):
            continue
        m = _ENTRY.match(path.name)
        target = parent / m["name"]
        if m["kind"] == "old" and not target.exists():
            with contextlib.suppress(OSError):
                os.rename(path, target)
                done.append(f"restored {target} from {path.name}")
                continue
        _remove(path)
        done.append(f"removed {path}")
    return done
