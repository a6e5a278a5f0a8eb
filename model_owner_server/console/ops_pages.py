"""Console pages: jobs (live progress, cancel), the audit log (admin), signing keys."""

from __future__ import annotations

import base64
import hashlib
from datetime import UTC, datetime

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response
from sqlalchemy import select

from model_owner_server import crud
from model_owner_server.api.deps import SessionDep, require_admin
from model_owner_server.api.routes import audit as api_audit
from model_owner_server.api.routes import jobs as api_jobs
from model_owner_server.models import AuditEvent, JobRow, Organization, SigningKeyRecord

from .auth import ConsoleAuth, ConsoleDep, FormDep
from .models_pages import redirect
from .views import ConsoleRoute, page

router = APIRouter(prefix="/console", route_class=ConsoleRoute, include_in_schema=False)
JOB_LIMIT = 50
ACTIVE = ("queued", "running")


def _target(job: JobRow) -> tuple[str, str] | None:
    """Where a job's product is shown: (label, console URL)."""
    params = job.params or {}
    if job.kind == "importance" and params.get("run_id"):
        return "importance run", f"/console/importance/{params['run_id']}"
    if job.kind == "emulator" and params.get("emulator_id"):
        return "emulator", f"/console/emulators/{params['emulator_id']}"
    if job.kind == "evaluation" and params.get("adapter_id"):
        return "adapter", f"/console/adapters/{params['adapter_id']}"
    return None


def _job_rows(session: SessionDep, auth: ConsoleAuth) -> dict:
    jobs = list(session.execute(crud.visible_jobs(auth.org).limit(JOB_LIMIT)).scalars())
    return {"jobs": [{"job": j, "target": _target(j)} for j in jobs], "live": any(j.status in ACTIVE for j in jobs)}


@router.get("/jobs", response_class=HTMLResponse)
def jobs_page(request: Request, session: SessionDep, auth: ConsoleDep) -> HTMLResponse:
    return page(request, auth, "jobs.html", notice=request.query_params.get("notice"), **_job_rows(session, auth))


@router.get("/jobs/rows", response_class=HTMLResponse)
def job_rows(request: Request, session: SessionDep, auth: ConsoleDep) -> HTMLResponse:
    """The jobs table body alone: what the page polls (htmx) to move its progress bars."""
    return page(request, auth, "_job_rows.html", **_job_rows(session, auth))


@router.post("/jobs/{job_id}/cancel", response_class=HTMLResponse)
def cancel_job(job_id: str, session: SessionDep, auth: ConsoleDep, form: FormDep) -> Response:
    try:
        job = api_jobs.cancel_job(job_id, session, auth.org)
    except crud.Conflict as exc:
        return redirect("/console/jobs", str(exc))
    note = "cancelled" if job.status == "cancelled" else "stopping at its next step"
    return redirect("/console/jobs", f"Job {job.id}: {note}.")


def _parse_time(text: str) -> datetime:
    """An <input type=datetime-local> value (or ISO 8601) as UTC."""
    t = datetime.fromisoformat(text.strip())
    return t if t.tzinfo else t.replace(tzinfo=UTC)


@router.get("/audit", response_class=HTMLResponse)
def audit_page(request: Request, session: SessionDep, auth: ConsoleDep) -> HTMLResponse:
    admin = require_admin(auth.org)
    q = {k: request.query_params.get(k, "").strip() for k in ("org", "action", "since", "until")}
    errors: dict[str, str] = {}
    times: dict[str, datetime | None] = {}
    for k in ("since", "until"):
        try:
            times[k] = _parse_time(q[k]) if q[k] else None
        except ValueError:
            errors[k] = "use a date and time like 2026-11-30T14:05"
    listing = None
    if not errors:
        listing = api_audit.list_audit(
            session,
            admin,
            org=q["org"] or None,
            action=q["action"] or None,
            target_type=None,
            target_id=None,
            since=times["since"],
            until=times["until"],
            limit=200,
            offset=0,
        )
    orgs = list(session.execute(select(Organization.name).order_by(Organization.name)).scalars())
    actions = list(session.execute(select(AuditEvent.action).distinct().order_by(AuditEvent.action)).scalars())
    return page(
        request,
        auth,
        "audit.html",
        200 if not errors else 422,
        listing=listing,
        q=q,
        orgs=orgs,
        actions=actions,
        errors=errors,
    )


def fingerprint(public_key_b64: str) -> str:
    """SHA-256 of the raw public key, grouped for reading aloud (its first 16 hex digits are the key id)."""
    digest = hashlib.sha256(base64.b64decode(public_key_b64)).hexdigest()
    return ":".join(digest[i : i + 4] for i in range(0, len(digest), 4))


@router.get("/keys", response_class=HTMLResponse)
def keys_page(request: Request, session: SessionDep, auth: ConsoleDep) -> HTMLResponse:
    rows = list(session.execute(select(SigningKeyRecord).order_by(SigningKeyRecord.created_at.desc())).scalars())
    history = sorted(
        (
            (t, event, r.key_id)
            for r in rows
            for t, event in ((r.created_at, "created"), (r.retired_at, "retired"), (r.revoked_at, "revoked"))
            if t
        ),
        reverse=True,
    )
    return page(
        request,
        auth,
        "keys.html",
        keys=[{"row": r, "fingerprint": fingerprint(r.public_key)} for r in rows],
        history=history,
    )
