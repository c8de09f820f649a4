"""Crash-safe writes: the one place tritlm puts a file or a folder in place atomically.

:func:`atomic_path` yields a temporary sibling of the destination; when the block succeeds the
temporary's contents are fsynced (every file of a folder, and the folder), it is renamed over the
destination, and the parent folder is fsynced so the rename itself survives a power cut. When the
block raises, the temporary is removed and the destination is untouched. A process killed at any
moment leaves the old destination (or none) plus, at worst, a temporary under a hidden or
``*.tmp-*`` name, never a partial file under the real name.

A write that fails with an ``OSError`` (a full disk, a quota, a read-only folder) raises a one-line
:class:`tritlm.errors.DiskFullError` / :class:`tritlm.errors.WriteError` naming the path (and the
free space), with the temporary removed. Files are created with the mode a plain ``open()`` gives
(``0o666 & ~umask``) and folders with ``0o777 & ~umask``, not ``mkstemp``'s 0600 / 0700.

:func:`run_lock` locks an output folder for one process (pid + host + start time, created with an
atomic ``link``); a lock whose pid is dead is taken over with a warning.

The only tritlm import is :mod:`tritlm.errors` (no imports of its own): every layer (formats,
train, data, infer) may use it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tritlm.errors import DiskFullError, RunLockedError, TritlmError, WriteError

__all__ = ["atomic_path", "fsync_dir", "fsync_file", "fsync_tree", "recover_swap", "run_lock",
           "write_bytes_atomic", "write_json_atomic", "write_text_atomic", "write_error"]

log = logging.getLogger(__name__)
_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _umask() -> int:
    """The process umask, read without changing it where /proc allows."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def _free(path: Path) -> str:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        n = float(shutil.disk_usage(p).free)
    except OSError:
        return "unknown"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return "unknown"


def write_error(path: str | Path, e: OSError) -> WriteError:
    """The one-line user error for an ``OSError`` while writing ``path``."""
    path = Path(path)
    if e.errno in _NO_SPACE:
        what = "quota exceeded" if e.errno == getattr(errno, "EDQUOT", None) else "no space left on the disk"
        return DiskFullError(f"cannot write {path}: {what} ({_free(path.parent)} free); "
                             "free some space and retry (nothing was replaced)")
    return WriteError(f"cannot write {path}: {e.strerror or e} (nothing was replaced)")


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


def _old_name(dest: Path, suffix: str | None) -> Path:
    return dest.with_name(dest.name + ".old" + suffix) if suffix is not None else dest.with_name(f".{dest.name}.old")


def recover_swap(dest: str | Path, suffix: str | None = None) -> bool:
    """Undo a folder swap cut between its two renames: ``dest`` missing and its moved-aside copy
    present -> the copy is renamed back. True if it did."""
    dest = Path(dest)
    old = _old_name(dest, suffix)
    if old.is_dir() and not dest.exists():
        log.warning("restoring %s from %s (a replacement was interrupted)", dest.name, old.name)
        os.replace(old, dest)
        fsync_dir(dest.parent)
        return True
    return False


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
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        old = _old_name(dest, suffix)
        if is_dir:
            recover_swap(dest, suffix)
        if suffix is not None:
            tmp = dest.with_name(dest.name + suffix)
            _remove(tmp)
            if is_dir:
                tmp.mkdir()
        else:
            umask = _umask()
            if is_dir:
                tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
                os.chmod(tmp, 0o777 & ~umask)
            else:
                fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
                try:
                    os.fchmod(fd, 0o666 & ~umask) if hasattr(os, "fchmod") else os.chmod(name, 0o666 & ~umask)
                finally:
                    os.close(fd)
                tmp = Path(name)
    except OSError as e:
        raise write_error(dest, e) from None
    try:
        yield tmp
        if is_dir:
            fsync_tree(tmp)
            if dest.exists():  # a folder cannot be renamed over a non-empty one: swap
                _remove(old)
                os.replace(dest, old)
                _swap_point()
                os.replace(tmp, dest)
                fsync_dir(dest.parent)
                _remove(old)
            else:
                os.replace(tmp, dest)
        else:
            fsync_file(tmp)
            os.replace(tmp, dest)
        fsync_dir(dest.parent)
    except TritlmError:
        _remove(tmp)
        raise
    except OSError as e:
        _remove(tmp)
        if is_dir:
            recover_swap(dest, suffix)
        raise write_error(dest, e) from None
    except BaseException:
        _remove(tmp)
        raise


def _swap_point() -> None:
    """Test hook between the two renames of a folder swap (monkeypatched to simulate a kill)."""


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


LOCK_NAME = ".tritlm.lock"


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    except OSError:
        return False
    try:  # a zombie (killed, not yet reaped) is dead
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _read_lock(path: Path) -> dict[str, Any] | None:
    try:
        info = json.loads(path.read_text())
        return info if isinstance(info, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def run_lock(folder: str | Path, name: str = LOCK_NAME) -> Iterator[Path]:
    """Hold ``folder/name`` (pid, host, start time) for the block; refuse while another live process holds it.

    The lock's contents are written to a temporary first and linked into place (``os.link``
    fails if the name exists), so a lock is never seen half-written. A lock whose pid is dead on
    this host is taken over with a warning; one held from another host is refused (its pid cannot
    be checked from here). Released when the block exits, exceptions included.
    """
    folder = Path(folder)
    lock = folder / name
    host = socket.gethostname()
    me = {"pid": os.getpid(), "host": host, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmpname = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
    except OSError as e:
        raise write_error(lock, e) from None
    try:
        for _ in range(5):
            try:
                os.link(tmpname, lock)
                break
            except FileExistsError:
                pass
            except OSError as e:  # file systems without hard links: O_EXCL create
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                    raise write_error(lock, e) from None
                try:
                    lfd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
                except FileExistsError:
                    pass
                else:
                    with os.fdopen(lfd, "w") as f:
                        json.dump(me, f)
                    break
            info = _read_lock(lock)
            if info is None:  # released meanwhile
                continue
            pid = info.get("pid")
            if info.get("host", host) != host:
                raise RunLockedError(f"{folder} is in use by pid {pid} on host {info.get('host')} "
                                     f"(since {info.get('started')}); if that run is dead, remove {lock}")
            if isinstance(pid, int) and _pid_alive(pid) and pid != os.getpid():
                raise RunLockedError(f"{folder} is in use by another run (pid {pid}, since "
                                     f"{info.get('started')}); wait for it or choose another --out")
            log.warning("%s: taking over a stale lock (pid %s, since %s, is no longer running)",
                        folder, pid, info.get("started"))
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
        else:
            raise RunLockedError(f"could not take the lock {lock}; another run keeps taking it")
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmpname)
    try:
        yield lock
    finally:
        if (_read_lock(lock) or {}).get("pid") == os.getpid():
            with contextlib.suppress(OSError):
                lock.unlink()
