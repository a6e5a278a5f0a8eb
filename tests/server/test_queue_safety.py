"""Whoever can write to the job queue cannot run code in the worker (issue 20, finding 2).

huey pickles queue messages by default, and the worker unpickles whatever it pops: a payload pushed straight
into Redis (or the SQLite queue file) would run in the process that holds the full model. The queue now
speaks JSON that names our one task and one job id (model_owner_server/jobs/serializer.py); these tests push a
pickle whose unpickling would create a marker directory into the real queue storage and check that nothing
runs, the worker survives, and real jobs still go through, on SqliteHuey and (when up) RedisHuey.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import secrets
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from huey import SqliteHuey
from server_helpers import QUEUE_BACKENDS, auth, fast_settings, queue_url_for

from model_owner_server import crud
from model_owner_server.jobs.queue import REGISTERED_TASK_NAME, JobQueue, make_huey, redact_url
from model_owner_server.jobs.runner import HANDLERS
from model_owner_server.jobs.serializer import JobSerializer, RejectedQueueMessage
from model_owner_server.main import create_app
from tooling.procs import wait_until

DROPPED = "dropped a job-queue message that is not one of ours"


class _MkdirOnUnpickle:
    """Unpickling this calls os.mkdir(path): a harmless stand-in for any code an attacker would run."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.mkdir, (self.path,))


def exploit(marker: Path) -> bytes:
    return pickle.dumps(_MkdirOnUnpickle(marker))


def push_raw(huey: Any, payload: bytes) -> None:
    """Write bytes straight into the queue's storage, as anyone with access to Redis or the queue file could."""
    storage = huey.storage
    if hasattr(storage, "queue_key"):  # Redis: the list the consumer pops from
        storage.conn.lpush(storage.queue_key, payload)
    else:  # SQLite: huey's task table
        with sqlite3.connect(storage.filename) as conn:
            conn.execute("insert into task (queue, data, priority) values (?, ?, 0)", (storage.name, payload))


def _queue(tmp_path: Path, queue_url: str | None = None) -> JobQueue:
    settings = fast_settings(tmp_path / "data", "sqlite://", queue_url=queue_url, queue_name="safety")
    return JobQueue(settings, sessions=None, storage=None, keyring=None)  # type: ignore[arg-type]


def _valid_fields(queue: JobQueue) -> dict[str, Any]:
    return json.loads(queue.huey.serialize_task(queue._task.s("job_0123abcd")))


# ---------------------------------------------------------------- the serializer alone


def test_job_message_round_trips_as_json(tmp_path):
    queue = _queue(tmp_path)
    data = queue.huey.serialize_task(queue._task.s("job_0123abcd"))
    fields = json.loads(data)  # plain JSON on the wire, not pickle
    assert fields["name"] == REGISTERED_TASK_NAME and fields["args"] == ["job_0123abcd"]
    task = queue.huey.deserialize_task(data)
    assert task.args == ("job_0123abcd",) and task.kwargs == {}
    assert isinstance(queue.huey.serializer, JobSerializer)


def _mutated(**changes: Any):
    return lambda fields: {**fields, **changes}


