"""`GET /v1/audit`: who downloaded which emulator, who uploaded which adapter (and grants, generations,
refused keys, console sign-ins...); `GET /v1/audit/verify`: is the hash chain intact.

Admin only. Newest first; filters combine with AND. Page with `limit` + `offset`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select

from model_owner_server import crud
from model_owner_server.api.deps import AdminDep, SessionDep
from model_owner_server.audit_log import verify_chain
from model_owner_server.models import AuditEvent, Organization
from shared import schemas

router = APIRouter(prefix="/v1", tags=["audit"])
ERR: dict[int | str, dict[str, Any]] = {s: {"model": schemas.ErrorBody} for s in (401, 403, 404, 422)}


class AuditEventOut(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str
    org_id: str | None = Field(description="the organization that acted (null: a CLI command on the server)")
    org_name: str | None = None
    action: str = Field(
        description="download_emulator, upload_adapter, create_emulator, grant, register_model, generate, ..."
    )
    target_type: str
    target_id: str
    detail: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime
    seq: int | None = Field(None, description="position in the hash chain (1, 2, ...)")
    row_hash: str | None = Field(None, description="sha256 over the previous row's hash and this row")


class AuditList(BaseModel):
    events: list[AuditEventOut]
    total: int = Field(description="events matching the filters (all pages)")
    limit: int
    offset: int


@router.get("/audit", response_model=AuditList, responses=ERR)
def list_audit(
    session: SessionDep,
    _admin: AdminDep,
    org: str | None = Query(None, max_length=200, description="organization id or name"),
    action: str | None = Query(None, max_length=50, description="e.g. download_emulator, upload_adapter"),
    target_type: str | None = Query(None, max_length=30, description="emulator, adapter, model"),
    target_id: str | None = Query(None, max_length=40, description="e.g. an emulator or adapter id"),
    since: datetime | None = Query(None, description="only events at or after this time (ISO 8601)"),
    until: datetime | None = Query(None, description="only events before this time (ISO 8601)"),
    limit: int = Query(100, ge=1, le=1000),
    offset: int = Query(0, ge=0, le=10_000_000),
) -> AuditList:
    """The audit log (admin only), newest first."""
    q = select(AuditEvent)
    if org is not None:
        q = q.where(AuditEvent.org_id == crud.find_org(session, org).id)  # unknown org -> 404
    if action is not None:
        q = q.where(AuditEvent.action == action)
    if target_type is not None:
        q = q.where(AuditEvent.target_type == target_type)
    if target_id is not None:
        q = q.where(AuditEvent.target_id == target_id)
    if since is not None:
        q = q.where(AuditEvent.created_at >= since)
    if until is not None:
        q = q.where(AuditEvent.created_at < until)
    total = session.execute(select(func.count()).select_from(q.subquery())).scalar_one()
    rows = list(session.execute(q.order_by(AuditEvent.seq.desc()).limit(limit).offset(offset)).scalars())
    names = (
        dict(
            session.execute(
                select(Organization.id, Organization.name).where(
                    Organization.id.in_({r.org_id for r in rows if r.org_id})
                )
            ).all()
        )
        if rows
        else {}
    )
    return AuditList(
        events=[
            AuditEventOut(
                id=r.id,
                org_id=r.org_id,
                org_name=names.get(r.org_id) if r.org_id is not None else None,  # server events have no org
                action=r.action,
                target_type=r.target_type,
                target_id=r.target_id,
                detail=r.detail or {},
                created_at=r.created_at,
                seq=r.seq,
                row_hash=r.row_hash,
            )
            for r in rows
        ],
        total=total,
        limit=limit,
        offset=offset,
    )


class AuditVerification(BaseModel):
    ok: bool = Field(description="true: every row is as written and none is missing or added")
    rows: int = Field(description="rows checked (up to the first problem)")
    head_seq: int = Field(description="the newest row's seq according to the chain head")
    head_hash: str = Field(description="the chain head's hash: note it elsewhere to detect a rewrite of the whole log")
    problem: str | None = Field(None, description="the first problem found, in words")
    row_id: str | None = Field(None, description="the first row found wrong (none: the problem is the log's end)")
    row_seq: int | None = None


@router.get("/audit/verify", response_model=AuditVerification, responses=ERR)
def verify_audit(session: SessionDep, _admin: AdminDep) -> AuditVerification:
    """Walk the audit log's hash chain (admin only): reports the first edited, deleted or inserted row.
    The same check as `modelowner-server verify-audit-log`."""
    return AuditVerification(**verify_chain(session).as_dict())
