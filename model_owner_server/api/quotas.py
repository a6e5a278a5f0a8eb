"""Quotas, rate limits and fair share: what one organization may take from the server.

Three kinds of limits, all answered with 429, a `Retry-After` (whole seconds) and the error shape
`{"error": {"code": "rate_limited" | "quota_exceeded", "message": ...}}` whose message names the limit,
its setting and when it resets:

- **request rate** (`rate_limited`): a token bucket per API key and one per organization, refilled
  continuously at `SCALEOT_RATE_LIMIT_PER_KEY` / `SCALEOT_RATE_LIMIT_PER_ORG` requests per minute and
  holding `SCALEOT_RATE_LIMIT_BURST_SECONDS` of that rate. The buckets live in the server process (each
  `serve` process counts on its own: N processes admit up to N times the rate). Both are checked on the
  event loop before the database is asked about the key (`admit_request`), and a refused request is
  answered after a second's pause, so a flood's 429s cost no query, no thread and little CPU: the
  other organizations keep their latency (docs/reliability.md, `python -m reliability.flood`). Admin keys
  are exempt unless `SCALEOT_RATE_LIMIT_ADMINS` is on.
- **hourly quotas** (`quota_exceeded`): emulator builds, adapter uploads, evaluations and generated tokens
  per organization over the last hour, counted from database rows (jobs, adapters, `token_charges`), so
  they hold across processes and restarts. Tokens are charged after each generation; the request after
  the one that crossed the limit is refused.
- **active jobs** (`quota_exceeded`): at most `SCALEOT_MAX_ACTIVE_JOBS_PER_ORG` queued + running jobs per
  data-owner organization; the job runner also picks the next job round-robin across organizations
  (jobs/runner.py), so one organization's backlog cannot hold another's job back.

A limit set to 0 is off. Admins (the model owner) are exempt from the hourly quotas and the job cap.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import random
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, TypeVar

import anyio
from fastapi import Query, Request
from sqlalchemy import Select, and_, func, or_, select
from sqlalchemy.orm import Session

from model_owner_server.api.errors import ApiError
from model_owner_server.core.config import Settings
from model_owner_server.core.security import hash_api_key
from model_owner_server.models import AdapterRow, JobRow, Organization, TokenCharge, utcnow

HOUR = timedelta(hours=1)
ACTIVE_JOB_RETRY_S = 30  # jobs take seconds to minutes; a client polling GET /v1/jobs knows better
TARPIT_S = 1.0  # see admit_request
MAX_TRACKED_KEYS = 10_000  # key buckets kept per process (least recently used dropped; a dropped one restarts full)


def _too_many(code: str, message: str, retry_after: float) -> ApiError:
    seconds = max(1, math.ceil(retry_after))
    return ApiError(429, code, f"{message}; retry in {seconds} s", {"Retry-After": str(seconds)})


def _at(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


# ---------------------------------------------------------------- request rate (in process)


@dataclass
class TokenBucket:
    """`capacity` tokens, refilled at `rate` per second; each request takes one."""

    rate: float
    capacity: float
    tokens: float
    stamp: float

    def take(self, now: float) -> float:
        """0.0 when a token was taken, else the seconds until one is there."""
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


@dataclass(frozen=True)
class Admission:
    """What `admit_request` charged before the key was looked up."""

    digest: str | None  # sha256 of the presented key; None: no bearer key (current_org answers 401)
    org_charged: bool  # the key's organization was known, and its bucket charged (or it is exempt)


class RequestLimiter:
    """The per-key and per-organization buckets of one server process (thread-safe).

    Keys whose organization was seen once are charged to both buckets before the database is asked, so a
    flood's 429s cost no query and no worker thread; a key seen for the first time pays its organization's
    bucket after the lookup (`check_org`)."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic):
        self.settings, self.clock = settings, clock
        self._lock = threading.Lock()
        self._keys: OrderedDict[str, TokenBucket] = OrderedDict()
        self._orgs: dict[str, TokenBucket] = {}
        self._owner: OrderedDict[str, tuple[str, bool]] = OrderedDict()  # key digest -> (org id, is admin)

    def _bucket(self, per_minute: int) -> TokenBucket:
        rate = per_minute / 60.0
        capacity = max(1.0, rate * self.settings.rate_limit_burst_seconds)
        return TokenBucket(rate, capacity, capacity, self.clock())

    def _take_org(self, org_id: str) -> None:
        per_minute = self.settings.rate_limit_per_org
        if per_minute <= 0:
            return
        with self._lock:
            bucket = self._orgs.get(org_id)
            if bucket is None:
                bucket = self._orgs[org_id] = self._bucket(per_minute)
            wait = bucket.take(self.clock())
        if wait:
            raise _too_many(
                "rate_limited",
                f"rate limit: your organization sent more than {per_minute} requests per minute over all its keys "
                f"(SCALEOT_RATE_LIMIT_PER_ORG, bursts up to {int(bucket.capacity)}); the limit refills continuously",
                wait,
            )

    def admit(self, key: str) -> Admission:
        """Charge one request to the key's bucket, and to its organization's when the key was seen before."""
        digest = hash_api_key(key)
        with self._lock:
            owner = self._owner.get(digest)
        if owner is not None and owner[1] and not self.settings.rate_limit_admins:
            return Admission(digest, True)
        per_minute = self.settings.rate_limit_per_key
        if per_minute > 0:
            with self._lock:
                bucket = self._keys.pop(digest, None) or self._bucket(per_minute)
                self._keys[digest] = bucket  # most recently used last
                while len(self._keys) > MAX_TRACKED_KEYS:
                    self._keys.popitem(last=False)
                wait = bucket.take(self.clock())
            if wait:
                raise _too_many(
                    "rate_limited",
                    f"rate limit: this API key sent more than {per_minute} requests per minute "
                    f"(SCALEOT_RATE_LIMIT_PER_KEY, bursts up to {int(bucket.capacity)}); "
                    "the limit refills continuously",
                    wait,
                )
        if owner is not None:
            self._take_org(owner[0])
        return Admission(digest, owner is not None)

    def check_org(self, org: Organization, admission: Admission) -> None:
        """After the key was found: remember its organization; charge that bucket if `admit` could not."""
        if admission.digest is not None:
            with self._lock:
                self._owner[admission.digest] = (org.id, bool(org.is_admin))
                self._owner.move_to_end(admission.digest)
                while len(self._owner) > MAX_TRACKED_KEYS:
                    self._owner.popitem(last=False)
        if admission.org_charged or (org.is_admin and not self.settings.rate_limit_admins):
            return
        self._take_org(org.id)


