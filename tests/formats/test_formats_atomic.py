"""tritlm.io_atomic: the one atomic-write helper (files and folders, fsync before rename)."""

from __future__ import annotations

import json
import os

import pytest

from tritlm import io_atomic
from tritlm.io_atomic import atomic_path, write_json_atomic


def _record(monkeypatch):
    """Log of fsync (by path) and replace calls, in order."""
    calls: list[tuple] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else fd))
        real_fsync(fd)

    def replace(a, b):
        calls.append(("replace", str(a), str(b)))
        real_replace(a, b)

    monkeypatch.setattr(io_atomic.os, "fsync", fsync)
    monkeypatch.setattr(io_atomic.os, "replace", replace)
    return calls


def test_file_contents_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    calls = _record(monkeypatch)
    dest = tmp_path / "sub" / "x.bin"
    with atomic_path(dest) as tmp:
        assert tmp.parent == dest.parent and tmp != dest and not dest.exists()
        tmp.write_bytes(b"hello")
        name = str(tmp)
    assert dest.read_bytes() == b"hello" and sorted(p.name for p in dest.parent.iterdir()) == ["x.bin"]
    i = calls.index(("replace", name, str(dest)))
    if os.path.exists("/proc/self/fd"):
        real = os.path.realpath
        assert ("fsync", real(name)) in calls[:i]  # the contents, before the rename
        assert ("fsync", real(dest.parent)) in calls[i:]  # the rename itself


def test_a_failed_block_leaves_the_old_file_and_no_temporary(tmp_path):
    dest = tmp_path / "x.json"
    dest.write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_path(dest) as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert dest.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_folders_are_replaced_whole(tmp_path, monkeypatch):
    dest = tmp_path / "model"
    dest.mkdir()
    (dest / "stale.txt").write_text("old")
    with atomic_path(dest, is_dir=True) as tmp:
        assert tmp.is_dir() and not any(tmp.iterdir())
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.txt").write_text("new")
    assert [p.relative_to(dest).as_posix() for p in sorted(dest.rglob("*"))] == ["sub", "sub/a.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    with pytest.raises(RuntimeError), atomic_path(dest, is_dir=True) as tmp:
        (tmp / "b.txt").write_text("half")
        raise RuntimeError("disk full")
    assert (dest / "sub" / "a.txt").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["model"]


def test_suffix_names_the_temporaries(tmp_path):
    dest = tmp_path / "step-000001"
    stale = tmp_path / "step-000001.tmp-7"
    stale.mkdir()
    (stale / "junk").write_text("from a killed run")
    with atomic_path(dest, is_dir=True, suffix=".tmp-7") as tmp:
        assert tmp == stale and not any(tmp.iterdir())  # the stale temporary was cleared
        (tmp / "f").write_text("1")
    with atomic_path(dest, is_dir=True, suffix=".tmp-7") as tmp:
        assert not (tmp / "f").exists()
        (tmp / "g").write_text("2")
    assert [p.name for p in dest.iterdir()] == ["g"] and [p.name for p in tmp_path.iterdir()] == ["step-000001"]
    write_json_atomic(tmp_path / "latest.json", {"step": 1}, suffix=".tmp-7")
    assert json.loads((tmp_path / "latest.json").read_text()) == {"step": 1}
    assert (tmp_path / "latest.json").read_text() == json.dumps({"step": 1}, indent=2)


def test_a_full_disk_is_one_line_error_naming_path_and_free_space(tmp_path):
    import errno

    from tritlm.errors import DiskFullError, WriteError

    dest = tmp_path / "x.bin"
    dest.write_bytes(b"old")
    with pytest.raises(DiskFullError, match=r"x\.bin.*no space left.*free") as ei, atomic_path(dest) as tmp:
        tmp.write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert "\n" not in str(ei.value) and isinstance(ei.value, WriteError)
    assert dest.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["x.bin"]
    with pytest.raises(DiskFullError, match="quota"), atomic_path(tmp_path / "d", is_dir=True):
        raise OSError(errno.EDQUOT, "Disk quota exceeded")
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]
    with pytest.raises(WriteError, match="Permission denied"), atomic_path(dest):
        raise PermissionError(errno.EACCES, "Permission denied")
    assert dest.read_bytes() == b"old"


