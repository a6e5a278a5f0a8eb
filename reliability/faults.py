"""Fault runs: kill -9 with everything in flight, then restart; and a full disk while writing artifacts.

    .venv/bin/python -m reliability.faults --rounds 5 [--database-url postgresql+psycopg://...]

One *crash round* puts all of this in flight on a real `modelowner-server serve` (two worker threads),
then kills the server with SIGKILL in the middle of an emulator download:
  - an adapter upload, half of its body sent (the server is writing it under tmp/);
  - an emulator build that wrote its complete temp file but has not renamed it (pause point);
  - a plug-in evaluation that has started scoring (pause point);
  - `data_owner_client.transfer.fetch_verified_emulator` downloading (cut after 4 KiB).
After the restart it checks: nothing half-written is visible (no temp file promoted or left, no row
pointing at a missing file, no file without a row), both interrupted jobs ended `failed` with a reason
and re-running them succeeds, no adapter or evaluation row of the cut upload exists, and the client
resumes its download from the partial file (HTTP Range; checked in the audit log) and verifies it.

The *disk-full run* puts the data directory on a 4 MiB tmpfs (root + mount), fills it, and checks that
an adapter upload gets 507 `insufficient_storage`, an emulator build and an importance run fail with a
"disk space" reason, nothing is left behind, and everything works again once space is freed.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from reliability.fault_clients import CuttingTransport, SlowUpload, count_adapters
from reliability.harness import (
    ServerProcess,
    adapter_bytes_for,
    bootstrap,
    client,
    consistency_problems,
    fresh_database,
    importance_and_emulator,
    make_inputs,
    server_env,
)
from tooling.procs import wait_job, wait_until

# ---------------------------------------------------------------- the crash round


def setup_server(work: Path, files: dict[str, Path], db_url: str) -> tuple[ServerProcess, dict[str, Any]]:
    """A fault-hook server with alice granted the tiny model and a ready emulator; returns (server, ctx)."""
    data_dir, pause = work / "data", work / "pause"
    pause.mkdir(parents=True, exist_ok=True)
    boot = bootstrap(db_url, files["model"])
    env = server_env(
        data_dir, db_url, corpus=files["corpus"], eval_file=files["eval"], pause_dir=pause, SCALEOT_WORKER_THREADS="2"
    )
    srv = ServerProcess(env, work / "server.log", hooks=True)
    srv.start()
    emu = importance_and_emulator(srv.url, boot["keys"], boot["model_id"])
    with client(srv.url, boot["keys"]["alice"]) as alice:
        emu_bytes = alice.get(f"/v1/emulators/{emu['id']}/file").content
    tmp_emu = work / "emulator-for-adapter.safetensors"
    tmp_emu.write_bytes(emu_bytes)
    ctx = {
        "work": work,
        "data_dir": data_dir,
        "pause": pause,
        "db_url": db_url,
        "keys": boot["keys"],
        "model_id": boot["model_id"],
        "emulator": emu,
        "adapter": adapter_bytes_for(tmp_emu),
        "round": 0,
    }
    return srv, ctx


def crash_round(srv: ServerProcess, ctx: dict[str, Any]) -> dict[str, Any]:
    """One kill -9 with upload, build, evaluation and download in flight; restart; check; re-run."""
    from data_owner_client.transfer import (
        EmulatorRef,
        ServerClient,
        fetch_verified_emulator,
    )

    ctx["round"] += 1
    rnd, keys, pause, data_dir = ctx["round"], ctx["keys"], ctx["pause"], ctx["data_dir"]
    emu = ctx["emulator"]
    admin, alice = client(srv.url, keys["admin"]), client(srv.url, keys["alice"])
    report: dict[str, Any] = {"round": rnd}
    try:
        adapters_before = count_adapters(srv.url, keys["alice"])
        for point in ("evaluate", "emulator_saved"):
            (pause / f"{point}.reached").unlink(missing_ok=True)
            (pause / point).touch()
        # 1. an evaluation that has started scoring
        r = alice.post(
            f"/v1/emulators/{emu['id']}/adapters",
            files={"adapter": ("adapter.safetensors", io.BytesIO(ctx["adapter"]))},
        )
        assert r.status_code == 202, r.text
        eval_adapter, eval_job = r.json()["adapter"]["id"], r.json()["job"]["id"]
        wait_until((pause / "evaluate.reached").exists, timeout=60, what="the evaluation to start")
        # 2. an emulator build with its complete temp file not yet renamed (new parameters each round)
        params = {"model_id": ctx["model_id"], "n_adapter": 2, "alpha": 0.5, "beta": round(0.05 * rnd, 4)}
        r = alice.post("/v1/emulators", json=params)
        assert r.status_code == 202, r.text
        build_emu, build_job = r.json()["emulator"]["id"], r.json()["job"]["id"]
        wait_until(
            (pause / "emulator_saved.reached").exists, timeout=60, what="the emulator build to write its temp file"
        )
        temps = list((data_dir / "emulators").glob(f".{build_emu}.safetensors.*.tmp"))
        assert temps, "the paused build has no temp file"
        # 3. an upload with half of its body on the server
        upload = SlowUpload(srv.url, keys["alice"], emu["id"], ctx["adapter"])
        upload.start()
        wait_until(
            lambda: any(p.stat().st_size > 0 for p in (data_dir / "tmp").iterdir()),
            timeout=60,
            what="the upload to reach the server's tmp/",
        )
        # 4. a download, cut (and the server killed) after 4 KiB
        cache = ctx["work"] / f"client-cache-{rnd}"
        killed_at = {}

        def kill() -> None:
            killed_at["t"] = time.monotonic()
            srv.kill()

        ref = EmulatorRef(srv.url, emu["id"])
        pin = admin.get("/v1/signing-keys").json()["keys"][-1]["key_id"]
        first_error = None
        with ServerClient(srv.url, keys["alice"], transport=CuttingTransport(4096, kill)) as c:
            try:
                fetch_verified_emulator(c, ref, cache_dir=cache, pinned=pin, trust_on_first_use=False, progress=False)
            except Exception as exc:
                first_error = f"{type(exc).__name__}: {exc}"
        assert "t" in killed_at and first_error and "interrupted" in first_error, first_error
        upload.release()
        part = cache / "emulators" / f"{emu['sha256']}.safetensors.part"
        assert part.is_file() and part.stat().st_size == 4096, "the client kept no partial download"
        report["client_error"] = first_error[:120]
        report["upload_outcome"] = upload.outcome
        for point in ("evaluate", "emulator_saved"):
            (pause / point).unlink(missing_ok=True)
        # --- restart
        report["restart_s"] = round(srv.start(), 2)
        report["recovered_after_kill_s"] = round(time.monotonic() - killed_at["t"], 2)
        problems = consistency_problems(ctx["db_url"], data_dir, allow_active=False)
        assert not problems, problems
        job = admin.get(f"/v1/jobs/{eval_job}").json()
        assert job["status"] == "failed" and "interrupted" in job["error"], job
        a = alice.get(f"/v1/adapters/{eval_adapter}").json()
        assert a["status"] == "failed" and a["error"] and a["evaluation"]["plug_in"] is None, a
        job = admin.get(f"/v1/jobs/{build_job}").json()
        assert job["status"] == "failed" and "interrupted" in job["error"], job
        e = alice.get(f"/v1/emulators/{build_emu}").json()
        assert e["status"] == "failed" and e["error"], e
        assert alice.get(f"/v1/emulators/{build_emu}/file").status_code == 409
        assert not any((data_dir / "emulators").glob(f"*{build_emu}*")), "the interrupted build left a file"
        # the cut upload left no adapter (only the one whose evaluation was interrupted was stored)
        assert count_adapters(srv.url, keys["alice"]) == adapters_before + 1
        report["interrupted_jobs"] = {"evaluation": "failed with reason", "emulator": "failed with reason"}
        # --- the client resumes its download from the partial file
        with ServerClient(srv.url, keys["alice"]) as c:
            ver = fetch_verified_emulator(c, ref, cache_dir=cache, pinned=pin, trust_on_first_use=False, progress=False)
        assert not ver.reused and ver.path.stat().st_size == emu["size_bytes"]
        audit = admin.get(
            "/v1/audit", params={"action": "download_emulator", "target_id": emu["id"], "org": "alice", "limit": 1}
        ).json()["events"]
        assert audit and audit[0]["detail"]["start"] == 4096, audit
        report["download_resumed_from"] = 4096
        # --- re-running the interrupted work succeeds
        r = alice.post("/v1/emulators", json=params)
        assert r.status_code == 202 and r.json()["job"]["id"] != build_job, r.text
        assert wait_job(alice, r.json()["job"]["id"])["status"] == "succeeded"
        assert alice.get(f"/v1/emulators/{build_emu}").json()["status"] == "ready"
        r = alice.post(
            f"/v1/emulators/{emu['id']}/adapters",
            files={"adapter": ("adapter.safetensors", io.BytesIO(ctx["adapter"]))},
        )
        assert r.status_code == 202, r.text
        assert wait_job(alice, r.json()["job"]["id"])["status"] == "succeeded"
        report["rerun"] = "emulator ready, adapter evaluated"
        problems = consistency_problems(ctx["db_url"], data_dir, allow_active=False)
        assert not problems, problems
        report["consistency_problems"] = 0
        return report
    finally:
        admin.close()
        alice.close()


# ---------------------------------------------------------------- disk full


@contextmanager
def small_filesystem(path: Path, size: str = "4m") -> Iterator[str | None]:
    """Mount a size-limited tmpfs at `path`; yields None on success, else the reason it is not possible."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        yield "mounting a small tmpfs needs root (CAP_SYS_ADMIN); not running as root"
        return
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
        check=False,
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        yield f"mount -t tmpfs failed: {(r.stderr or r.stdout).strip()[:200]}"
        return
    try:
        yield None
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def fill_disk(folder: Path, leave_bytes: int) -> Path:
    """Consume the filesystem's free space except about `leave_bytes`; returns the filler file."""
    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    filler = folder / "filler.bin"
    with open(filler, "wb") as f:
        remaining = max(0, free - leave_bytes)
        while remaining > 0:
            n = min(remaining, 1 << 20)
            f.write(b"\0" * n)
            remaining -= n
    return filler