_limiter_lock = threading.Lock()


def request_limiter(request: Request) -> RequestLimiter:
    """The app's one limiter, made on first use from its settings."""
    state = request.app.state
    with _limiter_lock:
        if getattr(state, "request_limiter", None) is None:
            state.request_limiter = RequestLimiter(state.settings)
        return state.request_limiter


async def admit_request(request: Request) -> Admission:
    """Dependency of current_org, run on the event loop before the key is looked up: the request-rate check.

    A refused request is answered after up to TARPIT_S (on the event loop: no thread, no CPU), which a client
    honouring Retry-After (>= 1 s) never notices, while a flood that ignores it gets one answer per connection
    per TARPIT_S instead of as many as the server's CPU can make, leaving that CPU to other organizations."""
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key or len(key) > 200:
        return Admission(None, False)  # current_org answers 401
    try:
        return request_limiter(request).admit(key)
    except ApiError:
        # Jittered, so that a flood's connections, refused together, do not come back together either.
        await anyio.sleep(TARPIT_S * random.uniform(0.5, 1.0))
        raise


# ---------------------------------------------------------------- hourly quotas and the job cap (database)


def _window_check(
    session: Session, org: Organization, limit: int, setting: str, what: str, query: Select[Any], stamp: Any
) -> None:
    """Refuse when `query` (rows of `org` stamped `stamp`) counts `limit` or more in the last hour."""
    if limit <= 0 or org.is_admin:
        return
    since = utcnow() - HOUR
    used, oldest = session.execute(
        query.where(stamp >= since).with_only_columns(func.count(), func.min(stamp)).order_by(None)
    ).one()
    if used < limit:
        return
    if oldest.tzinfo is None:  # SQLite drops tzinfo on aggregates (UTCDateTime is not applied to min())
        oldest = oldest.replace(tzinfo=UTC)
    resets = oldest + HOUR
    raise _too_many(
        "quota_exceeded",
        f"quota: your organization {what} {used} times in the last hour; the limit is {limit} per hour "
        f"({setting}). The oldest of them leaves the window at {_at(resets)}",
        (resets - utcnow()).total_seconds(),
    )


def check_emulator_build(session: Session, org: Organization, settings: Settings) -> None:
    """Before a new emulator build job: the hourly build quota and the active-job cap."""
    _window_check(
        session,
        org,
        settings.quota_emulator_builds_per_hour,
        "SCALEOT_QUOTA_EMULATOR_BUILDS_PER_HOUR",
        "started an emulator build",
        select(JobRow).where(JobRow.org_id == org.id, JobRow.kind == "emulator"),
        JobRow.created_at,
    )
    check_active_jobs(session, org, settings)


def check_adapter_upload(session: Session, org: Organization, settings: Settings) -> None:
    """Before an adapter upload is read (each starts an evaluation job): uploads, evaluations, the job cap."""
    _window_check(
        session,
        org,
        settings.quota_adapter_uploads_per_hour,
        "SCALEOT_QUOTA_ADAPTER_UPLOADS_PER_HOUR",
        "uploaded an adapter",
        select(AdapterRow).where(AdapterRow.org_id == org.id),
        AdapterRow.created_at,
    )
    _window_check(
        session,
        org,
        settings.quota_evaluations_per_hour,
        "SCALEOT_QUOTA_EVALUATIONS_PER_HOUR",
        "started an evaluation",
        select(JobRow).where(JobRow.org_id == org.id, JobRow.kind == "evaluation"),
        JobRow.created_at,
    )
    check_active_jobs(session, org, settings)


