"""The audit log as a hash chain, and the bounded record of failed sign-ins.

Every row carries `seq` (1, 2, ... without gaps), `prev_hash` (the previous row's `row_hash`; 64 zeros for
the first) and `row_hash` = sha256(prev_hash + "\\n" + the row's canonical JSON). `verify_chain` walks the
rows in order and names the first one that was edited, deleted or inserted outside the server; the one-row
table `audit_chain_head` holds the newest (seq, hash), so deleting the newest rows shows too. (Whoever can
rewrite the whole table and the head can forge a consistent chain: record `head_hash` from
`verify-audit-log` elsewhere now and then to detect that too.)

Appending never forks the chain. `crud.audit` only queues the event on the session; just before that
session commits, `_append_queued` flushes the transaction's other writes, then takes the head row's lock
(`UPDATE audit_chain_head ...`: a row lock on PostgreSQL, the database write lock on SQLite), numbers and
hashes the queued events, inserts them and moves the head, and the commit releases the lock. Taking the
lock last keeps it for milliseconds and cannot deadlock with the transaction's own row locks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

from fastapi import Request
from sqlalchemy import CursorResult, event, select, update
from sqlalchemy.orm import Session, SessionTransaction, sessionmaker

from model_owner_server.core.security import KeyCheck
from model_owner_server.models import AuditChainHead, AuditEvent, new_id, utcnow

log = logging.getLogger("scaleot.audit")

GENESIS = "0" * 64
HEAD_ID = 1
_QUEUE_KEY = "scaleot_audit_queue"


# ---------------------------------------------------------------- hashing


def _utc_iso(t: datetime) -> str:
    t = t if t.tzinfo else t.replace(tzinfo=UTC)  # SQLite hands datetimes back without a zone; they are UTC
    return t.astimezone(UTC).isoformat(timespec="microseconds")


def canonical(
    *,
    seq: int,
    id: str,
    org_id: str | None,
    action: str,
    target_type: str,
    target_id: str,
    detail: dict[str, Any] | None,
    created_at: datetime,
) -> bytes:
    """The bytes a row's hash covers: every column but the hashes, as sorted compact JSON."""
    body = {
        "seq": seq,
        "id": id,
        "org_id": org_id,
        "action": action,
        "target_type": target_type,
        "target_id": target_id,
        "detail": detail or {},
        "created_at": _utc_iso(created_at),
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def chain_hash(prev_hash: str, row: bytes) -> str:
    return hashlib.sha256(prev_hash.encode("ascii") + b"\n" + row).hexdigest()


def json_safe(detail: dict[str, Any]) -> dict[str, Any]:
    """`detail` as it will read back from the JSON column (tuples -> lists, other keys -> strings, objects ->
    str), so the hash taken before the insert matches the row read back later."""
    return json.loads(json.dumps(detail, default=str))


# ---------------------------------------------------------------- appending


def queue_event(
    session: Session, org_id: str | None, action: str, target_type: str, target_id: str, detail: dict[str, Any]
) -> None:
    """Queue an audit row on `session`; it is chained and inserted when the session commits (dropped if the
    session rolls back, like any other write of the transaction)."""
    if not session.in_transaction():
        session.begin()  # so that a rollback or close without commit (after_transaction_end) drops the queue
    session.info.setdefault(_QUEUE_KEY, []).append(
        AuditEvent(
            id=new_id("aud"),  # now: the hash covers the id
            org_id=org_id,
            action=action,
            target_type=target_type,
            target_id=target_id[:40],
            detail=json_safe(detail),
            created_at=utcnow(),
        )
    )


def _lock_head(session: Session, n: int) -> tuple[int, str]:
    """Reserve `n` sequence numbers under the head row's lock; return (seq before, hash before)."""
    bump = update(AuditChainHead).where(AuditChainHead.id == HEAD_ID).values(seq=AuditChainHead.seq + n)
    if cast(CursorResult, session.execute(bump)).rowcount == 0:  # a schema made without migrations: start here
        session.add(AuditChainHead(id=HEAD_ID, seq=0, hash=GENESIS))
        session.flush()
        session.execute(bump)
    seq, head_hash = session.execute(
        select(AuditChainHead.seq, AuditChainHead.hash).where(AuditChainHead.id == HEAD_ID)
    ).one()
    return seq - n, head_hash


def append(session: Session, events: list[AuditEvent]) -> None:
    """Chain `events` after the current head, insert them and move the head (call inside the transaction
    that commits them; normally through `queue_event` + commit)."""
    if not events:
        return
    session.flush()  # the transaction's own writes first: the head lock is then the last lock it takes
    seq, prev = _lock_head(session, len(events))
    for e in events:
        seq += 1
        e.seq, e.prev_hash = seq, prev
        e.row_hash = prev = chain_hash(prev, _canonical_of(e))
        session.add(e)
    session.flush()
    session.execute(update(AuditChainHead).where(AuditChainHead.id == HEAD_ID).values(hash=prev))


def _canonical_of(e: AuditEvent) -> bytes:
    return canonical(
        seq=e.seq,
        id=e.id,
        org_id=e.org_id,
        action=e.action,
        target_type=e.target_type,
        target_id=e.target_id,
        detail=e.detail,
        created_at=e.created_at,
    )


@event.listens_for(Session, "before_commit")
def _append_queued(session: Session) -> None:
    events = session.info.pop(_QUEUE_KEY, None)
    if events:
        append(session, events)


@event.listens_for(Session, "after_transaction_end")
def _drop_queued(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None:  # the outermost transaction ended (committed or rolled back)
        session.info.pop(_QUEUE_KEY, None)


# ---------------------------------------------------------------- verifying


@dataclass
class ChainReport:
    ok: bool
    rows: int
    head_seq: int
    head_hash: str
    problem: str | None = None
    row_id: str | None = None  # the first row found wrong (None: the problem is at the end of the chain)
    row_seq: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("ok", "rows", "head_seq", "head_hash", "problem", "row_id", "row_seq")}


def verify_chain(session: Session) -> ChainReport:
    """Walk the chain in `seq` order; report the first row that was edited, deleted or inserted."""
    head = session.get(AuditChainHead, HEAD_ID)
    head_seq, head_hash = (head.seq, head.hash) if head else (0, GENESIS)
    rows = session.execute(
        select(
            AuditEvent.seq,
            AuditEvent.id,
            AuditEvent.org_id,
            AuditEvent.action,
            AuditEvent.target_type,
            AuditEvent.target_id,
            AuditEvent.detail,
            AuditEvent.created_at,
            AuditEvent.prev_hash,
            AuditEvent.row_hash,
        )
        .order_by(AuditEvent.seq)
        .execution_options(yield_per=1000)
    )
    prev, expected, n = GENESIS, 1, 0

    def bad(r: Any, problem: str) -> ChainReport:
        return ChainReport(False, n, head_seq, head_hash, problem, r.id, r.seq)

    for r in rows:
        n += 1
        if r.seq > expected:
            missing = f"seq {expected}" if r.seq == expected + 1 else f"seq {expected} to {r.seq - 1}"
            return bad(r, f"row(s) deleted before row {r.id} (seq {r.seq}): {missing} missing")
        if r.seq < expected:
            return bad(r, f"row {r.id} has seq {r.seq}, out of sequence: inserted outside the server")
        content = canonical(
            seq=r.seq,
            id=r.id,
            org_id=r.org_id,
            action=r.action,
            target_type=r.target_type,
            target_id=r.target_id,
            detail=r.detail,
            created_at=r.created_at,
        )
        if chain_hash(r.prev_hash, content) != r.row_hash:
            return bad(
                r, f"row {r.id} (seq {r.seq}) was edited after it was written: its content does not match its hash"
            )
        if r.prev_hash != prev:
            return bad(
                r,
                f"row {r.id} (seq {r.seq}) does not follow the row before it: that row was edited (hash recomputed) "
                "or a row was inserted or deleted there",
            )
        prev, expected = r.row_hash, expected + 1
    last = expected - 1
    if head_seq > last:
        return ChainReport(
            False, n, head_seq, head_hash, f"the newest row(s) after seq {last} were deleted (the head says {head_seq})"
        )
    if head_seq < last:
        return ChainReport(False, n, head_seq, head_hash, f"rows after seq {head_seq} were added outside the server")
    if head_hash != prev:
        return ChainReport(
            False, n, head_seq, head_hash, "the chain head does not match the newest row (edited head or row)"
        )
    return ChainReport(True, n, head_seq, head_hash)


# ---------------------------------------------------------------- failed sign-ins, bounded


@dataclass
class FailureLimiter:
    """Bounds how many auth-failure rows a flood of bad keys can write (per server process).

    Per minute (wall clock): one row per key prefix, and at most `per_minute` rows in all. Failures not
    written are counted, and the next row written carries that count (`not_logged_before`), so the log says
    how many there were without one row each: a flood costs at most `per_minute` rows a minute.
    """

    per_minute: int
    _minute: int = -1
    _written: int = 0
    _seen: set[str] = field(default_factory=set)
    _skipped: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def admit(self, prefix: str, now: float | None = None) -> int | None:
        """None: do not write a row for this failure; else write one, carrying this many skipped before it."""
        minute = int((time.time() if now is None else now) // 60)
        with self._lock:
            if minute != self._minute:
                self._minute, self._written, self._seen = minute, 0, set()
            if prefix in self._seen or self._written >= self.per_minute:
                self._skipped += 1
                return None
            self._seen.add(prefix)
            self._written += 1
            skipped, self._skipped = self._skipped, 0
            return skipped


def shown_prefix(key: str) -> str:
    """What a log may show of a presented key: at most its first 10 characters (the prefix stored for real
    keys, shown in key listings) and never more than a quarter of it, so a short secret is not logged whole."""
    return key[: min(10, len(key) // 4)]


def record_auth_failure(
    sessions: sessionmaker[Session],
    limiter: FailureLimiter,
    *,
    action: str,
    key: str,
    reason: str,
    org_id: str | None = None,
    key_id: str | None = None,
    **detail: Any,
) -> bool:
    """Write one audit row for a refused key (in its own transaction: the request's is rolled back), unless
    the limiter coalesces it. Never raises: a failed audit write must not turn a 401 into a 500."""
    prefix = shown_prefix(key)
    skipped = limiter.admit(prefix)
    if skipped is None:
        return False
    extra = {"not_logged_before": skipped} if skipped else {}
    try:
        with sessions() as s:
            queue_event(
                s,
                org_id,
                action,
                "api_key",
                key_id or "unknown",
                {"prefix": prefix, "reason": reason, **detail, **extra},
            )
            s.commit()
    except Exception:
        log.exception("could not write the audit row for a refused API key (prefix %r)", prefix)
        return False
    return True


def record_refused_key(request: Request, key: str, check: KeyCheck, action: str = "auth_failed") -> None:
    """Audit a key the API or the console sign-in refused: in its own transaction, at most one row per key
    prefix a minute and SCALEOT_AUDIT_AUTH_FAILURES_PER_MINUTE rows in all (per server process)."""
    state = request.app.state
    if getattr(state, "auth_failures", None) is None:
        state.auth_failures = FailureLimiter(state.settings.audit_auth_failures_per_minute)
    record_auth_failure(
        state.sessions,
        state.auth_failures,
        action=action,
        key=key,
        reason=check.reason,
        org_id=check.key.org_id if check.key else None,
        key_id=check.key.id if check.key else None,
        path=request.url.path[:200],
        client=request.client.host if request.client else None,
    )
