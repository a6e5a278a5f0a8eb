"""Artifact storage under SCALEOT_DATA_DIR.

Layout:
    emulators/<emulator_id>.safetensors
    adapters/<adapter_id>/adapter.safetensors (+ eval<suffix> when the upload had one)
    importance/<run_id>/                       (scores + harmonizers, written by scaleot.importance)
    tmp/                                       (uploads and builds in progress; same filesystem)
Everything is first written under tmp/ (or a temp name next to the target) and then moved into place
with os.replace, so a reader never sees a half-written file. The DB stores paths relative to the
data dir so the directory can be moved.

Names under tmp/ carry the writer's pid and a host tag (`p<pid>_<host8>_<random>`), so after a crash
(kill -9, power loss) `sweep_tmp` can tell leftovers of dead processes from files still being written.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import secrets
import shutil
import socket
import time
from pathlib import Path

log = logging.getLogger("scaleot.storage")
_TMP_NAME = re.compile(r"^p(\d+)_([0-9a-f]{8})_")
FOREIGN_TMP_MAX_AGE_S = 24 * 3600.0  # temp files of another host's processes: removed when this old


_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG})
_DISK_FULL_TEXT = (
    "No space left on device",
    "os error 28",
    "StorageFull",
    "Disk quota exceeded",
    "database or disk is full",
)


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC / EDQUOT / EFBIG from a write: an OSError, or a library's wrapped I/O error (safetensors'
    Rust writer, SQLite's 'database or disk is full')."""
    for e in (exc, exc.__cause__, exc.__context__):
        if isinstance(e, OSError) and e.errno in _DISK_FULL_ERRNOS:
            return True
    text = str(exc)
    return any(t in text for t in _DISK_FULL_TEXT)


def host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OverflowError:
        return False
    return True


class Storage:
    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.emulators = self.root / "emulators"
        self.adapters = self.root / "adapters"
        self.importance = self.root / "importance"
        self.tmp = self.root / "tmp"

    def ensure_layout(self) -> None:
        for d in (self.root, self.emulators, self.adapters, self.importance, self.tmp):
            d.mkdir(parents=True, exist_ok=True)

    def abs(self, rel: str | Path) -> Path:
        path = (self.root / rel).resolve()
        if self.root not in path.parents and path != self.root:
            raise ValueError(f"{rel!r} points outside the data directory")
        return path

    def rel(self, path: Path) -> str:
        return Path(path).resolve().relative_to(self.root).as_posix()

    def temp_path(self, suffix: str = "") -> Path:
        """A fresh name under tmp/ (nothing created), tagged with this process's pid and host."""
        self.tmp.mkdir(parents=True, exist_ok=True)
        return self.tmp / f"p{os.getpid()}_{host_tag()}_{secrets.token_hex(8)}{suffix}"

    def sweep_tmp(self, *, startup: bool) -> list[str]:
        """Remove tmp/ entries left by processes that are gone; return their names.

        Ours (same host): the writer's pid is dead, or, at startup, the pid is our own (a previous
        incarnation: containers reuse pids; this process has written nothing yet). Another host's, or
        untagged: only when older than a day (we cannot see whether its writer is still alive).
        """
        removed: list[str] = []
        if not self.tmp.is_dir():
            return removed
        me, tag, now = os.getpid(), host_tag(), time.time()
        for entry in self.tmp.iterdir():
            m = _TMP_NAME.match(entry.name)
            if m and m.group(2) == tag:
                pid = int(m.group(1))
                dead = (startup and pid == me) or (pid != me and not pid_alive(pid))
            else:
                try:
                    dead = now - entry.lstat().st_mtime > FOREIGN_TMP_MAX_AGE_S
                except FileNotFoundError:
                    continue
            if dead:
                self.remove(entry)
                removed.append(entry.name)
        if removed:
            log.warning(
                "removed %d leftover temp file(s) of interrupted writes: %s",
                len(removed),
                ", ".join(sorted(removed)[:10]),
            )
        return removed

    @staticmethod
    def fsync_file(path: Path) -> None:
        with open(path, "rb") as f:
            os.fsync(f.fileno())

    def commit_file(self, tmp: Path, final: Path) -> Path:
        """fsync then atomically move a finished temp file into place."""
        final.parent.mkdir(parents=True, exist_ok=True)
        self.fsync_file(tmp)
        os.replace(tmp, final)
        return final

    def commit_dir(self, tmp_dir: Path, final: Path) -> Path:
        """Atomically move a finished directory into place (replacing nothing)."""
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp_dir, final)
        return final

    @staticmethod
    def remove(path: Path | None) -> None:
        if path is None:
            return
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
