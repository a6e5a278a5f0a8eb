"""POST /v1/jobs/{id}/cancel on a real queue: a queued job ends cancelled at once; a running stage-1 run
stops at its next step, ends cancelled and leaves no importance files; a finished job answers 409."""

from __future__ import annotations

import secrets

from fastapi.testclient import TestClient
from server_helpers import auth, fast_settings

from model_owner_server import crud
from model_owner_server.main import create_app
from model_owner_server.models import AuditEvent, ImportanceRun, JobRow
from tooling.procs import wait_job


def test_cancel_queued_running_and_finished_jobs(tmp_path, new_database_url, files):
    settings = fast_settings(
        tmp_path / "data",
        new_database_url(),
        queue_url=None,
        embedded_worker=True,
        queue_name=f"scaleot-test-{secrets.token_hex(4)}",
        heartbeat_seconds=0.5,
    )
    with TestClient(create_app(settings)) as client:
        with client.app.state.sessions() as s:
            _, key = crud.create_org(s, "ops", "admin")
            _, other_key = crud.create_org(s, "acme", "data-owner")
            s.commit()
        h = auth(key)
        model_id = client.post("/v1/models", headers=h, json={"name": "tiny", "path": str(files["model"])}).json()["id"]
        # Two long runs on one worker thread: the first runs, the second waits in the queue.
        body = {"steps": 100_000, "corpus": str(files["corpus"])}
        first = client.post(f"/v1/models/{model_id}/importance", headers=h, json=body).json()
        second = client.post(f"/v1/models/{model_id}/importance", headers=h, json=body).json()
        wait_job(
            client,
            first["id"],
            lambda j: j["status"] == "running" and j["metrics"].get("step", 0) >= 1,
            timeout=60,
            headers=h,
        )

        # Another organization cannot see (so cannot cancel) the job.
        assert client.post(f"/v1/jobs/{first['id']}/cancel", headers=auth(other_key)).status_code == 404

        queued = client.post(f"/v1/jobs/{second['id']}/cancel", headers=h)
        assert queued.status_code == 202 and queued.json()["status"] == "cancelled", queued.text

        r = client.post(f"/v1/jobs/{first['id']}/cancel", headers=h)
        assert r.status_code == 202 and r.json()["status"] == "running" and r.json()["cancel_requested"], r.text
        done = wait_job(client, first["id"], lambda j: j["status"] != "running", timeout=30, headers=h)
        assert done["status"] == "cancelled" and "cancelled" in done["error"], done
        assert done["metrics"]["step"] < 100_000  # it stopped early, at a step

        again = client.post(f"/v1/jobs/{first['id']}/cancel", headers=h)
        assert again.status_code == 409 and "already finished" in again.json()["error"]["message"]
        with client.app.state.sessions() as s:
            runs = {r.job_id: r for r in s.query(ImportanceRun)}
            assert runs[first["id"]].status == runs[second["id"]].status == "failed"
            assert s.get(JobRow, second["id"]).started_at is None  # the worker never ran it
            actions = [e.action for e in s.query(AuditEvent)]
            assert actions.count("cancel_job") == 2
        data = settings.resolved_data_dir
        assert list((data / "importance").iterdir()) == []  # nothing half-written stays
        assert list((data / "tmp").iterdir()) == []
        assert client.get(f"/v1/models/{model_id}", headers=h).json()["importance_ready"] is False


def test_cancelled_emulator_build_leaves_no_file_and_can_be_rebuilt(tmp_path, new_database_url, files):
    settings = fast_settings(
        tmp_path / "data",
        new_database_url(),
        queue_url=None,
        embedded_worker=True,
        queue_name=f"scaleot-test-{secrets.token_hex(4)}",
        heartbeat_seconds=0.5,
        emulator_calibration_steps=100_000,
    )
    with TestClient(create_app(settings)) as client:
        with client.app.state.sessions() as s:
            _, key = crud.create_org(s, "ops", "admin")
            s.commit()
        h = auth(key)
        model_id = client.post("/v1/models", headers=h, json={"name": "tiny", "path": str(files["model"])}).json()["id"]
        run = client.post(
            f"/v1/models/{model_id}/importance", headers=h, json={"steps": 2, "corpus": str(files["corpus"])}
        ).json()
        wait_job(client, run["id"], lambda j: j["status"] == "succeeded", timeout=60, headers=h)
        body = {"model_id": model_id, "n_adapter": 2, "alpha": 0.5, "beta": 0.5}
        created = client.post("/v1/emulators", headers=h, json=body).json()
        job_id, emu_id = created["job"]["id"], created["emulator"]["id"]
        wait_job(client, job_id, lambda j: j["metrics"].get("step", 0) >= 1, timeout=60, headers=h)  # calibrating
        assert client.post(f"/v1/jobs/{job_id}/cancel", headers=h).status_code == 202
        done = wait_job(client, job_id, lambda j: j["status"] != "running", timeout=30, headers=h)
        assert done["status"] == "cancelled", done
        emu = client.get(f"/v1/emulators/{emu_id}", headers=h).json()
        assert emu["status"] == "failed" and "cancelled" in emu["error"] and emu["sha256"] is None
        assert list((settings.resolved_data_dir / "emulators").iterdir()) == []
        again = client.post("/v1/emulators", headers=h, json=body)  # the message said: post again to rebuild
        assert again.status_code == 202 and again.json()["emulator"]["id"] == emu_id
        assert again.json()["job"]["id"] != job_id
        rebuild = again.json()["job"]["id"]
        wait_job(client, rebuild, lambda j: j["status"] == "running", timeout=30, headers=h)
        client.post(f"/v1/jobs/{rebuild}/cancel", headers=h)
        assert (
            wait_job(client, rebuild, lambda j: j["status"] != "running", timeout=30, headers=h)["status"]
            == "cancelled"
        )
