"""Atomic folder publishing: never a moment without the folder, old copy back after a crash,
stale temporary entries of dead writers cleaned, live writers' entries left alone."""
from __future__ import annotations

import errno
import multiprocessing
import os
import threading
import time

import pytest

from comfusion import fsutil
from comfusion.fsutil import atomic_dir, clean_stale, is_stale, publish_dir, temp_sibling, write_file_atomic


def _make(folder, text: str):
    folder.mkdir(parents=True)
    (folder / "a.txt").write_text(text)
    (folder / "sub").mkdir()
    (folder / "sub" / "b.txt").write_text(text * 2)


def _hidden(parent) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_atomic_dir_publishes_and_replaces(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("one")
    assert (target / "a.txt").read_text() == "one"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("two")
    assert (target / "a.txt").read_text() == "two"
    assert _hidden(tmp_path) == []


def test_failed_block_leaves_the_old_folder_and_no_temp(tmp_path):
    target = tmp_path / "ckpt"
    _make(target, "old")
    with pytest.raises(RuntimeError, match="boom"), atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("new")
        raise RuntimeError("boom")
    assert (target / "a.txt").read_text() == "old"
    assert _hidden(tmp_path) == []


def test_replace_false_keeps_the_first_publisher(tmp_path):
    target = tmp_path / "preset"
    _make(target, "first")
    with atomic_dir(target, replace=False) as tmp:
        (tmp / "a.txt").write_text("second")
    assert (target / "a.txt").read_text() == "first"
    assert _hidden(tmp_path) == []


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "rename-aside"])
def test_a_reader_never_finds_the_folder_missing(tmp_path, monkeypatch, exchange):
    if not exchange:  # a file system without RENAME_EXCHANGE: the two-rename fallback
        def no_exchange(a, b):
            raise OSError(errno.EINVAL, "not supported")
        monkeypatch.setattr(fsutil, "_exchange", no_exchange)
    target = tmp_path / "ckpt"
    _make(target, "v0")
    misses, reads, stop = [], [0], threading.Event()

    def reader():
        while not stop.is_set():
            try:
                (target / "a.txt").read_text()
                reads[0] += 1
            except FileNotFoundError:
                misses.append(time.monotonic())

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(150):
            with atomic_dir(target) as tmp:
                (tmp / "a.txt").write_text(f"v{i + 1}")
    finally:
        stop.set()
        t.join()
    assert (target / "a.txt").read_text() == "v150"
    assert reads[0] > 0
    if exchange:
        assert misses == [], f"the folder was missing {len(misses)} times"
    assert _hidden(tmp_path) == []


def _crash_between_renames(target: str) -> None:
    """Child process: a replace without RENAME_EXCHANGE that dies after moving the old folder aside."""
    real_rename = os.rename

    def rename_then_die(src, dst):
        real_rename(src, dst)
        if ".old-" in os.fspath(dst):
            os._exit(9)

    fsutil._exchange = lambda a, b: (_ for _ in ()).throw(OSError(errno.EINVAL, "no exchange"))
    os.rename = rename_then_die
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("new")


def test_crash_between_renames_restores_the_old_copy(tmp_path):
    target = tmp_path / "ckpt"
    _make(target, "old")
    child = multiprocessing.get_context("fork").Process(target=_crash_between_renames, args=(str(target),))
    child.start()
    child.join(60)
    assert child.exitcode == 9
    assert not target.exists()  # the crash left the folder moved aside ...
    assert [n for n in _hidden(tmp_path) if ".old-" in n]
    done = clean_stale(tmp_path)  # ... and the next start puts it back, dropping the dead temp folder
    assert (target / "a.txt").read_text() == "old"
    assert (target / "sub" / "b.txt").read_text() == "oldold"
    assert _hidden(tmp_path) == [], done
    assert any(line.startswith("restored") for line in done)


def test_old_copy_of_a_published_folder_is_removed(tmp_path):
    target = tmp_path / "ckpt"
    _make(target, "new")
    old = temp_sibling(target, "old")
    _make(old, "old")
    for p in [old, *old.rglob("*")]:  # written by this (live) process, but untouched for 10 s
        os.utime(p, (time.time() - 10, time.time() - 10))
    assert clean_stale(tmp_path, max_age_s=1.0) == [f"removed {old}"]
    assert (target / "a.txt").read_text() == "new"


def _sleep_forever() -> None:
    time.sleep(600)


def test_only_entries_of_dead_or_silent_writers_are_stale(tmp_path):
    ctx = multiprocessing.get_context("fork")
    dead = ctx.Process(target=_sleep_forever)
    dead.start()
    dead.kill()
    dead.join()
    alive = ctx.Process(target=_sleep_forever)
    alive.start()
    try:
        host = fsutil._HOST
        dead_tmp = tmp_path / f".ckpt.tmp-{host}-{dead.pid}-0123abcd"
        live_tmp = tmp_path / f".ckpt.tmp-{host}-{alive.pid}-0123abcd"
        other_host = tmp_path / ".shard.parquet.tmp-ffffffff-1-0123abcd"
        user_file = tmp_path / ".keep.tmp-notours"
        for p in (dead_tmp, live_tmp):
            _make(p, "x")
        other_host.write_bytes(b"x")
        user_file.write_bytes(b"x")
        assert is_stale(dead_tmp) and not is_stale(live_tmp) and not is_stale(user_file)
        assert not is_stale(other_host)  # another host's writer: only after max_age_s without a change
        assert is_stale(other_host, now=time.time() + fsutil.STALE_AFTER_S + 5)
        clean_stale(tmp_path)
        assert _hidden(tmp_path) == sorted([live_tmp.name, other_host.name, user_file.name])
    finally:
        alive.kill()
        alive.join()


def test_write_file_atomic_replaces_in_one_step(tmp_path):
    path = tmp_path / "manifest.json"
    write_file_atomic(path, b"one")
    write_file_atomic(path, b"two")
    assert path.read_bytes() == b"two"
    assert _hidden(tmp_path) == []


def test_publish_dir_refuses_a_missing_source(tmp_path):
    with pytest.raises(FileNotFoundError):
        publish_dir(tmp_path / "nope", tmp_path / "target")