def disk_full_run(
    data_dir: Path, db_url: str, files: dict[str, Path], make_full: Callable[[Path], Callable[[], None]]
) -> dict[str, Any]:
    """In-process server whose data dir is `data_dir`. After setting up an emulator it calls
    `make_full(data_dir)` (fill a small filesystem, or patch the writers to raise ENOSPC), which returns
    the function that frees the space again. Returns what happened; raises AssertionError on a bad outcome."""
    from fastapi.testclient import TestClient

    from model_owner_server import crud
    from model_owner_server.core.config import Settings
    from model_owner_server.main import create_app

    settings = Settings(
        _env_file=None,
        data_dir=data_dir,
        database_url=db_url,
        device="cpu",
        queue_url="immediate",
        embedded_worker=False,
        importance_seq_len=32,
        importance_batch_size=2,
        eval_seq_len=32,
        eval_batch_size=2,
        eval_max_examples=4,
        default_eval=files["eval"],
        default_corpus=files["corpus"],
    )
    report: dict[str, Any] = {}
    with TestClient(create_app(settings)) as c:
        with c.app.state.sessions() as s:
            _, key = crud.create_org(s, "admin", "admin")
            alice_org, alice_key = crud.create_org(s, "alice", "data-owner")
            model = crud.register_model(s, "tiny", files["model"])
            crud.grant(s, model, alice_org)
            s.commit()
            model_id = model.id
        admin_h, alice_h = {"Authorization": f"Bearer {key}"}, {"Authorization": f"Bearer {alice_key}"}
        assert c.post(f"/v1/models/{model_id}/importance", headers=admin_h, json={"steps": 2}).status_code == 202
        r = c.post(
            "/v1/emulators", headers=alice_h, json={"model_id": model_id, "n_adapter": 1, "alpha": 0.5, "beta": 0.3}
        )
        emu = r.json()["emulator"]
        assert emu["status"] == "ready", r.json()
        emu_path = Path(tempfile.mkdtemp()) / "emu.safetensors"
        emu_path.write_bytes(c.get(f"/v1/emulators/{emu['id']}/file", headers=alice_h).content)
        adapter = adapter_bytes_for(emu_path)

        def snapshot() -> tuple[dict, list[str]]:
            with c.app.state.sessions() as s:
                counts = crud.row_counts(s)
            listing = sorted(
                str(p.relative_to(data_dir))
                for p in data_dir.rglob("*")
                if p.is_file() and p.name != "filler.bin" and not p.name.startswith("scaleot.db")
            )
            return counts, listing

        before = snapshot()
        free_space = make_full(data_dir)
        report["free_bytes_left"] = os.statvfs(data_dir).f_bavail * os.statvfs(data_dir).f_frsize
        report["adapter_bytes"] = len(adapter)
        # adapter upload: 507, nothing kept
        r = c.post(
            f"/v1/emulators/{emu['id']}/adapters",
            headers=alice_h,
            files={"adapter": ("adapter.safetensors", io.BytesIO(adapter))},
        )
        assert r.status_code == 507 and r.json()["error"]["code"] == "insufficient_storage", r.text
        report["upload"] = f"{r.status_code} {r.json()['error']['code']}"
        assert snapshot() == before, "a refused upload changed stored state"
        # emulator build: the job fails with a disk-space reason, nothing kept
        r = c.post(
            "/v1/emulators", headers=alice_h, json={"model_id": model_id, "n_adapter": 2, "alpha": 0.5, "beta": 0.5}
        )
        job, emu2 = r.json()["job"], r.json()["emulator"]
        assert job["status"] == "failed" and "disk space" in job["error"], job
        assert emu2["status"] == "failed" and "disk space" in (emu2["error"] or ""), emu2
        report["emulator_build"] = f"job failed: {job['error'][:80]}..."
        leftovers = [p.name for p in (data_dir / "emulators").iterdir() if emu2["id"] in p.name]
        assert not leftovers, leftovers
        # importance run: same
        r = c.post(f"/v1/models/{model_id}/importance", headers=admin_h, json={"steps": 2})
        job = c.get(f"/v1/jobs/{r.json()['id']}", headers=admin_h).json()
        assert job["status"] == "failed" and "disk space" in job["error"], job
        report["importance_run"] = f"job failed: {job['error'][:80]}..."
        assert not list((data_dir / "tmp").iterdir()), "temp files left behind"
        # space freed: everything works again
        free_space()
        r = c.post(
            "/v1/emulators", headers=alice_h, json={"model_id": model_id, "n_adapter": 2, "alpha": 0.5, "beta": 0.5}
        )
        assert r.json()["emulator"]["status"] == "ready", r.json()
        r = c.post(
            f"/v1/emulators/{emu['id']}/adapters",
            headers=alice_h,
            files={"adapter": ("adapter.safetensors", io.BytesIO(adapter))},
        )
        assert r.status_code == 202, r.text
        report["after_freeing_space"] = "emulator ready, upload accepted"
    problems = consistency_problems(db_url, data_dir)
    assert not problems, problems
    return report


