"""The job row seen from a running task: who runs it, its progress and heartbeat, and how it ends badly.

A task gets a JobContext: `update()` writes progress, message and live metrics into the row (throttled), a
heartbeat thread refreshes `heartbeat_at`, and both notice when the task must stop (a cancel request, or the
reaper failed the job meanwhile). `still_ours` is the last check before a task records its result;
`fail_job` marks a job failed (or cancelled) together with the object it was producing.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import CursorResult, Result, update
from sqlalchemy.orm import Session, sessionmaker

from model_owner_server.core.db import session_scope
from model_owner_server.models import AdapterRow, EmulatorRow, ImportanceRun, JobRow, utcnow

if TYPE_CHECKING:
    import torch

    from model_owner_server.jobs.resources import MemoryMeter

log = logging.getLogger("scaleot.jobs")
_wid: tuple[int, str] | None = None


def rows_changed(result: Result[Any]) -> int:
    """The rows an UPDATE changed (Session.execute is typed as returning a plain Result, which has no rowcount)."""
    return cast("CursorResult[Any]", result).rowcount


def worker_id() -> str:
    """host:pid:nonce of this process (regenerated after fork)."""
    global _wid
    if _wid is None or _wid[0] != os.getpid():
        _wid = (os.getpid(), f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}")
    return _wid[1]


class JobFailure(Exception):
    """A failure whose message is meant for the user as-is (no traceback needed)."""


class JobCancelled(Exception):
    """Raised inside a task at its next progress update once POST /v1/jobs/{id}/cancel asked it to stop."""


class JobContext:
    """Handed to a task: throttled progress/metrics writes into the job row, plus a heartbeat thread."""

    def __init__(self, job_id: str, sessions: sessionmaker[Session], heartbeat_seconds: float):
        self.job_id = job_id
        self.sessions = sessions
        self.worker = worker_id()
        self._pending: dict[str, Any] = {}
        self._metrics: dict[str, Any] = {}
        self._last_write = 0.0
        self._halt: Exception | None = None  # set by a flush that finds the task must stop (why_stop)
        self._lock = threading.Lock()
        # Tasks measure their stages with stage(); the meter is made at the first one (it needs torch, which a
        # job that measures nothing does not import) on the device the runner resolves.
        self.memory: MemoryMeter | None = None
        self.memory_device: Callable[[], str] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._beat, args=(heartbeat_seconds,), daemon=True, name=f"heartbeat-{job_id}"
        )

    def __enter__(self) -> JobContext:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def update(
        self,
        progress: float | None = None,
        message: str | None = None,
        metrics: dict[str, Any] | None = None,
        force: bool = False,
    ) -> None:
        with self._lock:
            if progress is not None:
                self._pending["progress"] = round(min(1.0, max(0.0, float(progress))), 4)
            if message is not None:
                self._pending["message"] = message
            if metrics:
                self._metrics.update(metrics)
                self._pending["metrics"] = dict(self._metrics)
            # Throttle: a fast loop must not turn into hundreds of DB writes per second.
            if force or time.monotonic() - self._last_write >= 0.5:
                self._flush_locked()
            if self._halt is not None:
                raise self._halt

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Measure the block's peak memory and time as stage `name` (stored in the job's result["memory"] and
        shown live in its metrics)."""
        meter = self._meter()
        with meter.stage(name) if meter is not None else nullcontext():
            yield
        if meter is not None:
            self.update(metrics={"memory": meter.record()})

    def model_loaded(self, model: Any, dtype: torch.dtype, was_cached: bool) -> None:
        """M is in memory in `dtype` (`was_cached`: the worker had it before this job): for the memory record."""
        meter = self._meter()
        if meter is not None:
            from model_owner_server.jobs.resources import param_bytes

            meter.model_loaded(param_bytes(model), dtype, was_cached)

    def _meter(self) -> MemoryMeter | None:
        if self.memory is None and self.memory_device is not None:
            from model_owner_server.jobs.resources import MemoryMeter

            self.memory = MemoryMeter(self.memory_device())
        return self.memory

    def _flush_locked(self) -> None:
        values = {**self._pending, "heartbeat_at": utcnow(), "updated_at": utcnow()}
        self._pending = {}
        self._last_write = time.monotonic()
        try:
            with session_scope(self.sessions) as s:
                mine = (JobRow.id == self.job_id, JobRow.status == "running", JobRow.worker_id == self.worker)
                written = s.execute(update(JobRow).where(*mine, JobRow.cancel_requested_at.is_(None)).values(**values))
                if not rows_changed(written):  # rare path: only then look at why
                    self._halt = why_stop(s.get(JobRow, self.job_id), self.worker)
        except Exception:  # progress is best effort; the task itself must go on
            log.exception("could not record progress of job %s", self.job_id)

    def _beat(self, every: float) -> None:
        while not self._stop.wait(every):
            with self._lock:
                self._flush_locked()