def test_a_full_disk_during_the_folder_swap_keeps_the_old_folder(tmp_path, monkeypatch):
    import errno

    from tritlm.errors import DiskFullError

    dest = tmp_path / "model"
    with atomic_path(dest, is_dir=True) as tmp:
        (tmp / "a").write_text("old")

    def full():
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io_atomic, "_swap_point", full)
    with pytest.raises(DiskFullError), atomic_path(dest, is_dir=True) as tmp:
        (tmp / "a").write_text("new")
    assert (dest / "a").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["model"]


class _Kill(BaseException):
    pass


@pytest.mark.parametrize("suffix", [None, ".tmp-7"])
def test_a_kill_between_the_two_renames_of_a_swap_keeps_one_complete_copy(tmp_path, monkeypatch, suffix):
    dest = tmp_path / "model"
    with atomic_path(dest, is_dir=True, suffix=suffix) as tmp:
        (tmp / "a").write_text("old")

    def kill():
        raise _Kill

    monkeypatch.setattr(io_atomic, "_swap_point", kill)
    monkeypatch.setattr(io_atomic, "_remove", lambda p: None)  # a SIGKILL runs no clean-up
    with pytest.raises(_Kill), atomic_path(dest, is_dir=True, suffix=suffix) as tmp:
        (tmp / "a").write_text("new")
    monkeypatch.undo()
    assert not dest.exists()
    old = [p for p in tmp_path.iterdir() if ".old" in p.name]
    assert len(old) == 1 and (old[0] / "a").read_text() == "old"
    assert io_atomic.recover_swap(dest, suffix)
    assert (dest / "a").read_text() == "old"
    # and the next write of the same folder recovers by itself first
    assert not io_atomic.recover_swap(dest, suffix)


def test_files_and_folders_get_the_mode_of_a_plain_open(tmp_path):
    old = os.umask(0o022)
    try:
        f = io_atomic.write_bytes_atomic(tmp_path / "f.bin", b"x")
        with atomic_path(tmp_path / "d", is_dir=True) as tmp:
            (tmp / "g").write_text("1")
        with open(tmp_path / "plain", "w"):
            pass
        os.umask(0o077)
        g = io_atomic.write_bytes_atomic(tmp_path / "private.bin", b"x")
    finally:
        os.umask(old)
    assert (f.stat().st_mode & 0o777) == 0o644 == ((tmp_path / "plain").stat().st_mode & 0o777)
    assert ((tmp_path / "d").stat().st_mode & 0o777) == 0o755
    assert (g.stat().st_mode & 0o777) == 0o600


def test_run_lock_refuses_a_live_owner_and_takes_over_a_dead_ones(tmp_path, caplog):
    import subprocess
    import sys

    from tritlm.errors import RunLockedError

    code = ("import sys, time\nfrom tritlm.io_atomic import run_lock\n"
            f"with run_lock({str(tmp_path)!r}):\n    print('locked', flush=True)\n    time.sleep(120)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=f"pid {p.pid}") as ei, io_atomic.run_lock(tmp_path):
            pass
        assert "\n" not in str(ei.value)
        assert json.loads((tmp_path / io_atomic.LOCK_NAME).read_text())["pid"] == p.pid  # untouched
    finally:
        p.kill()
        p.wait()
    # the killed owner's lock is stale: taken over with a warning, released at exit (exceptions too)
    with caplog.at_level("WARNING"), pytest.raises(RuntimeError), io_atomic.run_lock(tmp_path) as lock:
        info = json.loads(lock.read_text())
        assert info["pid"] == os.getpid() and info["host"] and info["started"]
        raise RuntimeError("boom")
    assert f"pid {p.pid}" in caplog.text and "stale" in caplog.text
    assert not (tmp_path / io_atomic.LOCK_NAME).exists()
    assert not [q for q in tmp_path.iterdir()]  # no temporaries left either
