"""Artifact storage under SCALEOT_DATA_DIR.

Layout:
    emulators/<emulator_id>.safetensors
    adapters/<adapter_id>/adapter.safetensors (+ eval<suffix> when the upload had one)
    importance/<run_id>/                       (scores + harmonizers, written by scaleot.importance)
    tmp/                                       (uploads and builds in progress; same filesystem)
Everything is first written under tmp/ (or a temp name next to the target) and then moved into place
with os.replace, so a reader never sees a half-written file. The DB stores paths relative to the
data dir so the directory can be moved.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path


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
        """A fresh name under tmp/ (nothing created)."""
        self.tmp.mkdir(parents=True, exist_ok=True)
        return self.tmp / f"{secrets.token_hex(8)}{suffix}"

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
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
