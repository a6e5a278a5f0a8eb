"""ORM tables (SQLAlchemy 2, typed mappings). Schema changes go through Alembic (`migrations/`).

Ids are random strings (`org_…`, `mdl_…`, …) rather than sequential integers, so an id never reveals
how many objects other organizations have. JSON columns hold structured results (layer plans,
metrics) that the API returns as-is.

Names: a class whose noun is also an API schema (shared/schemas.py: Job, Emulator, Adapter, Grant) ends in
`Row` (JobRow, EmulatorRow, AdapterRow, GrantRow), and a registered base LLM is a RegisteredModel (never
`BaseModel`, which is pydantic's). Table names are unchanged.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC in Python on every backend (SQLite drops tzinfo, PostgreSQL keeps it)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime(), dict[str, Any]: JSON, list[Any]: JSON}


class Organization(Base):
    __tablename__ = "organizations"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("org"))
    name: Mapped[str] = mapped_column(String(200), unique=True)
    role: Mapped[str] = mapped_column(String(20))  # "admin" | "data-owner"
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("key"))
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex; the key itself is never stored
    prefix: Mapped[str] = mapped_column(String(16))  # first chars, to tell keys apart in listings
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)
    # Key lifecycle (core/security.py): a label, an optional expiry (SCALEOT_API_KEY_TTL_DAYS, rotation's
    # grace period), and the last successful use, refreshed at most once a minute.
    name: Mapped[str | None] = mapped_column(String(100), default=None)
    expires_at: Mapped[datetime | None] = mapped_column(default=None)
    last_used_at: Mapped[datetime | None] = mapped_column(default=None)


class RegisteredModel(Base):
    __tablename__ = "base_models"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("mdl"))
    name: Mapped[str] = mapped_column(String(200), unique=True)
    path: Mapped[str] = mapped_column(Text)  # server-side HF folder; never exposed to data owners
    family: Mapped[str | None] = mapped_column(String(50))
    n_layers: Mapped[int | None] = mapped_column(Integer)
    n_params: Mapped[int | None] = mapped_column(BigInteger)
    n_bytes: Mapped[int | None] = mapped_column(BigInteger)
    # The model owner's emulator policy for this model (shared.schemas.EmulatorPolicy as JSON); None: the
    # server's default (Settings.emulator_policy). Enforced by model_owner_server/policy.py.
    emulator_policy: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    # The dtype every job loads and computes M in: float32 | bfloat16 | float16, or auto (the checkpoint's own
    # on a GPU, float32 on CPU; model_owner_server/jobs/resources.py). Emulator files keep their issued dtype.
    compute_dtype: Mapped[str] = mapped_column(String(20), default="auto", server_default="auto")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class GrantRow(Base):
    __tablename__ = "grants"
    __table_args__ = (UniqueConstraint("model_id", "org_id", name="uq_grant_model_org"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("grt"))
    model_id: Mapped[str] = mapped_column(ForeignKey("base_models.id", ondelete="CASCADE"), index=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class JobRow(Base):
    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("job"))
    kind: Mapped[str] = mapped_column(String(20))  # importance | emulator | evaluation
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"), index=True)
    status: Mapped[str] = mapped_column(String(20), default="queued", index=True)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    message: Mapped[str] = mapped_column(Text, default="")
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)  # what the task needs; the queue carries only the id
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    result: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    worker_id: Mapped[str | None] = mapped_column(String(120), default=None)  # host:pid:nonce of the runner
    heartbeat_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    # Set by POST /v1/jobs/{id}/cancel on a running job; its worker stops at the next progress update.
    cancel_requested_at: Mapped[datetime | None] = mapped_column(default=None)


class ImportanceRun(Base):
    __tablename__ = "importance_runs"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("imp"))
    model_id: Mapped[str] = mapped_column(ForeignKey("base_models.id", ondelete="CASCADE"), index=True)
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    status: Mapped[str] = mapped_column(String(20), default="running")  # running | succeeded | failed
    steps: Mapped[int] = mapped_column(Integer)
    corpus: Mapped[str | None] = mapped_column(Text)
    path: Mapped[str | None] = mapped_column(Text)  # relative to the data dir
    scores: Mapped[list[Any] | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)


class EmulatorRow(Base):
    __tablename__ = "emulators"
    # Idempotency: one emulator per (model, importance run, N_a, alpha, beta); alpha/beta rounded to 6 places.
    __table_args__ = (
        UniqueConstraint("model_id", "importance_run_id", "n_adapter", "alpha", "beta", name="uq_emulator_params"),
    )
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("emu"))
    model_id: Mapped[str] = mapped_column(ForeignKey("base_models.id", ondelete="CASCADE"), index=True)
    importance_run_id: Mapped[str] = mapped_column(ForeignKey("importance_runs.id", ondelete="CASCADE"))
    n_adapter: Mapped[int] = mapped_column(Integer)
    alpha: Mapped[float] = mapped_column(Float)
    beta: Mapped[float] = mapped_column(Float)
    status: Mapped[str] = mapped_column(String(20), default="building")  # building | ready | failed
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    created_by: Mapped[str | None] = mapped_column(ForeignKey("organizations.id", ondelete="SET NULL"))
    path: Mapped[str | None] = mapped_column(Text)  # relative to the data dir
    sha256: Mapped[str | None] = mapped_column(String(64))
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    n_params: Mapped[int | None] = mapped_column(BigInteger)
    full_model_params: Mapped[int | None] = mapped_column(BigInteger)
    full_model_bytes: Mapped[int | None] = mapped_column(BigInteger)
    plan: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    adapter_layers: Mapped[list[Any] | None] = mapped_column(default=None)
    adapter_spec: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    max_adapter_bytes: Mapped[int | None] = mapped_column(BigInteger)
    signed_manifest: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    # Measured at build time: perplexity ratio to M and adapter-gradient cosine (calibrate.measure_fidelity).
    fidelity: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    # How it was built: adapter placement and the calibration run (steps, seconds, final losses).
    build_info: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    # The latest privacy audit (model_owner_server/scaleot/attack.py via the audit job), or None.
    privacy: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class AdapterRow(Base):
    __tablename__ = "adapters"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("adp"))
    emulator_id: Mapped[str] = mapped_column(ForeignKey("emulators.id", ondelete="CASCADE"), index=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("base_models.id", ondelete="CASCADE"))
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"), index=True)
    status: Mapped[str] = mapped_column(String(20), default="evaluating")  # evaluating | evaluated | failed
    path: Mapped[str] = mapped_column(Text)  # relative to the data dir
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    method: Mapped[str | None] = mapped_column(String(50))
    adapter_config: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    client_metrics: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    eval_path: Mapped[str | None] = mapped_column(Text)  # uploaded eval file, relative to the data dir
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Evaluation(Base):
    __tablename__ = "evaluations"
    __table_args__ = (UniqueConstraint("adapter_id", "kind", name="uq_evaluation_adapter_kind"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("evl"))
    adapter_id: Mapped[str] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(20))  # zero_shot | plug_in
    eval_source: Mapped[str] = mapped_column(String(200))
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class SigningKeyRecord(Base):
    __tablename__ = "signing_keys"
    key_id: Mapped[str] = mapped_column(String(16), primary_key=True)
    public_key: Mapped[str] = mapped_column(String(64))  # base64 raw Ed25519 public key
    status: Mapped[str] = mapped_column(String(20), default="active")  # active | retired | revoked
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    retired_at: Mapped[datetime | None] = mapped_column(default=None)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)


class AuditEvent(Base):
    """Who did what: emulator downloads, adapter uploads, grants, generations."""

    __tablename__ = "audit_log"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("aud"))
    org_id: Mapped[str | None] = mapped_column(String(40), index=True)  # kept even if the org is deleted
    action: Mapped[str] = mapped_column(String(50))
    target_type: Mapped[str] = mapped_column(String(30))
    target_id: Mapped[str] = mapped_column(String(40))
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    # Hash chain (model_owner_server/audit_log.py): seq numbers rows 1, 2, ... without gaps; row_hash is
    # sha256(prev_hash + the row's canonical JSON), so an edited, deleted or inserted row breaks the chain.
    seq: Mapped[int] = mapped_column(BigInteger, unique=True, index=True)
    prev_hash: Mapped[str] = mapped_column(String(64))
    row_hash: Mapped[str] = mapped_column(String(64))


class AuditChainHead(Base):
    """The audit chain's newest (seq, hash), one row (id 1): appending locks it, so two writers never fork the
    chain, and it shows when the newest rows were deleted."""

    __tablename__ = "audit_chain_head"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    seq: Mapped[int] = mapped_column(BigInteger)
    hash: Mapped[str] = mapped_column(String(64))


class ConsoleSession(Base):
    """A web-console sign-in: the cookie holds a random token, the database only its sha256 (like API keys)."""

    __tablename__ = "console_sessions"
    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))  # echoed by every console form
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(index=True)  # server-side expiry, whatever the browser keeps
    # The API key it was signed in with: revoking or expiring that key ends the session (console/auth.py).
    api_key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"), index=True)
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow)  # idle timeout: SCALEOT_CONSOLE_IDLE_MINUTES


class TokenCharge(Base):
    """Tokens one generation made for an organization; the hourly token quota sums these (api/quotas.py)."""

    __tablename__ = "token_charges"
    __table_args__ = (Index("ix_token_charges_org_created", "org_id", "created_at"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("tok"))
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"))
    tokens: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
