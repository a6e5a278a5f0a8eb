"""The service commands: `serve` (the REST API with an embedded job worker) and `worker` (job workers alone)."""

from __future__ import annotations

import logging
from typing import Any

import typer

from model_owner_server.cli.common import app, fail, load_settings


@app.command("serve")
def serve_cmd(
    host: str | None = typer.Option(None, "--host", help="default: SCALEOT_HOST or 127.0.0.1"),
    port: int | None = typer.Option(None, "--port", help="default: SCALEOT_PORT or 8000"),
    worker: bool | None = typer.Option(
        None,
        "--worker/--no-worker",
        help="run the job worker inside the server (default: SCALEOT_EMBEDDED_WORKER=true)",
    ),
    log_level: str = typer.Option("info", "--log-level"),
) -> None:
    """Apply database migrations, then serve the REST API (with an embedded job worker by default)."""
    import logging

    import uvicorn

    from model_owner_server.core.db import run_migrations
    from model_owner_server.jobs.resources import OneJobPerGPU
    from model_owner_server.main import check_embedded_worker, create_app

    settings = load_settings(host=host, port=port, embedded_worker=worker)
    try:
        check_embedded_worker(settings)  # before migrations and the port: a refused setting changes nothing
    except OneJobPerGPU as exc:
        fail(str(exc))
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    run_migrations(settings.db_url)
    code = 0
    try:
        uvicorn.run(
            create_app(settings, migrate=False), host=settings.host, port=settings.port, log_level=log_level.lower()
        )
    except KeyboardInterrupt:
        code = 130
    _exit_past_busy_job_threads(code)


def _exit_past_busy_job_threads(code: int) -> None:
    """The shutdown hook has already marked this process's jobs failed; a job thread may still be inside torch,
    and finalising the interpreter under it aborts the process (std::terminate, exit 134). Leave cleanly now."""
    import logging
    import os
    import sys
    import threading

    if threading.active_count() > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if code:
        raise typer.Exit(code)


@app.command("worker")
def worker_cmd(
    threads: int = typer.Option(1, "--threads", help="jobs run at once in this process (CPU only; a GPU runs one)"),
    device: str | None = typer.Option(
        None,
        "--device",
        help="where this worker's jobs run: cpu, cuda, cuda:N or auto (default: SCALEOT_DEVICE). "
        "Several workers on one queue, one per GPU: `worker --device cuda:0`, `worker --device cuda:1`, ...",
    ),
) -> None:
    """Run job workers outside the API process (same SCALEOT_DATABASE_URL / SCALEOT_QUEUE_URL / data dir)."""
    import logging

    from model_owner_server.core.db import make_engine, make_session_factory, run_migrations
    from model_owner_server.jobs.queue import JobQueue
    from model_owner_server.jobs.recovery import fail_jobs_of_this_process, recover_interrupted_jobs
    from model_owner_server.keyring import KeyRing
    from model_owner_server.storage import Storage

    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    settings = worker_settings(device, threads)
    run_migrations(settings.db_url)
    sessions = make_session_factory(make_engine(settings.db_url))
    storage = Storage(settings.resolved_data_dir)
    storage.ensure_layout()
    # Sign only with the server's own key; a worker never invents one (the API signs lazily otherwise).
    keyring = KeyRing(settings.signing_key_path) if settings.signing_key_path.exists() else None
    queue = JobQueue(settings, sessions, storage, keyring)
    recover_interrupted_jobs(sessions, settings, startup=True)
    consumer = queue.huey.create_consumer(workers=threads, worker_type="thread", periodic=False)
    try:
        consumer.run()  # blocks; SIGINT/SIGTERM stop it
    finally:
        fail_jobs_of_this_process(
            sessions, "interrupted: the worker was stopped before the job finished; submit the request again"
        )


def worker_settings(device: str | None, threads: int) -> Any:
    """The worker's settings with --device applied, checked before anything starts: the device exists here
    (no silent CPU fallback when a GPU was asked for), and a GPU runs one job at a time."""
    from pydantic import ValidationError

    from model_owner_server.jobs.resources import OneJobPerGPU, check_one_job_per_gpu
    from shared.device import DeviceError, resolve_device

    try:
        settings = load_settings(device=device)
    except ValidationError as exc:
        fail(f"--device / SCALEOT_DEVICE {device!r}: {exc.errors()[0]['msg']}; use cpu, cuda, cuda:N or auto")
    if settings.queue_url == "immediate":
        fail("SCALEOT_QUEUE_URL=immediate runs jobs inside the server; a separate worker has nothing to do")
    try:
        choice = resolve_device(str(settings.device), setting="--device" if device else "SCALEOT_DEVICE")
    except DeviceError as exc:
        fail(str(exc))  # names the option or variable it came from and what to set instead
    try:
        check_one_job_per_gpu(
            choice.device,
            threads,
            threads_setting=f"--threads {threads}",
            instead="run one worker per GPU instead (`worker --device cuda:0`, `worker --device cuda:1`, ...) "
            "on the same queue",
        )
    except OneJobPerGPU as exc:
        fail(str(exc))
    if choice.device.type == "cuda":
        import torch

        index = choice.device.index if choice.device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            fail(f"--device {choice.device}: this machine has {torch.cuda.device_count()} GPU(s) (cuda:0 ...)")
        torch.cuda.set_device(index)  # anything allocated without an explicit device lands on this worker's GPU
    logging.getLogger("scaleot.jobs").info("worker jobs run on %s", choice.device)
    return settings
