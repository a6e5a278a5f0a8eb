from __future__ import annotations

from fastapi import APIRouter

from model_owner_server import crud
from model_owner_server.api import quotas
from model_owner_server.api.deps import OrgDep, SessionDep
from model_owner_server.api.serialize import job_out
from model_owner_server.jobs.cancel import request_cancel
from model_owner_server.models import JobRow
from shared import schemas

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.get("", response_model=schemas.JobList)
def list_jobs(
    session: SessionDep, org: OrgDep, limit: quotas.PageLimit = 50, cursor: quotas.PageCursor = None
) -> schemas.JobList:
    """Your organization's jobs, newest first (admins see all), a page at a time."""
    rows, next_cursor = quotas.paginate(session, crud.visible_jobs(org), JobRow, limit, cursor)
    return schemas.JobList(jobs=[job_out(j, org) for j in rows], next_cursor=next_cursor, limit=limit)


@router.get("/{job_id}", response_model=schemas.Job, responses={404: {"model": schemas.ErrorBody}})
def get_job(job_id: str, session: SessionDep, org: OrgDep) -> schemas.Job:
    """Status (queued, running, succeeded, failed, cancelled), progress 0..1, message, live metrics, result ids."""
    return job_out(crud.get_visible_job(session, org, job_id), org)


@router.post(
    "/{job_id}/cancel",
    status_code=202,
    response_model=schemas.Job,
    responses={404: {"model": schemas.ErrorBody}, 409: {"model": schemas.ErrorBody}},
)
def cancel_job(job_id: str, session: SessionDep, org: OrgDep) -> schemas.Job:
    """Stop a queued or running job. A queued job is `cancelled` at once; a running one gets
    `cancel_requested` and its worker stops at its next step, removes what it had written, and ends
    `cancelled` (poll GET /v1/jobs/{id}). 409 when the job has already finished."""
    job = crud.get_visible_job(session, org, job_id)
    request_cancel(session, job)
    crud.audit(session, org, "cancel_job", "job", job.id, kind=job.kind)
    session.commit()
    session.refresh(job)
    return job_out(job, org)