# ---------------------------------------------------------------- script


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="crash rounds (each: kill -9 + restart + checks)")
    ap.add_argument(
        "--database-url",
        default="",
        help="default: a SQLite file in the work dir; a PostgreSQL URL gets a fresh schema, dropped afterwards",
    )
    ap.add_argument("--work", type=Path, default=None, help="work dir (default: a temp dir, removed)")
    ap.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="scaleot-faults-"))
    files = make_inputs(work / "inputs")
    t0 = time.monotonic()
    rounds = []
    with fresh_database(args.database_url, work) as db_url:
        srv, ctx = setup_server(work / "crash", files, db_url)
        try:
            for _ in range(args.rounds):
                rounds.append(crash_round(srv, ctx))
                print(json.dumps(rounds[-1]), flush=True)
        finally:
            srv.stop()
    with small_filesystem(work / "small-fs") as reason:
        if reason:
            disk = {"skipped": reason}
        else:
            disk = disk_full_run(
                work / "small-fs",
                f"sqlite:///{work / 'disk-full.db'}",
                files,
                make_full=lambda d: fill_disk(d, leave_bytes=16 * 1024).unlink,
            )
    print(json.dumps({"disk_full": disk}), flush=True)
    restarts = [r["restart_s"] for r in rounds]
    report = {
        "rounds": rounds,
        "disk_full": disk,
        "seconds": round(time.monotonic() - t0, 1),
        "restart_s": {"min": min(restarts), "max": max(restarts)} if restarts else None,
    }
    print("\n| check | result |\n|---|---|")
    print(f"| crash rounds (kill -9 with upload + build + evaluation + download in flight) | {len(rounds)} passed |")
    if restarts:
        print(f"| restart to healthy after kill -9 | {min(restarts):.1f}-{max(restarts):.1f} s |")
    print("| half-written files visible / left behind after restart | 0 |")
    print("| consistency problems (rows vs files, stuck jobs, half evaluations) | 0 |")
    print("| interrupted jobs | all failed with a reason; re-run succeeded |")
    print("| client download | resumed at byte 4096 via Range, verified |")
    print(
        f"| disk full | {disk.get('skipped') or disk['upload'] + ' on upload; build and importance failed cleanly'} |"
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
