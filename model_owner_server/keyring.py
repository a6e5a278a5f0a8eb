"""The server's signing keys: the current private key (a file) and the published public keys (DB).

Rotation: point SCALEOT_SIGNING_KEY at a new file (or move the old one away) and restart; the new key
becomes `active`, the previous active key `retired` (still published, so manifests it signed keep
verifying). `revoke` marks a key `revoked`: clients drop it from their trusted set, and the server
re-signs any manifest whose key is revoked the next time it is requested.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select
from sqlalchemy.orm import Session

from model_owner_server.models import SigningKeyRecord, utcnow
from shared import signing


class KeyRing:
    def __init__(self, key_path: Path):
        self.private_key: Ed25519PrivateKey = signing.load_or_create_private_key(key_path)
        self.key_id = signing.key_id(self.private_key.public_key())
        self.public_b64 = signing.public_key_to_b64(self.private_key.public_key())

    def publish(self, session: Session) -> None:
        """Make the current key `active` in the DB and retire any other active key."""
        rec = session.get(SigningKeyRecord, self.key_id)
        if rec is None:
            session.add(SigningKeyRecord(key_id=self.key_id, public_key=self.public_b64, status="active"))
        elif rec.status == "revoked":
            raise RuntimeError(f"signing key {self.key_id} was revoked; configure a new SCALEOT_SIGNING_KEY file")
        else:
            rec.status, rec.retired_at = "active", None
        for other in session.execute(select(SigningKeyRecord).where(SigningKeyRecord.status == "active",
                                                                     SigningKeyRecord.key_id != self.key_id)
                                     ).scalars():
            other.status, other.retired_at = "retired", utcnow()

    def sign(self, manifest: dict[str, Any]) -> dict[str, Any]:
        return signing.sign_manifest(self.private_key, {**manifest, "key_id": self.key_id})

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
