"""The huey wiring: which backend `SCALEOT_QUEUE_URL` names, and JobQueue (enqueue, submit, embedded workers).

The queue message carries only the job id, as JSON (jobs/serializer.py: never pickle, so whoever can write to
the queue cannot run code in the worker); JobRunner.run does the rest.
"""

from __future__ import annotations

import logging
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from huey import Huey, MemoryHuey, RedisHuey, SqliteHuey
from huey.consumer import Consumer
from sqlalchemy.orm import Session, sessionmaker

from model_owner_server.core.config import Settings
from model_owner_server.core.db import session_scope
from model_owner_server.jobs.context import fail_job
from model_owner_server.jobs.runner import JobRunner
from model_owner_server.jobs.serializer import JobSerializer
from model_owner_server.keyring import KeyRing
from model_owner_server.models import JobRow
from model_owner_server.storage import Storage

log = logging.getLogger("scaleot.jobs")
TASK_NAME = "scaleot.run_job"
# huey registers a task as "<module of the function>.<name>": the one name JobSerializer lets through.
REGISTERED_TASK_NAME = f"{JobRunner.run.__module__}.{TASK_NAME}"


class QueueUnavailable(RuntimeError):
    pass


def redact_url(url: str) -> str:
    """The URL with its password replaced by ***, for messages and logs (a Redis URL carries the password)."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = f"{parts.username or ''}:***@{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:  # unparsable (e.g. a bad port): show the scheme only
        return url.split("://", 1)[0] + "://***"


def _redact_secret(text: str, url: str | None) -> str:
    """`text` (e.g. an exception message) without the queue URL's password in it."""
    try:
        password = urlsplit(url).password if url else None
    except ValueError:
        password = None
    return text.replace(password, "***") if password else text


def make_huey(settings: Settings) -> Huey:
    url = settings.queue_url
    serializer = JobSerializer(REGISTERED_TASK_NAME)
    if url == "immediate":
        return MemoryHuey(settings.queue_name, immediate=True, results=False, serializer=serializer)
    if url and url.startswith(("redis://", "rediss://", "unix://")):
        return RedisHuey(settings.queue_name, url=url, results=False, serializer=serializer)
    if url and url.startswith("sqlite:///"):
        filename = Path(url.removeprefix("sqlite:///"))
    elif url:
        raise ValueError(
            f"unsupported SCALEOT_QUEUE_URL {redact_url(url)!r}: use redis://..., sqlite:///FILE or 'immediate'"
        )
    else:
        filename = settings.queue_file
    filename.parent.mkdir(parents=True, exist_ok=True)
    return SqliteHuey(settings.queue_name, filename=str(filename), results=False, serializer=serializer)


class _QuietConsumer(Consumer):
    """A huey consumer that leaves signal handling to its host (uvicorn, or our worker command)."""

    def _set_signal_handlers(self) -> None:
        pass


class JobQueue:
    def __init__(self, settings: Settings, sessions: sessionmaker[Session], storage: Storage, keyring: KeyRing | None):
        self.settings = settings
        self.huey = make_huey(settings)
        self.runner = JobRunner(settings, sessions, storage, keyring)
        self._task = self.huey.task(name=TASK_NAME)(self.runner.run)
        registered = self.huey._registry.task_to_string(self._task.task_class)
        if registered != REGISTERED_TASK_NAME:  # huey changed how it names tasks: the serializer would drop all
            raise RuntimeError(f"huey registered the job task as {registered!r}, not {REGISTERED_TASK_NAME!r}")
        self.consumer: Consumer | None = None

    @property
    def immediate(self) -> bool:
        return bool(self.huey.immediate)

    def enqueue(self, job_id: str) -> None:
        self._task(job_id)

    def submit(self, sessions: sessionmaker[Session], job_id: str) -> None:
        """Enqueue a committed job; if the queue is unreachable, the job fails visibly instead of hanging."""
        try:
            self.enqueue(job_id)
        except Exception as exc:  # e.g. Redis down
            reason = _redact_secret(f"{type(exc).__name__}: {exc}", self.settings.queue_url)
            log.error("could not enqueue job %s (%s)", job_id, reason)
            with session_scope(sessions) as s:
                job = s.get(JobRow, job_id)
                if job is not None and job.status == "queued":
                    fail_job(s, job, f"could not queue the job ({reason}); try again later")
            raise QueueUnavailable(reason) from None

    def start_consumer(self, workers: int | None = None) -> None:
        """Run huey workers as threads of this process (the embedded worker of `serve`)."""
        if self.immediate or self.consumer is not None:
            return
        self.consumer = _QuietConsumer(
            self.huey,
            workers=workers or self.settings.worker_threads,
            worker_type="thread",
            periodic=False,
            check_worker_health=False,
            initial_delay=0.1,
            max_delay=1.0,
        )
        self.consumer.start()

    def stop_consumer(self) -> None:
        if self.consumer is not None:
            self.consumer.stop(graceful=False)
            self.consumer = None
