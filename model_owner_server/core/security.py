"""API keys: random bearer tokens; the database stores only their sha256.

A key is `sot_` + 32 random bytes (urlsafe base64). Lookup goes by the hash (an index hit), and the
final comparison uses `hmac.compare_digest` so no timing difference depends on key bytes.

A key is active until it is revoked (`revoked_at`) or its `expires_at` passes (SCALEOT_API_KEY_TTL_DAYS for
new keys, or the grace period of a rotation). `check_api_key` says which, so a refused caller learns what to
do next; `last_used_at` is refreshed at most once a minute, outside the request's transaction.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from model_owner_server.models import ApiKey, Organization, utcnow

KEY_PREFIX = "sot_"
ROLES = ("admin", "data-owner")
TOUCH_EVERY = timedelta(minutes=1)  # last_used_at / a console session's last_seen_at: at most this fresh
MAX_KEY_DAYS = 3650
log = logging.getLogger("scaleot.security")


def generate_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def issue_api_key(
    session: Session,
    org: Organization,
    *,
    name: str | None = None,
    expires_in_days: int | None = None,
    expires_at: datetime | None = None,
) -> str:
    """Create a key for `org`; the plaintext is returned once and never stored."""
    return issue_api_key_row(session, org, name=name, expires_in_days=expires_in_days, expires_at=expires_at)[1]


def issue_api_key_row(
    session: Session,
    org: Organization,
    *,
    name: str | None = None,
    expires_in_days: int | None = None,
    expires_at: datetime | None = None,
) -> tuple[ApiKey, str]:
    key = generate_api_key()
    now = utcnow()
    if expires_at is None and expires_in_days is not None:
        expires_at = now + timedelta(days=expires_in_days)
    row = ApiKey(
        org_id=org.id, key_hash=hash_api_key(key), prefix=key[:10], name=name, created_at=now, expires_at=expires_at
    )
    session.add(row)
    session.flush()
    return row, key


def key_state(key: ApiKey, now: datetime | None = None) -> str:
    """active | revoked | expired."""
    if key.revoked_at is not None:
        return "revoked"
    if key.expires_at is not None and key.expires_at <= (now or utcnow()):
        return "expired"
    return "active"


@dataclass(frozen=True)
class KeyCheck:
    """What a presented key is worth: the organization (None: refused), the key's row when it exists, and for
    a refusal the reason (unknown | revoked | expired) and a message that says what to do next."""

    org: Organization | None
    key: ApiKey | None
    reason: str
    message: str


NEW_KEY_HINT = (
    "ask the model owner for a new one (`modelowner-server create-key ORG`), or create one with another of your "
    "organization's keys (POST /v1/orgs/{org}/keys)"
)


def check_api_key(session: Session, key: str) -> KeyCheck:
    if not key or len(key) > 200:
        return KeyCheck(None, None, "unknown", "invalid API key")
    digest = hash_api_key(key)
    row = session.execute(select(ApiKey).where(ApiKey.key_hash == digest)).scalar_one_or_none()
    if row is None or not hmac.compare_digest(row.key_hash, digest):
        return KeyCheck(None, None, "unknown", "invalid API key")
    now = utcnow()
    state = key_state(row, now)
    if state == "revoked":
        return KeyCheck(None, row, "revoked", f"this API key ({row.prefix}…) was revoked; {NEW_KEY_HINT}")
    if state == "expired":
        assert row.expires_at is not None
        return KeyCheck(
            None,
            row,
            "expired",
            f"this API key ({row.prefix}…) expired at {row.expires_at:%Y-%m-%d %H:%M} UTC; {NEW_KEY_HINT}",
        )
    org = session.get(Organization, row.org_id)
    if org is None:
        return KeyCheck(None, row, "unknown", "invalid API key")
    if row.last_used_at is None or now - row.last_used_at >= TOUCH_EVERY:
        touch(session, update(ApiKey).where(ApiKey.id == row.id).values(last_used_at=now), f"key:{row.id}")
        set_committed_value(row, "last_used_at", now)  # not dirty: a GET must not flush a write (SQLite lock)
    return KeyCheck(org, row, "ok", "")


def organization_for_key(session: Session, key: str) -> Organization | None:
    return check_api_key(session, key).org


_touching: set[str] = set()  # bookkeeping writes in flight in this process, by what they update
_touching_lock = threading.Lock()


def touch(session: Session, statement: Any, what: str) -> None:
    """Run a bookkeeping UPDATE (a last-use time) as its own short transaction on the request's own connection.

    Its own transaction: it is kept whether or not the request commits, and a read-only request never holds the
    write lock (SQLite) for its whole length. The request's own connection: a second pool checkout per request
    would deadlock the pool as soon as more requests than connections arrive at once. Only one refresh of the
    same `what` runs at a time in this process (a burst of requests with one key writes once). Never raises: a
    failure is logged and costs the caller nothing. Skipped when the session holds pending changes (it never
    commits a caller's work)."""
    if session.new or session.dirty or session.deleted:
        return
    with _touching_lock:
        if what in _touching:
            return
        _touching.add(what)
    try:
        session.commit()  # ends the read transaction so far (nothing pending: checked above)
        session.execute(statement)
        session.commit()
    except Exception:
        session.rollback()
        log.warning("could not record a last-use time", exc_info=True)
    finally:
        with _touching_lock:
            _touching.discard(what)