def check_active_jobs(session: Session, org: Organization, settings: Settings) -> None:
    """At most SCALEOT_MAX_ACTIVE_JOBS_PER_ORG queued + running jobs per data-owner organization."""
    cap = settings.max_active_jobs_per_org
    if cap <= 0 or org.is_admin:
        return
    active = session.execute(
        select(func.count()).where(JobRow.org_id == org.id, JobRow.status.in_(("queued", "running")))
    ).scalar_one()
    if active >= cap:
        raise _too_many(
            "quota_exceeded",
            f"quota: your organization has {active} jobs queued or running; the limit is {cap} "
            "(SCALEOT_MAX_ACTIVE_JOBS_PER_ORG). It resets as they finish: watch GET /v1/jobs, "
            "or cancel one with POST /v1/jobs/{id}/cancel",
            ACTIVE_JOB_RETRY_S,
        )


def check_tokens(session: Session, org: Organization, settings: Settings) -> None:
    """Before a generation: refuse once the organization's tokens of the last hour reached the quota."""
    limit = settings.quota_generated_tokens_per_hour
    if limit <= 0 or org.is_admin:
        return
    since = utcnow() - HOUR
    used = session.execute(
        select(func.coalesce(func.sum(TokenCharge.tokens), 0)).where(
            TokenCharge.org_id == org.id, TokenCharge.created_at >= since
        )
    ).scalar_one()
    if used < limit:
        return
    # The window frees up when enough of the oldest charges leave it to bring the sum under the limit.
    excess, resets = used - limit + 1, utcnow()
    rows = session.execute(
        select(TokenCharge.tokens, TokenCharge.created_at)
        .where(TokenCharge.org_id == org.id, TokenCharge.created_at >= since)
        .order_by(TokenCharge.created_at)
    )
    for tokens, created_at in rows:
        excess -= tokens
        if excess <= 0:
            resets = created_at + HOUR
            break
    raise _too_many(
        "quota_exceeded",
        f"quota: your organization generated {used} tokens in the last hour; the limit is {limit} per hour "
        f"(SCALEOT_QUOTA_GENERATED_TOKENS_PER_HOUR). Generation is possible again from {_at(resets)}",
        (resets - utcnow()).total_seconds(),
    )


def charge_tokens(session: Session, org: Organization, tokens: int) -> None:
    """Record `tokens` generated for `org` (committed here: a charge must not depend on a later commit)."""
    if tokens > 0:
        session.add(TokenCharge(org_id=org.id, tokens=int(tokens)))
        session.commit()


T = TypeVar("T")


async def charged_stream(
    stream: AsyncIterator[T], session: Session, org: Organization, tokens: Callable[[], int]
) -> AsyncIterator[T]:
    """Pass `stream` through; when it ends (or the client goes away), charge what `tokens()` says was made."""
    from fastapi.concurrency import run_in_threadpool

    try:
        async for item in stream:
            yield item
    finally:
        # Shielded: a client that disconnects mid-stream cancels this task, and must still pay for its tokens.
        with anyio.CancelScope(shield=True):
            await run_in_threadpool(charge_tokens, session, org, tokens())


# ---------------------------------------------------------------- pagination

DEFAULT_PAGE, MAX_PAGE = 100, 500


def _bad_cursor() -> ApiError:
    return ApiError(
        422,
        "validation_error",
        "invalid request: cursor is not one this server issued; pass the next_cursor of the previous page "
        "unchanged, or leave cursor out for the first page",
    )


def encode_cursor(created_at: datetime, row_id: str) -> str:
    raw = json.dumps([created_at.astimezone(UTC).isoformat(), row_id], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        stamp, row_id = json.loads(raw)
        when = datetime.fromisoformat(stamp)
    except (binascii.Error, ValueError, TypeError, UnicodeDecodeError):
        raise _bad_cursor() from None
    if not isinstance(row_id, str) or when.tzinfo is None:
        raise _bad_cursor()
    return when, row_id


def paginate(
    session: Session, query: Select[Any], model: Any, limit: int, cursor: str | None
) -> tuple[list[Any], str | None]:
    """One page of `query`, newest first in the stable order (created_at, id) descending; `limit` rows after
    the row `cursor` names, and the cursor of the next page (None: this was the last)."""
    query = query.order_by(None).order_by(model.created_at.desc(), model.id.desc())
    if cursor:
        when, row_id = decode_cursor(cursor)
        query = query.where(or_(model.created_at < when, and_(model.created_at == when, model.id < row_id)))
    rows = list(session.execute(query.limit(limit + 1)).scalars())
    if len(rows) <= limit:
        return rows, None
    last = rows[limit - 1]
    return rows[:limit], encode_cursor(last.created_at, last.id)


PageLimit = Annotated[
    int, Query(ge=1, le=MAX_PAGE, description=f"rows per page (at most {MAX_PAGE}); the answer's `limit` echoes it")
]
PageCursor = Annotated[
    str | None,
    Query(max_length=512, description="the `next_cursor` of the previous page; leave out for the first page"),
]
