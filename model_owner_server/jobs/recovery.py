"""Crash recovery: jobs whose worker died end failed with a reason, lost queue messages are sent again, and a
Reaper thread does both (plus the janitor's sweep) every heartbeat interval."""

from __future__ import annotations

import logging
import os
import socket
import threading
from datetime import timedelta
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from model_owner_server.core.config import Settings
from model_owner_server.core.db import session_scope
from model_owner_server.jobs.context import fail_job, worker_id
from model_owner_server.models import JobRow, utcnow
from model_owner_server.storage import Storage, pid_alive

if TYPE_CHECKING:
    from model_owner_server.jobs.queue import JobQueue

log = logging.getLogger("scaleot.jobs")


def recover_interrupted_jobs(sessions: sessionmaker[Session], settings: Settings, *, startup: bool) -> list[str]:
    """Fail running jobs whose worker is gone; return their ids.

    Local workers (same host) are checked by pid; at startup a job recorded under our own pid belongs to
    a previous incarnation (containers reuse pid 1). Any worker is presumed dead once its heartbeat is
    `stale_after_heartbeats` intervals old.
    """
    me_host, me_pid = socket.gethostname(), os.getpid()
    stale = timedelta(seconds=settings.heartbeat_seconds * settings.stale_after_heartbeats)
    now = utcnow()
    failed: list[str] = []
    with session_scope(sessions) as s:
        for job in s.execute(select(JobRow).where(JobRow.status == "running").with_for_update()).scalars():
            host, _, rest = (job.worker_id or "").partition(":")
            pid_text = rest.partition(":")[0]
            reason = None
            if host == me_host and pid_text.isdigit():
                pid = int(pid_text)
                if (startup and pid == me_pid and job.worker_id != worker_id()) or not pid_alive(pid):
                    reason = (
                        f"interrupted by server restart: the worker process that ran this job ({job.worker_id}) "
                        "is gone; submit the request again"
                    )
            if reason is None and (job.heartbeat_at is None or now - job.heartbeat_at > stale):
                reason = (
                    f"interrupted: the worker running this job ({job.worker_id}) stopped sending heartbeats "
                    f"(none for over {int(stale.total_seconds())} s); submit the request again"
                )
            if reason:
                fail_job(s, job, reason)
                failed.append(job.id)
    if failed:
        log.warning("marked %d interrupted job(s) failed: %s", len(failed), ", ".join(failed))
    return failed


def requeue_queued_jobs(sessions: sessionmaker[Session], queue: JobQueue) -> list[str]:
    """Enqueue every job still `queued` (its message may have been lost, e.g. a crash between commit and
    enqueue). Duplicates are harmless: the atomic claim in JobRunner.run skips a job already taken."""
    with session_scope(sessions) as s:
        ids = list(s.execute(select(JobRow.id).where(JobRow.status == "queued").order_by(JobRow.created_at)).scalars())
    for job_id in ids:
        queue.submit(sessions, job_id)
    return ids


def fail_jobs_of_this_process(sessions: sessionmaker[Session], reason: str) -> list[str]:
    me = worker_id()
    with session_scope(sessions) as s:
        jobs = list(s.execute(select(JobRow).where(JobRow.status == "running", JobRow.worker_id == me)).scalars())
        for job in jobs:
            fail_job(s, job, reason)
        return [j.id for j in jobs]


class Reaper:
    """Periodically fails jobs whose worker stopped heartbeating (e.g. a remote worker that crashed), then
    removes what interrupted work left behind (janitor.sweep)."""

    def __init__(self, sessions: sessionmaker[Session], settings: Settings, storage: Storage | None = None):
        self.sessions, self.settings, self.storage = sessions, settings, storage
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="job-reaper")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_seconds):
            try:
                recover_interrupted_jobs(self.sessions, self.settings, startup=False)
                if self.storage is not None:
                    from model_owner_server.janitor import sweep

                    sweep(
                        self.sessions,
                        self.storage,
                        startup=False,
                        min_age_s=self.settings.heartbeat_seconds * self.settings.stale_after_heartbeats,
                    )
            except Exception:  # a DB hiccup must not kill the reaper
                log.exception("job reaper pass failed")
