"""The server's signing keys: the current private key (a file) and the published public keys (DB).

Rotation: `modelowner-server rotate-signing-key` writes a new key file (mode 0600, atomically replacing
the old one) and publishes it as `active`; the previous active key becomes `retired` (still published,
so manifests it signed keep verifying through their key id). Running servers and workers notice the new
file the next time they sign. Pointing SCALEOT_SIGNING_KEY at another file and restarting works too.
`revoke` marks a key `revoked`: clients drop it from their trusted set, and the server re-signs any
manifest whose key is revoked the next time it is requested.

The key file must be readable by its owner only: a new one is created 0600, and a group- or
world-accessible one is reported in the log at startup.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select
from sqlalchemy.orm import Session

from model_owner_server.models import EmulatorRow, SigningKeyRecord, utcnow
from shared import signing

log = logging.getLogger("scaleot.keyring")


def loose_permissions(path: Path) -> int | None:
    """The file's mode when group or others may access it (a private key must be 0600), else None."""
    mode = stat.S_IMODE(path.stat().st_mode)
    return mode if mode & 0o077 else None


def _write_key(path: Path, key: Ed25519PrivateKey) -> None:
    """Atomically put `key` at `path` as PEM (0600 from the first byte; the folder 0700 if new)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class KeyRing:
    def __init__(self, key_path: Path):
        self.path = Path(key_path)
        if not self.path.exists():
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._load()
        mode = loose_permissions(self.path)
        if mode is not None:
            log.warning(
                "signing key file %s has mode %04o: group/others can read it; run `chmod 600 %s`",
                self.path,
                mode,
                self.path,
            )

    def _stamp(self) -> tuple[int, int, int]:
        st = self.path.stat()
        return st.st_ino, st.st_mtime_ns, st.st_size

    def _load(self) -> None:
        self.private_key: Ed25519PrivateKey = signing.load_or_create_private_key(self.path)
        self.key_id = signing.key_id(self.private_key.public_key())
        self.public_b64 = signing.public_key_to_b64(self.private_key.public_key())
        self._file_stamp = self._stamp()

    def refresh(self) -> bool:
        """Reload the key when its file was replaced (rotation); True when the key changed."""
        try:
            stamp = self._stamp()
        except FileNotFoundError:
            return False  # keep signing with the key in memory; a restart creates a new one
        if stamp == self._file_stamp:
            return False
        with self._lock:
            old = self.key_id
            try:
                self._load()
            except (ValueError, OSError) as exc:  # e.g. caught mid-write by a manual copy: try next time
                log.error("could not reload signing key %s: %s", self.path, exc)
                return False
            if self.key_id != old:
                log.warning("signing key changed on disk: now signing with %s (was %s)", self.key_id, old)
            return self.key_id != old

    def publish(self, session: Session) -> None:
        """Make the current key `active` in the DB and retire any other active key."""
        rec = session.get(SigningKeyRecord, self.key_id)
        if rec is None:
            session.add(SigningKeyRecord(key_id=self.key_id, public_key=self.public_b64, status="active"))
        elif rec.status == "revoked":
            raise RuntimeError(f"signing key {self.key_id} was revoked; configure a new SCALEOT_SIGNING_KEY file")
        else:
            rec.status, rec.retired_at = "active", None
        for other in session.execute(
            select(SigningKeyRecord).where(SigningKeyRecord.status == "active", SigningKeyRecord.key_id != self.key_id)
        ).scalars():
            other.status, other.retired_at = "retired", utcnow()

    def sign(self, manifest: dict[str, Any]) -> dict[str, Any]:
        self.refresh()
        with self._lock:
            return signing.sign_manifest(self.private_key, {**manifest, "key_id": self.key_id})

    @staticmethod
    def rotate(session: Session, key_path: Path, *, revoke_old: bool = False) -> tuple[str, list[str]]:
        """Publish a new key as active (others retired, or revoked with `revoke_old`), then put its file in
        place. Returns (new key id, ids of the keys it replaced). The database is committed first: a crash
        in between leaves the old file, and the next start re-activates the old key (KeyRing.publish)."""
        key_path = Path(key_path)
        new = Ed25519PrivateKey.generate()
        kid, b64 = signing.key_id(new.public_key()), signing.public_key_to_b64(new.public_key())
        replaced = []
        for rec in session.execute(select(SigningKeyRecord).where(SigningKeyRecord.status == "active")).scalars():
            replaced.append(rec.key_id)
            if revoke_old:
                rec.status, rec.revoked_at = "revoked", utcnow()
            else:
                rec.status, rec.retired_at = "retired", utcnow()
        session.add(SigningKeyRecord(key_id=kid, public_key=b64, status="active"))
        session.commit()
        _write_key(key_path, new)
        return kid, replaced

    @staticmethod
    def revoke(session: Session, key_id: str) -> SigningKeyRecord:
        rec = session.get(SigningKeyRecord, key_id)
        if rec is None:
            raise KeyError(key_id)
        rec.status, rec.revoked_at = "revoked", utcnow()
        return rec

    @staticmethod
    def is_revoked(session: Session, key_id: str) -> bool:
        rec = session.get(SigningKeyRecord, key_id)
        return rec is None or rec.status == "revoked"


def manifest_for(emu: EmulatorRow) -> dict[str, Any]:
    """The manifest the server signs for a ready emulator (at build time by its job, or lazily by the API)."""
    manifest = signing.emulator_manifest(
        emulator_id=emu.id,
        model_id=emu.model_id,
        sha256=emu.sha256,
        size_bytes=emu.size_bytes,
        layer_plan=emu.plan,
        key_id="",
    )
    # Signed too: the storage dtype and the LoRA the server accepts (absent on emulators built before them).
    issued = {k: (emu.build_info or {}).get(k) for k in ("dtype", "lora")}
    return {**manifest, **{k: v for k, v in issued.items() if v is not None}}