REFUSED = {
    "other task": _mutated(name="huey.builtins.anything"),
    "short task name": _mutated(name="scaleot.run_job"),
    "two arguments": _mutated(args=["job_0123abcd", "job_0123abcd"]),
    "no arguments": _mutated(args=[]),
    "not a job id": _mutated(args=["../../etc/passwd"]),
    "job id with a newline": _mutated(args=["job_0123abcd\n"]),
    "number argument": _mutated(args=[7]),
    "keyword arguments": _mutated(kwargs={"job_id": "job_0123abcd"}),
    "chained callback": lambda f: {**f, "on_complete": dict(f)},
    "scheduled": _mutated(eta="2030-01-01T00:00:00"),
    "chord": _mutated(chord_config=["c", 1, 0, None]),
    "negative retries": _mutated(retries=-1),
    "boolean retries": _mutated(retries=True),
    "extra field": _mutated(code="import os"),
    "missing field": lambda f: {k: v for k, v in f.items() if k != "timeout"},
    "task id not a uuid": _mutated(id="x" * 10),
    "list instead of object": lambda f: list(f.values()),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_serializer_refuses_anything_but_one_job_id(tmp_path, caplog, case):
    queue = _queue(tmp_path)
    data = json.dumps(REFUSED[case](_valid_fields(queue))).encode()
    caplog.set_level(logging.ERROR, logger="scaleot.jobs")
    with pytest.raises(RejectedQueueMessage):
        queue.huey.deserialize_task(data)
    assert DROPPED in caplog.text


def test_serializer_never_unpickles(tmp_path, caplog):
    """A forged pickle and huey's own pickled message (an old producer) are both refused unread."""
    queue = _queue(tmp_path)
    marker = tmp_path / "pwned"
    message = queue.huey._registry.create_message(queue._task.s("job_0123abcd"))
    caplog.set_level(logging.ERROR, logger="scaleot.jobs")
    for payload in (exploit(marker), pickle.dumps(message), b"\xff" * 10, b"x" * 100_000):
        with pytest.raises(RejectedQueueMessage):
            queue.huey.deserialize_task(payload)
    assert not marker.exists()
    assert caplog.text.count(DROPPED) == 4


def test_serializer_writes_only_job_messages(tmp_path):
    queue = _queue(tmp_path)
    with pytest.raises(TypeError, match="only job messages"):
        queue.huey.serializer.serialize(("revoke", None))
    with pytest.raises(RejectedQueueMessage, match="job id"):
        queue.enqueue("not-a-job-id")


def test_hueys_default_serializer_would_run_the_payload(tmp_path):
    """The control: the same bytes, popped by a huey with its default (pickle) serializer, run code. This is
    what the queue did before; the tests here fail on it."""
    huey = SqliteHuey("control", filename=str(tmp_path / "control.db"), results=False)
    marker = tmp_path / "pwned"
    push_raw(huey, exploit(marker))
    with pytest.raises(AttributeError):  # the code ran while unpickling; huey then chokes on its None result
        huey.dequeue()
    assert marker.is_dir()


def test_queue_url_password_is_redacted(tmp_path):
    assert redact_url("redis://:s3cret@redis:6379/0") == "redis://:***@redis:6379/0"
    assert redact_url("redis://user:s3cret@redis/0") == "redis://user:***@redis/0"
    assert redact_url("redis://redis:6379/0") == "redis://redis:6379/0"
    with pytest.raises(ValueError) as err:
        make_huey(fast_settings(tmp_path, "sqlite://", queue_url="amqp://:s3cret@mq:5672/"))
    assert "s3cret" not in str(err.value) and "amqp://:***@mq:5672/" in str(err.value)


# ---------------------------------------------------------------- a real worker on a real queue


@pytest.mark.parametrize("backend", QUEUE_BACKENDS)
def test_worker_drops_a_pickle_payload_and_keeps_running_jobs(tmp_path, new_database_url, monkeypatch, caplog, backend):
    monkeypatch.setitem(HANDLERS, "fake", lambda runner, ctx, params: {"ran": params["n"]})
    caplog.set_level(logging.ERROR, logger="scaleot.jobs")
    settings = fast_settings(
        tmp_path / "data",
        new_database_url(),
        queue_url=queue_url_for(backend),
        embedded_worker=True,
        queue_name=f"scaleot-safety-{secrets.token_hex(4)}",
    )
    marker = tmp_path / "pwned"
    with TestClient(create_app(settings)) as client:
        queue: JobQueue = client.app.state.queue
        assert queue.consumer is not None  # the embedded worker threads are running
        try:
            with client.app.state.sessions() as s:
                org, key = crud.create_org(s, "ops", "admin")
                jobs = [crud.create_job(s, "fake", org, {"n": n}) for n in range(2)]
                s.commit()
            queue.enqueue(jobs[0].id)  # a job before the payload ...
            push_raw(queue.huey, exploit(marker))
            queue.enqueue(jobs[1].id)  # ... and one after it: FIFO, so the worker has passed the payload

            def status(job_id: str) -> str:
                return client.get(f"/v1/jobs/{job_id}", headers=auth(key)).json()["status"]

            for job in jobs:
                wait_until(lambda job=job: status(job.id) == "succeeded", timeout=15, what=f"job {job.id}")
            wait_until(
                lambda: DROPPED in caplog.text or marker.exists(), timeout=15, what="the worker to pop the payload"
            )
            assert not marker.exists(), "the worker unpickled a payload from the queue and ran its code"
            assert DROPPED in caplog.text
            assert queue.huey.pending_count() == 0  # popped and discarded, not left to retry
        finally:
            if backend == "redis":
                queue.huey.flush()
