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
