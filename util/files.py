"""Atomic file writes: a reader (or a resumed run) never sees a half-written file."""
from __future__ import annotations

import os
import socket
import time
import uuid
from pathlib import Path

TEMP_SUFFIX = ".tmp"
STALE_AFTER_S = 3600.0  # a temp file lives for one write; one this old is left over on any machine


def _host() -> str:
    return socket.gethostname().replace(".", "_").replace("-", "_") or "host"


def temp_path(path: Path) -> Path:
    """`.NAME.<host>-<pid>.<uuid>.tmp` next to `path`: unique per call, and says which process wrote it."""
    return path.parent / f".{path.name}.{_host()}-{os.getpid()}.{uuid.uuid4().hex}{TEMP_SUFFIX}"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` through a temporary file in the same folder and an atomic rename.

    The temporary name is unique per process and call; it is created with open(), so the
    file gets the usual umask permissions. Flushed to disk before the rename.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def is_stale_temp(path: Path, now: float | None = None) -> bool:
    """A temp file of `atomic_write_bytes` whose writer is gone.

    Gone: written on this machine by a process that no longer runs (e.g. killed with
    SIGKILL mid-write), or older than STALE_AFTER_S wherever it was written (shards on other
    machines sharing the folder keep their live temp files for milliseconds only).
    """
    name = path.name
    if not (name.startswith(".") and name.endswith(TEMP_SUFFIX)):
        return False
    parts = name[:-len(TEMP_SUFFIX)].rsplit(".", 2)  # ['.NAME', '<host>-<pid>' or '<pid>', '<uuid>']
    if len(parts) != 3:
        return False
    host, _, pid = parts[1].rpartition("-")
    try:
        age = (now or time.time()) - path.stat().st_mtime
    except FileNotFoundError:
        return False
    if age > STALE_AFTER_S:
        return True
    return pid.isdigit() and host in ("", _host()) and not _pid_alive(int(pid))


def remove_stale_temp_files(folder: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Delete the stale temp files (see `is_stale_temp`) in `folder` (and its subfolders); return them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in (folder.rglob(f".*{TEMP_SUFFIX}") if recursive else folder.glob(f".*{TEMP_SUFFIX}")):
        if p.is_file() and is_stale_temp(p):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed
