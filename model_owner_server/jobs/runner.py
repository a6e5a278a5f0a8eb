"""JobRunner: execute one job by id. Claim it atomically, run the handler of its kind, record the outcome."""

from __future__ import annotations

import importlib
import logging
import traceback
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from model_owner_server.core.config import Settings
from model_owner_server.core.db import session_scope
from model_owner_server.jobs.cancel import cancelled_error
from model_owner_server.jobs.context import (
    JobCancelled,
    JobContext,
    JobFailure,
    fail_job,
    public_failure,
    rows_changed,
    worker_id,
)
from model_owner_server.keyring import KeyRing
from model_owner_server.models import EmulatorRow, JobRow, RegisteredModel, utcnow
from model_owner_server.storage import Storage, is_disk_full

if TYPE_CHECKING:  # torch is imported when a job runs, not when the API process imports the queue
    import torch

log = logging.getLogger("scaleot.jobs")

Handler = Callable[["JobRunner", JobContext, dict[str, Any]], dict[str, Any]]


class JobRunner:
    """Executes one job by id: claim it, run its handler, record success or failure."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], storage: Storage, keyring: KeyRing | None):
        self.settings, self.sessions, self.storage, self.keyring = settings, sessions, storage, keyring

    def run(self, job_id: str) -> None:
        me = worker_id()
        with session_scope(self.sessions) as s:
            # Fair share: a message is a turn to run one job; with fair_job_scheduling the turn goes to the
            # oldest queued job of the organization served least recently (so a backlog cannot starve others).
            claimed = 0
            for pick in self._fair_picks(s, job_id):
                # Atomic claim: a duplicate delivery (or a job already failed by the reaper) is skipped.
                claimed = rows_changed(
                    s.execute(
                        update(JobRow)
                        .where(JobRow.id == pick, JobRow.status == "queued")
                        .values(
                            status="running",
                            worker_id=me,
                            started_at=utcnow(),
                            heartbeat_at=utcnow(),
                            updated_at=utcnow(),
                            message="started",
                        )
                    )
                )
                if claimed:
                    job_id = pick
                    break
            job = s.get(JobRow, job_id) if claimed else None
            kind, params = (job.kind, dict(job.params or {})) if job else (None, {})
        if not claimed:
            log.info("job %s is not queued any more; skipping", job_id)
            return
        handler = HANDLERS.get(kind or "")
        outputs: list[Path] = []
        try:
            with JobContext(job_id, self.sessions, self.settings.heartbeat_seconds) as ctx:
                if handler is None:
                    raise JobFailure(f"unknown job kind {kind!r}")
                ctx.memory_device = lambda: self.device
                result = handler(self, ctx, params)
                if ctx.memory is not None:  # its stages' peak memory and times (GET /v1/jobs/{id}: result.memory)
                    result = {**result, "memory": ctx.memory.record()}
            with session_scope(self.sessions) as s:
                mine = (JobRow.id == job_id, JobRow.worker_id == me, JobRow.status == "running")
                s.execute(
                    update(JobRow)
                    .where(*mine)
                    .values(
                        status="succeeded",
                        progress=1.0,
                        message="done",
                        result=result,
                        finished_at=utcnow(),
                        updated_at=utcnow(),
                        heartbeat_at=utcnow(),
                    )
                )
        except JobCancelled:
            log.info("job %s (%s) cancelled on request", job_id, kind)
            with session_scope(self.sessions) as s:
                job = s.get(JobRow, job_id)
                if job is not None and job.status == "running" and job.worker_id == me:
                    fail_job(s, job, cancelled_error(kind), status="cancelled")
                    outputs = self._unfinished_outputs(s, kind or "", params)
            for path in outputs:  # nothing half-written stays (the janitor would get there later)
                self.storage.remove(path)
        except Exception as exc:  # every failure must end visibly in the job row
            detail = (
                str(exc)
                if isinstance(exc, (JobFailure, ValueError, FileNotFoundError))
                else f"{type(exc).__name__}: {exc}"
            ) or type(exc).__name__
            if isinstance(exc, JobFailure):  # written for whoever submitted the job
                public = detail
            elif is_disk_full(exc):  # the path and errno go to the log only
                public = detail = (
                    "the server ran out of disk space while writing the job's result; nothing was kept. "
                    "The model owner must free space in the data directory; then submit the request again"
                )
            else:  # exception text and server paths: for the model owner (admins, the log) only
                public = public_failure(kind, job_id)
            log.error("job %s (%s) failed: %s\n%s", job_id, kind, detail, traceback.format_exc())
            with session_scope(self.sessions) as s:
                job = s.get(JobRow, job_id)
                if job is not None and job.status == "running" and job.worker_id == me:
                    fail_job(s, job, public, detail=detail)

    def _fair_picks(self, s: Session, job_id: str) -> Iterator[str]:
        """The jobs to try to claim, in turn: the message's own one only (fair scheduling off, or inline jobs,
        whose caller waits for exactly its job), else the fairest queued job until one is claimed or none is
        left (a claim lost to another worker means that worker took a turn: pick again)."""
        if not self.settings.fair_job_scheduling or self.settings.queue_url == "immediate":
            yield job_id
            return
        for _ in range(100):
            pick = fairest_queued_job(s)
            if pick is None:
                return
            yield pick

    def _unfinished_outputs(self, s: Session, kind: str, params: dict[str, Any]) -> list[Path]:
        """Files a cancelled job may already have moved into place (its row was never marked done)."""
        if kind == "importance" and params.get("run_id"):
            return [self.storage.importance / params["run_id"]]
        if kind == "emulator" and params.get("emulator_id"):
            emu = s.get(EmulatorRow, params["emulator_id"])
            if emu is not None and emu.status != "ready":
                return [self.storage.emulators / f"{emu.id}.safetensors"]
        return []

    # helpers shared by the task bodies
    @property
    def device(self) -> str:
        """SCALEOT_DEVICE resolved (cpu, cuda, cuda:N, auto); a GPU that is not there fails the job saying so."""
        from shared.device import DeviceError, resolve_device

        try:
            return str(resolve_device(str(self.settings.device), setting="SCALEOT_DEVICE").device)
        except DeviceError as exc:
            raise JobFailure(str(exc)) from None  # names SCALEOT_DEVICE and what to set instead

    def compute_dtype(self, model_row: RegisteredModel) -> torch.dtype:
        """The dtype M is loaded and computed in for this model on this worker (resources.resolve_compute_dtype)."""
        from model_owner_server.jobs.resources import resolve_compute_dtype

        return resolve_compute_dtype(getattr(model_row, "compute_dtype", None), model_row.path, self.device)

    def full_model(
        self, model_row: RegisteredModel, ctx: JobContext | None = None, kind: str = "", activation_bytes: int = 0
    ) -> tuple[Any, Any]:
        """M (shared, never to be modified) and its tokenizer in the model's compute dtype, from the worker's
        cache; refused up front on a GPU it would not fit for job `kind` (plus the `activation_bytes` the job
        estimated for its steps). With `ctx`, measured as stage "load"."""
        from model_owner_server.jobs.resources import DoesNotFit, check_fits, model_bytes
        from model_owner_server.model_cache import is_loaded, load_full_model

        device, dtype = self.device, self.compute_dtype(model_row)
        cached = is_loaded(model_row.path, device, dtype)
        resident = model_bytes(model_row.n_params or 0, dtype) if cached else 0
        try:
            check_fits(model_row.n_params, dtype, kind, device, resident, activation_bytes)
        except DoesNotFit as exc:
            raise JobFailure(str(exc)) from None
        if ctx is None:
            return load_full_model(model_row.path, device, self.settings.model_cache_size, dtype)
        with ctx.stage("load"):
            model, tokenizer = load_full_model(model_row.path, device, self.settings.model_cache_size, dtype)
        ctx.model_loaded(model, dtype, cached)
        return model, tokenizer


def fairest_queued_job(s: Session) -> str | None:
    """Round-robin across organizations: the oldest queued job of the organization whose last job started
    longest ago (never: first; ties: the organization waiting longest). None when nothing is queued."""
    waiting = {
        org: _aware(t)
        for org, t in s.execute(
            select(JobRow.org_id, func.min(JobRow.created_at)).where(JobRow.status == "queued").group_by(JobRow.org_id)
        ).all()
    }
    if not waiting:
        return None
    started = {
        org: _aware(t)
        for org, t in s.execute(
            select(JobRow.org_id, func.max(JobRow.started_at))
            .where(JobRow.org_id.in_(waiting), JobRow.started_at.is_not(None))
            .group_by(JobRow.org_id)
        ).all()
        if t is not None
    }
    never = datetime.min.replace(tzinfo=UTC)
    org = min(waiting, key=lambda o: (started.get(o, never), waiting[o], o))
    return s.execute(
        select(JobRow.id)
        .where(JobRow.status == "queued", JobRow.org_id == org)
        .order_by(JobRow.created_at, JobRow.id)
        .limit(1)
    ).scalar_one_or_none()


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)  # SQLite: aggregates come back naive


def _task(module: str, function: str) -> Handler:
    """The task body `function` of jobs/tasks/`module`.py, imported at its first run: the task modules load the
    algorithm (torch, transformers), which the API process does not need until it runs a job."""

    def handler(runner: JobRunner, ctx: JobContext, params: dict[str, Any]) -> dict[str, Any]:
        body: Handler = getattr(importlib.import_module(f"model_owner_server.jobs.tasks.{module}"), function)
        return body(runner, ctx, params)

    return handler


# Job kind -> task body. The kinds and their params are part of the API (GET /v1/jobs/{id} shows both).
HANDLERS: dict[str, Handler] = {
    "importance": _task("importance", "importance_job"),
    "emulator": _task("emulator", "emulator_job"),
    "evaluation": _task("evaluation", "evaluation_job"),
    "privacy_audit": _task("privacy_audit", "privacy_audit_job"),
    "benchmark_eval": _task("benchmark_eval", "benchmark_eval_job"),
}
