"""Waiting on the server: an emulator still being built, a job still running (with a progress bar on stderr)."""

from __future__ import annotations

import time

from tqdm import tqdm

from shared import schemas

from .api import EmulatorRef, ServerClient
from .errors import ServerError


def wait_for_emulator(
    client: ServerClient, ref: EmulatorRef, *, poll_s: float, timeout_s: float, progress: bool
) -> schemas.Emulator:
    """The emulator's description, waiting while the server still builds it.

    Polls the emulator itself, not its build job: the job may belong to the model owner's org.
    """
    info = client.emulator(ref.emulator_id)
    deadline = time.monotonic() + timeout_s
    with tqdm(
        desc="waiting for the emulator build",
        disable=not progress or info.status != "building",
        leave=False,
        bar_format="{desc} {elapsed}",
    ) as bar:
        while info.status == "building":
            if time.monotonic() > deadline:
                raise ServerError(f"emulator {ref.emulator_id} still building after {timeout_s:.0f}s; try again later")
            time.sleep(poll_s)
            bar.refresh()
            info = client.emulator(ref.emulator_id)
    if info.status == "failed":
        raise ServerError(f"the server failed to build emulator {ref.emulator_id}: {info.error or 'no reason given'}")
    return info


def wait_for_job(
    client: ServerClient, job_id: str, *, poll_s: float, timeout_s: float, progress: bool, desc: str = "server job"
) -> schemas.Job:
    """Poll `GET /v1/jobs/{id}` until it finishes, showing its progress and message."""
    deadline = time.monotonic() + timeout_s
    bar = tqdm(total=100, desc=desc, disable=not progress, leave=False, bar_format="{l_bar}{bar}| {postfix}")
    try:
        while True:
            job = client.job(job_id)
            bar.n = round(job.progress * 100)
            bar.set_postfix_str(f"{job.status} {job.message}"[:60], refresh=True)
            if job.finished:
                return job
            if time.monotonic() > deadline:
                raise ServerError(
                    f"job {job_id} still {job.status} after {timeout_s:.0f}s; check it later with "
                    f"`dataowner-client status {job_id} --server {client.server}`"
                )
            time.sleep(poll_s)
    finally:
        bar.close()
