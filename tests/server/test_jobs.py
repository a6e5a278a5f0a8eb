"""Job plumbing on a real huey queue (SqliteHuey + embedded consumer threads; RedisHuey when Redis is up),
live progress, failures, and recovery of jobs whose worker died."""

from __future__ import annotations

import os
import secrets
import socket
import threading
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from server_helpers import QUEUE_BACKENDS, auth, fast_settings, queue_url_for

from model_owner_server import crud
from model_owner_server.jobs import recovery
from model_owner_server.jobs.runner import HANDLERS
from model_owner_server.main import create_app
from model_owner_server.models import JobRow, utcnow
from tooling.procs import wait_job

RELEASE = threading.Event()


def _slow(runner, ctx, params):
    """A fake job: reports progress and metrics, then waits to be released (or fails on request)."""
    ctx.update(0.25, "first quarter", {"loss": 1.5}, force=True)
    if params.get("fail"):
        raise ValueError("the fake job failed on purpose: fix the input and retry")
    RELEASE.wait(10)
    ctx.update(0.9, "almost", {"loss": 0.5}, force=True)
    return {"answer": 42}


@pytest.fixture
def fake_kind(monkeypatch):
    monkeypatch.setitem(HANDLERS, "fake", _slow)
    RELEASE.clear()
    yield "fake"
    RELEASE.set()


@pytest.mark.parametrize("backend", QUEUE_BACKENDS)
def test_real_queue_runs_jobs_with_live_progress(tmp_path, new_database_url, fake_kind, backend):
    queue_url = queue_url_for(backend)
    settings = fast_settings(
        tmp_path / "data",
        new_database_url(),
        queue_url=queue_url,
        embedded_worker=True,
        queue_name=f"scaleot-test-{secrets.token_hex(4)}",
        heartbeat_seconds=0.2,
    )
    with TestClient(create_app(settings)) as client:
        assert not client.app.state.queue.immediate
        with client.app.state.sessions() as s:
            org, key = crud.create_org(s, "ops", "admin")
            ok = crud.create_job(s, fake_kind, org, {})
            bad = crud.create_job(s, fake_kind, org, {"fail": True})
            s.commit()
        for job in (ok, bad):
            client.app.state.queue.enqueue(job.id)
        h = auth(key)
        running = wait_job(client, ok.id, lambda j: j["status"] == "running" and j["progress"] == 0.25, headers=h)
        assert running["message"] == "first quarter" and running["metrics"] == {"loss": 1.5}
        RELEASE.set()
        done = wait_job(client, ok.id, lambda j: j["status"] == "succeeded", headers=h)
        assert done["progress"] == 1.0 and done["result"] == {"answer": 42} and done["metrics"]["loss"] == 0.5
        failed = wait_job(client, bad.id, lambda j: j["status"] == "failed", headers=h)
        assert "failed on purpose" in failed["error"]
        with client.app.state.sessions() as s:
            assert s.get(JobRow, ok.id).worker_id.startswith(socket.gethostname())
        if backend == "redis":
            client.app.state.queue.huey.flush()


def test_shutdown_fails_jobs_still_running(tmp_path, new_database_url, fake_kind):
    settings = fast_settings(tmp_path / "data", new_database_url(), queue_url=None, embedded_worker=True)
    with TestClient(create_app(settings)) as client:
        with client.app.state.sessions() as s:
            org, key = crud.create_org(s, "ops", "admin")
            job = crud.create_job(s, fake_kind, org, {})
            s.commit()
        client.app.state.queue.enqueue(job.id)
        wait_job(client, job.id, lambda j: j["status"] == "running", headers=auth(key))
        sessions = client.app.state.sessions
    with sessions() as s:  # the app has shut down while the job was still waiting
        row = s.get(JobRow, job.id)
        assert row.status == "failed" and "interrupted by server shutdown" in row.error


def _running_job(s, org, worker_id, heartbeat_age_s: float, kind="importance", params=None) -> JobRow:
    job = crud.create_job(s, kind, org, params or {})
    job.status, job.worker_id = "running", worker_id
    job.heartbeat_at = utcnow() - timedelta(seconds=heartbeat_age_s)
    s.flush()
    return job


def test_recovery_fails_jobs_of_dead_workers(world):
    """Dead local pid, stale remote heartbeat -> failed with a reason; a live worker's job is left alone."""
    from model_owner_server.models import ImportanceRun

    host = socket.gethostname()
    sessions = world.client.app.state.sessions
    with sessions() as s:
        admin = crud.find_org(s, "admin")
        dead_pid = _dead_pid()
        run = ImportanceRun(model_id=world.model_id, status="pending", steps=1, corpus="x")
        s.add(run)
        s.flush()
        dead_local = _running_job(s, admin, f"{host}:{dead_pid}:abcd", 0, params={"run_id": run.id})
        stale_remote = _running_job(s, admin, "elsewhere:123:abcd", 3600)
        live_local = _running_job(s, admin, f"{host}:{os.getpid()}:other", 0)  # e.g. a worker thread right now
        ids = (dead_local.id, stale_remote.id, live_local.id, run.id)
        s.commit()
    failed = recovery.recover_interrupted_jobs(sessions, world.settings, startup=False)
    assert set(ids[:2]) <= set(failed) and ids[2] not in failed
    h = auth(world.keys["admin"])
    j1 = world.client.get(f"/v1/jobs/{ids[0]}", headers=h).json()
    assert j1["status"] == "failed" and "interrupted by server restart" in j1["error"]
    j2 = world.client.get(f"/v1/jobs/{ids[1]}", headers=h).json()
    assert j2["status"] == "failed" and "heartbeat" in j2["error"]
    assert world.client.get(f"/v1/jobs/{ids[2]}", headers=h).json()["status"] == "running"
    with sessions() as s:
        assert s.get(ImportanceRun, ids[3]).status == "failed"
        # At startup, a job recorded under our own pid by another incarnation is dead too (containers reuse pids).
        s.get(JobRow, ids[2]).heartbeat_at = utcnow()
        s.commit()
    assert ids[2] in recovery.recover_interrupted_jobs(sessions, world.settings, startup=True)


def _dead_pid() -> int:
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_queued_jobs_lost_by_the_queue_are_requeued_on_start(tmp_path, new_database_url, fake_kind):
    """A job committed as queued whose queue message never made it (crash between commit and enqueue)
    runs after the next start."""
    from model_owner_server.core.db import make_engine, make_session_factory, run_migrations

    settings = fast_settings(tmp_path / "data", new_database_url(), queue_url=None, embedded_worker=True)
    run_migrations(settings.db_url)
    engine = make_engine(settings.db_url)
    with make_session_factory(engine)() as s:
        org, key = crud.create_org(s, "ops", "admin")
        job = crud.create_job(s, fake_kind, org, {})
        s.commit()
    engine.dispose()
    RELEASE.set()
    with TestClient(create_app(settings)) as client:
        done = wait_job(client, job.id, lambda j: j["status"] == "succeeded", headers=auth(key))
        assert done["result"] == {"answer": 42}
