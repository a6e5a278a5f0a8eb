"""API keys: random bearer tokens; the database stores only their sha256.

A key is `sot_` + 32 random bytes (urlsafe base64). Lookup goes by the hash (an index hit), and the
final comparison uses `hmac.compare_digest` so no timing difference depends on key bytes.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from model_owner_server.models import ApiKey, Organization

KEY_PREFIX = "sot_"
ROLES = ("admin", "data-owner")


def generate_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def issue_api_key(session: Session, org: Organization) -> str:
    """Create a key for `org`; the plaintext is returned once and never stored."""
    key = generate_api_key()
    session.add(ApiKey(org_id=org.id, key_hash=hash_api_key(key), prefix=key[:10]))
    return key


def organization_for_key(session: Session, key: str) -> Organization | None:
    if not key or len(key) > 200:
        return None
    digest = hash_api_key(key)
    row = session.execute(
        select(ApiKey).where(ApiKey.key_hash == digest, ApiKey.revoked_at.is_(None))
    ).scalar_one_or_none()
    if row is None or not hmac.compare_digest(row.key_hash, digest):
        return None
    return session.get(Organization, row.org_id)
