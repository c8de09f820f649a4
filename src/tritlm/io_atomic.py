"""Crash-safe writes: the one place tritlm puts a file or a folder in place atomically.

:func:`atomic_path` yields a temporary sibling of the destination; when the block succeeds the
temporary's contents are fsynced (every file of a folder, and the folder), it is renamed over the
destination, and the parent folder is fsynced so the rename itself survives a power cut. When the
block raises, the temporary is removed and the destination is untouched. A process killed at any
moment leaves the old destination (or none) plus, at worst, a temporary under a hidden or
``*.tmp-*`` name, never a partial file under the real name.

No tritlm imports: every layer (formats, train, data, infer) may use it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "fsync_dir", "fsync_file", "fsync_tree", "write_bytes_atomic", "write_json_atomic",
           "write_text_atomic"]


def fsync_file(path: str | Path) -> None:
    """Flush a written file's contents to the disk."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries (names created, renamed or removed in it) to the disk."""
    if os.name == "nt":  # folders cannot be opened there; NTFS journals renames itself
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):  # file systems without folder fsync
            raise
    finally:
        os.close(fd)


def fsync_tree(path: str | Path) -> None:
    """fsync every file under ``path``, then every folder (deepest first), then ``path`` itself."""
    root = Path(path)
    dirs = []
    for p in root.rglob("*"):
        if p.is_symlink():
            continue
        if p.is_file():
            fsync_file(p)
        elif p.is_dir():
            dirs.append(p)
    for d in sorted(dirs, key=lambda d: len(d.parts), reverse=True):
        fsync_dir(d)
    fsync_dir(root)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            p.unlink()


@contextlib.contextmanager
def atomic_path(dest: str | Path, is_dir: bool = False, *, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary sibling path to write ``dest`` into; put it in place only if the block succeeds.

    ``is_dir``: the temporary is an (empty, existing) folder, and an existing ``dest`` folder is
    replaced whole (moved aside, the new one renamed in, the old one removed). A file temporary is
    an empty file (writers open it themselves).

    ``suffix``: name the temporary ``dest.name + suffix`` (and the old folder moved aside
    ``dest.name + ".old" + suffix``) instead of a unique hidden ``.NAME.XXXX.tmp`` name, for callers
    whose clean-up of killed runs recognises their temporaries by name (e.g. ``".tmp-<pid>"``);
    a stale temporary of that name is removed first.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if suffix is not None:
        tmp = dest.with_name(dest.name + suffix)
        old = dest.with_name(dest.name + ".old" + suffix)
        _remove(tmp)
        if is_dir:
            tmp.mkdir()
    else:
        old = dest.with_name(f".{dest.name}.old")
        if is_dir:
            tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
        else:
            fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
            os.close(fd)
            tmp = Path(name)
    try:
        yield tmp
        if is_dir:
            fsync_tree(tmp)
            if dest.exists():  # a folder cannot be renamed over a non-empty one: swap
                _remove(old)
                os.replace(dest, old)
                os.replace(tmp, dest)
                fsync_dir(dest.parent)
                _remove(old)
            else:
                os.replace(tmp, dest)
        else:
            fsync_file(tmp)
            os.replace(tmp, dest)
        fsync_dir(dest.parent)
    except BaseException:
        _remove(tmp)
        raise


def write_bytes_atomic(path: str | Path, data: bytes, *, suffix: str | None = None) -> Path:
    """Write ``data`` to ``path`` through :func:`atomic_path`; the path."""
    path = Path(path)
    with atomic_path(path, suffix=suffix) as tmp:
        tmp.write_bytes(data)
    return path


def write_text_atomic(path: str | Path, text: str, *, suffix: str | None = None) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through :func:`atomic_path`; the path."""
    return write_bytes_atomic(path, text.encode("utf-8"), suffix=suffix)


def write_json_atomic(path: str | Path, obj: Any, *, suffix: str | None = None, indent: int | None = 2,
                      sort_keys: bool = False) -> Path:
    """``json.dump(obj, indent=indent, sort_keys=sort_keys)`` to ``path`` through :func:`atomic_path`."""
    return write_text_atomic(path, json.dumps(obj, indent=indent, sort_keys=sort_keys), suffix=suffix)
