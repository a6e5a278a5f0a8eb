"""Faults, CI-sized (`python -m reliability.faults` runs more rounds): kill -9 of a real server with an
adapter upload, an emulator build, a plug-in evaluation and a client download in flight, then restart;
and a full disk while artifacts are written (a real 4 MiB tmpfs when this runs as root, else the writers
patched to raise ENOSPC). (Not marked `db`: they start server processes / mount file systems.)"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from reliability.faults import (
    crash_round,
    disk_full_run,
    fill_disk,
    setup_server,
    small_filesystem,
)


def test_kill_9_with_upload_build_evaluation_and_download_in_flight(tmp_path, new_database_url, files):
    srv, ctx = setup_server(tmp_path, files, new_database_url())
    try:
        report = crash_round(srv, ctx)
    finally:
        srv.kill()
    print(report)
    assert report["consistency_problems"] == 0
    assert report["download_resumed_from"] == 4096


def test_disk_full_on_a_small_filesystem(tmp_path, new_database_url, files):
    with small_filesystem(tmp_path / "small-fs") as reason:
        if reason:
            pytest.skip(f"no real small filesystem here ({reason}); test_disk_full_simulated covers the logic")
        report = disk_full_run(
            tmp_path / "small-fs",
            new_database_url(),
            files,
            make_full=lambda d: fill_disk(d, leave_bytes=16 * 1024).unlink,
        )
    print(report)


def test_disk_full_simulated(tmp_path, new_database_url, files, monkeypatch):
    """The same checks with the writers patched to fail with ENOSPC after writing part of their data
    (works anywhere, no root needed)."""
    from model_owner_server.api import upload
    from model_owner_server.jobs.tasks import importance as importance_task
    from shared import emulator_file

    def enospc(path=None):
        return OSError(errno.ENOSPC, "No space left on device", str(path) if path else None)

    class FullFile:
        """Writes up to 4 KiB for real, then fails like a full disk."""

        def __init__(self, path, mode="wb"):
            self._f = open(path, mode)  # noqa: SIM115 - closed in close()
            self._left = 4096

        def write(self, data):
            if len(data) > self._left:
                self._f.write(data[: self._left])
                self._left = 0
                raise enospc()
            self._left -= len(data)
            return self._f.write(data)

        def close(self):
            self._f.close()

    def full_save_model(model, filename, *args, **kwargs):
        Path(filename).write_bytes(b"\0" * 4096)
        raise enospc(filename)

    def full_save_importance(result, out_dir, *args, **kwargs):
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "importance.safetensors").write_bytes(b"\0" * 4096)
        raise enospc(out_dir)

    def make_full(_data_dir):
        patches = [
            (upload, "open", FullFile),
            (emulator_file, "save_model", full_save_model),
            (importance_task, "save_importance", full_save_importance),
        ]
        for target, name, value in patches:
            monkeypatch.setattr(target, name, value, raising=False)
        return monkeypatch.undo

    report = disk_full_run(tmp_path / "data", new_database_url(), files, make_full=make_full)
    print(report)


@pytest.mark.db
def test_leftovers_of_interrupted_work_are_swept_never_promoted(world):
    """janitor.sweep (startup + every reaper pass): temp files of dead writers, unpromoted or failed emulator
    builds and upload folders whose transaction never committed go; live work and real artifacts stay."""
    import os
    import subprocess
    import sys
    import time

    from server_helpers import data_dir_listing

    from model_owner_server.janitor import sweep
    from model_owner_server.storage import Storage, host_tag

    storage = Storage(world.settings.resolved_data_dir)
    sessions = world.client.app.state.sessions
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    old = time.time() - 3 * 24 * 3600
    before = data_dir_listing(storage.root)

    def make(rel: str, age: float | None = None) -> Path:
        path = storage.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"partial")
        if age is not None:
            os.utime(path, (age, age))
            os.utime(path.parent, (age, age))
        return path

    gone = [
        make(f"tmp/p{dead.pid}_{host_tag()}_dead.part"),
        make("tmp/untagged-from-another-host", age=old),
        make(f"emulators/.{world.emulator['id']}.safetensors.k3j9.tmp"),  # its emulator is ready: not in flight
        make("emulators/emu_nosuchrow.safetensors", age=old),
        make("adapters/adp_uncommitted/adapter.safetensors", age=time.time() - 600),
    ]
    kept = [
        make(f"tmp/p{os.getpid()}_{host_tag()}_live.part"),  # a live writer (this process)
        make("tmp/another-host-recent"),
        make("adapters/adp_committing_now/adapter.safetensors"),  # may be between rename and commit
        make("adapters/adp_ancient/adapter.safetensors", age=old),
    ]  # periodic passes look at recent ones
    removed = sweep(sessions, storage, startup=False, min_age_s=30)
    assert not any(p.exists() for p in gone), removed
    assert all(p.exists() for p in kept), removed
    assert data_dir_listing(storage.root) == {**before, **{str(p.relative_to(storage.root)): 7 for p in kept}}
    for p in kept[:-1]:
        storage.remove(p.parent if p.parent.parent == storage.adapters else p)
    # At startup every folder is checked, however old.
    assert sweep(sessions, storage, startup=True, min_age_s=30)["adapters"] == ["adp_ancient"]
    assert data_dir_listing(storage.root) == before


@pytest.mark.db
def test_a_job_failed_while_it_ran_records_nothing(world):
    """If the reaper failed a job whose worker only looked dead, the worker must not record its result
    afterwards (an emulator `ready` with a job `failed`, or a file the janitor already removed)."""
    from model_owner_server import crud
    from model_owner_server.jobs import context as jobs
    from model_owner_server.models import JobRow

    sessions = world.client.app.state.sessions
    with sessions() as s:
        job = crud.create_job(s, "emulator", crud.find_org(s, "admin"), {})
        job.status, job.worker_id = "running", jobs.worker_id()
        s.commit()
        job_id = job.id
    ctx = jobs.JobContext(job_id, sessions, heartbeat_seconds=60)
    with sessions() as s:
        jobs.still_ours(s, ctx)  # running under this worker: fine
    with sessions() as s:
        jobs.fail_job(s, s.get(JobRow, job_id), "interrupted: the worker stopped sending heartbeats")
        s.commit()
    with sessions() as s, pytest.raises(jobs.JobFailure, match="nothing was recorded"):
        jobs.still_ours(s, ctx)
