"""Leftovers of interrupted work (kill -9, power loss, full disk) are removed, never promoted.

Every artifact is written under a temp name and renamed into place only when complete, and a database
row points at it only after that. A crash can therefore leave, at worst:
- temp files under tmp/ (uploads in flight, importance runs being saved)      -> Storage.sweep_tmp;
- `emulators/.<id>.safetensors.*.tmp` of an emulator build that died        -> removed once the
  emulator is not `building` any more (its job was failed by the restart / reaper);
- `emulators/<id>.safetensors` of an emulator whose build failed after the rename -> removed;
- `adapters/<id>/` moved into place by an upload whose transaction never committed -> removed when
  no adapter row names it and it is older than `min_age_s` (an upload in another process may be
  between its rename and its commit for a few milliseconds).
Runs at startup and on every pass of the job reaper.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from model_owner_server.core.db import session_scope
from model_owner_server.models import AdapterRow, EmulatorRow
from model_owner_server.storage import Storage

log = logging.getLogger("scaleot.janitor")


def _emulator_id_of(path: Path) -> str | None:
    name = path.name
    if name.startswith(".") and name.endswith(".tmp"):  # .<id>.safetensors.<random>.tmp (save_emulator)
        parts = name[1:].split(".")
        return parts[0] if len(parts) >= 3 and parts[1] == "safetensors" else None
    if name.endswith(".safetensors") and not name.startswith("."):
        return name.removesuffix(".safetensors")
    return None


RECENT_S = 3600.0  # periodic passes look only at adapter folders changed this recently (startup: all)
_CHUNK = 500  # ids per IN (...) query (old SQLite builds allow 999 variables)


def _chunks(items: list[str]) -> list[list[str]]:
    return [items[i : i + _CHUNK] for i in range(0, len(items), _CHUNK)]


def sweep(
    sessions: sessionmaker[Session], storage: Storage, *, startup: bool, min_age_s: float
) -> dict[str, list[str]]:
    removed: dict[str, list[str]] = {"tmp": storage.sweep_tmp(startup=startup), "emulators": [], "adapters": []}
    now = time.time()
    emu_files = [p for p in storage.emulators.iterdir() if _emulator_id_of(p)] if storage.emulators.is_dir() else []
    adapter_dirs = [p for p in storage.adapters.iterdir() if p.is_dir()] if storage.adapters.is_dir() else []
    if not startup:
        adapter_dirs = [d for d in adapter_dirs if _age(d, now) < RECENT_S]
    if not emu_files and not adapter_dirs:
        return removed
    status: dict[str, str] = {}
    known: set[str] = set()
    with session_scope(sessions) as s:
        for ids in _chunks(sorted({_emulator_id_of(p) for p in emu_files})):
            status.update(s.execute(select(EmulatorRow.id, EmulatorRow.status).where(EmulatorRow.id.in_(ids))).all())
        for names in _chunks(sorted(p.name for p in adapter_dirs)):
            known.update(s.execute(select(AdapterRow.id).where(AdapterRow.id.in_(names))).scalars())
    for p in emu_files:
        st = status.get(_emulator_id_of(p))
        temp = p.name.startswith(".")
        # A temp file is garbage unless its emulator is building; a final file unless it is building or ready.
        if (temp and st != "building") or (not temp and st in (None, "failed")):
            if st is None and _age(p, now) < min_age_s:
                continue  # its row may be committing in another process right now
            storage.remove(p)
            removed["emulators"].append(p.name)
    for d in adapter_dirs:
        if d.name not in known and _age(d, now) >= min_age_s:
            storage.remove(d)
            removed["adapters"].append(d.name)
    if removed["emulators"] or removed["adapters"]:
        log.warning("removed leftovers of interrupted work: %s", {k: v for k, v in removed.items() if v})
    return removed


def _age(path: Path, now: float) -> float:
    try:
        return now - path.lstat().st_mtime
    except FileNotFoundError:
        return 0.0
