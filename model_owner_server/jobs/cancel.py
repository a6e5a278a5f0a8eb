"""POST /v1/jobs/{id}/cancel: a queued job ends at once, a running one at its task's next progress update."""

from __future__ import annotations

from sqlalchemy import update
from sqlalchemy.orm import Session

from model_owner_server.jobs.context import fail_job, rows_changed
from model_owner_server.models import JobRow, utcnow

CANCELLED_ERRORS = {
    "importance": "the importance run was cancelled; start a new one",
    "emulator": "the build was cancelled; POST /v1/emulators again with the same parameters to rebuild",
    "evaluation": "the evaluation was cancelled; upload the adapter again to evaluate it",
}


def cancelled_error(kind: str | None) -> str:
    """The error a cancelled job of this kind shows its owner."""
    return CANCELLED_ERRORS.get(kind or "", "cancelled on request")


def request_cancel(session: Session, job: JobRow) -> bool:
    """Cancel `job`: a queued job ends `cancelled` now (True); a running one gets a cancel request that its
    worker honours at its next progress update (False). Raises crud.Conflict when it has already finished.

    Conditional UPDATEs, not read-then-write: a worker claiming the job at the same moment either wins (the
    job is running and gets the request) or loses (the claim finds it cancelled and skips it).
    """
    from model_owner_server.crud import Conflict

    if rows_changed(
        session.execute(update(JobRow).where(JobRow.id == job.id, JobRow.status == "queued").values(status="cancelled"))
    ):
        session.refresh(job)
        fail_job(session, job, cancelled_error(job.kind), status="cancelled")
        return True
    if rows_changed(
        session.execute(
            update(JobRow)
            .where(JobRow.id == job.id, JobRow.status == "running")
            .values(cancel_requested_at=utcnow(), updated_at=utcnow())
        )
    ):
        session.refresh(job)
        return False
    session.refresh(job)
    raise Conflict(f"job {job.id} has already finished ({job.status}); there is nothing to cancel")