def why_stop(job: JobRow | None, worker: str) -> Exception | None:
    """Why a task must stop now, if it must: a cancel request, or the job is no longer its own (the reaper or
    a shutdown failed it meanwhile), so whatever it computed further would be discarded anyway."""
    if job is not None and job.status == "running" and job.worker_id == worker:
        return JobCancelled("cancelled on request") if job.cancel_requested_at is not None else None
    return JobFailure(
        "this job was marked failed while it was still running (its worker looked dead); "
        "nothing was recorded; submit the request again"
    )


def still_ours(s: Session, ctx: JobContext) -> None:
    """Before a task records its result: the job must still be running under this worker and not cancelled.
    Otherwise nothing is recorded (the runner or the janitor removes its files)."""
    halt = why_stop(s.get(JobRow, ctx.job_id, with_for_update=True), ctx.worker)
    if halt is not None:
        raise halt


# Key of a failed job's `result` holding the full failure text (exception, server paths): shown to admins
# only (api/serialize.py); `error`, which every viewer of the job and its product sees, stays generic.
ERROR_DETAIL = "error_detail"

# What each kind of job is, and what its owner can do next, for the generic failure message.
_FAILED_WHAT = {
    "importance": ("the importance run", "Start the run again"),
    "emulator": ("building the emulator", "Request the emulator again later"),
    "evaluation": ("the plug-in evaluation of your adapter", "Upload the adapter again later"),
    "privacy_audit": ("the privacy audit", "Start the audit again"),
}


def public_failure(kind: str | None, job_id: str) -> str:
    """The failure message every viewer of a job sees when the cause is internal (its text may name server
    paths or code): what failed, that the model owner has the details, and what to do."""
    what, then = _FAILED_WHAT.get(kind or "", ("this job", "Submit the request again later"))
    return (
        f"{what} failed on the server; the model owner can see the details (job {job_id}). "
        f"{then}, or ask the model owner, quoting the job id."
    )


def fail_job(session: Session, job: JobRow, error: str, status: str = "failed", detail: str | None = None) -> None:
    """Mark a job failed (or cancelled) and propagate the failure to the object it was producing.

    `error` is what everyone who sees the job or its product reads; `detail`, the full text for the model
    owner, is kept in the job's result (ERROR_DETAIL) and shown to admins only."""
    job.status, job.error, job.message = status, error, status
    if detail and detail != error:
        job.result = {**(job.result or {}), ERROR_DETAIL: detail}
    job.finished_at = job.updated_at = utcnow()
    kind, params = job.kind, job.params or {}
    target = {
        "importance": (ImportanceRun, "run_id"),
        "emulator": (EmulatorRow, "emulator_id"),
        "evaluation": (AdapterRow, "adapter_id"),
    }.get(kind)
    row = session.get(target[0], params[target[1]]) if target and params.get(target[1]) else None
    if isinstance(row, ImportanceRun):
        row.status, row.finished_at = "failed", utcnow()
    elif isinstance(row, AdapterRow) or (isinstance(row, EmulatorRow) and row.job_id == job.id):
        row.status, row.error = "failed", error  # an emulator only while this job owns it: a retry may by now
