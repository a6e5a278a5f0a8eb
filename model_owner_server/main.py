"""The FastAPI application: `create_app(settings)`.

Startup (lifespan): data-dir layout, database migrations, signing key published, interrupted jobs
failed, then (unless disabled) an embedded huey consumer and the heartbeat reaper. Shutdown stops
the consumer and fails whatever this process was still running, so no job is left "running".
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool

from model_owner_server.api.errors import install_error_handlers
from model_owner_server.api.headers import SecurityHeadersMiddleware
from model_owner_server.api.limits import BodySizeLimitMiddleware
from model_owner_server.api.routes import (
    adapters,
    api_keys,
    audit,
    emulators,
    health,
    jobs,
    keys,
    models,
    openai_compat,
)
from model_owner_server.console import mount_console
from model_owner_server.core.config import DEVICE_SETTING, Settings
from model_owner_server.core.db import make_engine, make_session_factory, run_migrations, session_scope
from model_owner_server.janitor import sweep
from model_owner_server.jobs.queue import JobQueue
from model_owner_server.jobs.recovery import (
    Reaper,
    fail_jobs_of_this_process,
    recover_interrupted_jobs,
    requeue_queued_jobs,
)
from model_owner_server.keyring import KeyRing
from model_owner_server.storage import Storage

log = logging.getLogger("scaleot.server")

DESCRIPTION = """
ScaleOT offsite-tuning, model-owner side. The model owner registers base models, estimates layer
importance, and issues signed, compressed **emulators**; data owners fine-tune the emulator's adapter
layers locally and upload only those tensors, which the server plugs into the full model and evaluates.

All `/v1` endpoints need `Authorization: Bearer <api key>`. Errors are `{"error": {"code", "message"}}`.
"""


def create_app(
    settings: Settings | None = None, *, migrate: bool = True, embedded_worker: bool | None = None
) -> FastAPI:
    settings = settings or Settings()
    run_worker = settings.embedded_worker if embedded_worker is None else embedded_worker

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(_startup, app, settings, migrate, run_worker)
        try:
            yield
        finally:
            await run_in_threadpool(_shutdown, app)

    app = FastAPI(
        title="ScaleOT model-owner server", version=health.VERSION, description=DESCRIPTION, lifespan=lifespan
    )
    app.state.settings = settings
    install_error_handlers(app)
    # Before routing and body parsing: oversized JSON bodies never reach a handler (uploads have own caps).
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_request_bytes)
    # Outermost (added last): nosniff, Referrer-Policy, frame denial, CSP, HSTS on every answer, 413s included.
    app.add_middleware(SecurityHeadersMiddleware, public_url=settings.public_url)
    for module in (health, keys, api_keys, models, jobs, emulators, adapters, audit, openai_compat):
        app.include_router(module.router)
    mount_console(app)  # /console: the web console for both organizations (docs/console.md)
    return app


def check_embedded_worker(settings: Settings, run_worker: bool | None = None) -> None:
    """Refuse (OneJobPerGPU) an embedded worker of more than one job thread on a GPU: the rule of the `worker`
    command (jobs/resources.check_one_job_per_gpu). A device that cannot be resolved here is left to the jobs,
    which fail with the DeviceError naming SCALEOT_DEVICE, as before."""
    run_worker = settings.embedded_worker if run_worker is None else run_worker
    if not run_worker or settings.queue_url == "immediate" or settings.worker_threads <= 1:
        return
    from model_owner_server.jobs.resources import check_one_job_per_gpu  # torch: only when it matters
    from shared.device import DeviceError

    try:
        device = settings.resolved_device()
    except DeviceError:
        return
    check_one_job_per_gpu(
        device,
        settings.worker_threads,
        threads_setting=f"SCALEOT_WORKER_THREADS={settings.worker_threads} (with {DEVICE_SETTING}={settings.device})",
        instead="set SCALEOT_WORKER_THREADS=1, or serve without the embedded worker (SCALEOT_EMBEDDED_WORKER=false "
        "or `serve --no-worker`) and run one `modelowner-server worker --device cuda:N` per GPU on the same queue",
    )


def _startup(app: FastAPI, settings: Settings, migrate: bool, run_worker: bool) -> None:
    check_embedded_worker(settings, run_worker)  # first: a refused setting changes nothing
    storage = Storage(settings.resolved_data_dir)
    storage.ensure_layout()
    if migrate:
        run_migrations(settings.db_url)
    engine = make_engine(settings.db_url)
    sessions = make_session_factory(engine)
    keyring = KeyRing(settings.signing_key_path)
    with session_scope(sessions) as s:
        keyring.publish(s)
    queue = JobQueue(settings, sessions, storage, keyring)
    app.state.engine, app.state.sessions, app.state.storage = engine, sessions, storage
    app.state.keyring, app.state.queue = keyring, queue
    # Before our own consumer starts: whatever is "running" now cannot be ours.
    recover_interrupted_jobs(sessions, settings, startup=True)
    # Then leftovers of interrupted writes (temp files, unpromoted builds, uncommitted uploads) go.
    sweep(sessions, storage, startup=True, min_age_s=settings.heartbeat_seconds * settings.stale_after_heartbeats)
    if not queue.immediate:  # inline mode would run them during startup
        try:
            requeue_queued_jobs(sessions, queue)
        except Exception:
            log.exception("could not re-queue waiting jobs")
    if run_worker:
        queue.start_consumer()
    app.state.reaper = Reaper(sessions, settings, storage)
    app.state.reaper.start()
    log.info("model-owner server ready (data dir %s, signing key %s)", settings.resolved_data_dir, keyring.key_id)


def _shutdown(app: FastAPI) -> None:
    state = app.state
    if getattr(state, "reaper", None):
        state.reaper.stop()
    if getattr(state, "queue", None):
        state.queue.stop_consumer()
        failed = fail_jobs_of_this_process(
            state.sessions, "interrupted by server shutdown before it finished; submit the request again"
        )
        if failed:
            log.warning("server shutdown interrupted job(s): %s", ", ".join(failed))
    if getattr(state, "generation_engine", None):
        state.generation_engine.shutdown()
    if getattr(state, "engine", None):
        state.engine.dispose()
