"""A real `modelowner-server serve` process on loopback: CLI setup commands, the real huey queue with the
embedded worker, download + verification over HTTP, and a job interrupted by a hard restart."""

from __future__ import annotations

import signal
import subprocess

import httpx
import pytest

from shared import signing
from tooling.procs import ServeProcess, console_script, small_server_env, wait_job


class Server(ServeProcess):
    """The server process, and its CLI run with the same environment."""

    def cli(self, *args: str) -> str:
        out = subprocess.run(
            [*console_script("modelowner-server"), *args], env=self.env, capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()


@pytest.fixture
def server(tmp_path, new_database_url, files):
    env = small_server_env(
        tmp_path / "data",
        new_database_url(),
        SCALEOT_DEFAULT_CORPUS=str(files["corpus"]),
        SCALEOT_DEFAULT_EVAL=str(files["eval"]),
    )
    srv = Server(env, tmp_path / "server.log")  # the test runs CLI setup commands first, then starts it
    try:
        yield srv
    finally:
        srv.stop(signal.SIGKILL)


def _running_at_step_2(job: dict) -> bool:
    return job["status"] == "running" and (job.get("metrics") or {}).get("step", 0) >= 2


def test_serve_process_end_to_end_and_restart(server, files, tmp_path):
    admin_key = server.cli("create-org", "model-owner", "--role", "admin")
    alice_key = server.cli("create-org", "alice")
    assert admin_key.startswith("sot_") and alice_key.startswith("sot_") and admin_key != alice_key
    server.cli("register-model", "tiny", "--path", str(files["model"]))
    server.cli("grant", "alice", "tiny")
    server.start()
    admin = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {admin_key}"}, timeout=30)
    alice = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {alice_key}"}, timeout=30)

    model_id = alice.get("/v1/models").json()["models"][0]["id"]
    r = admin.post(f"/v1/models/{model_id}/importance", json={"steps": 3})  # default corpus from settings
    assert r.status_code == 202 and r.json()["status"] == "queued"
    job = wait_job(admin, r.json()["id"], timeout=60)
    assert job["status"] == "succeeded", job

    r = alice.post("/v1/emulators", json={"model_id": model_id, "n_adapter": 1, "alpha": 0.5, "beta": 0.3})
    assert r.status_code == 202, r.text
    emu_id = r.json()["emulator"]["id"]
    assert wait_job(alice, r.json()["job"]["id"], timeout=60)["status"] == "succeeded"
    emu = alice.get(f"/v1/emulators/{emu_id}").json()
    assert emu["status"] == "ready" and emu["file_url"] == f"{server.url}/v1/emulators/{emu_id}/file"

    # Download in two pieces over real HTTP (resume), then verify against the pinned fingerprint.
    path = tmp_path / "emu.safetensors"
    with alice.stream("GET", emu["file_url"]) as resp:
        first = next(resp.iter_bytes(4096))
    path.write_bytes(first)
    rest = alice.get(emu["file_url"], headers={"Range": f"bytes={len(first)}-", "If-Range": f'"{emu["sha256"]}"'})
    assert rest.status_code == 206
    path.write_bytes(first + rest.content)
    listing = alice.get("/v1/signing-keys").json()
    pin = listing["keys"][0]["key_id"]
    manifest = signing.verify_signed_manifest(
        alice.get(emu["signature_url"]).json(), signing.trusted_keys_from_listing(listing, [pin])
    )
    signing.verify_file(path, manifest)

    # A long job, killed hard mid-run: after the restart it is failed with a reason, not stuck "running".
    r = admin.post(f"/v1/models/{model_id}/importance", json={"steps": 1_000_000})
    long_id = r.json()["id"]
    wait_job(admin, long_id, _running_at_step_2, timeout=60)
    server.stop(signal.SIGKILL)
    server.start()
    job = admin.get(f"/v1/jobs/{long_id}").json()
    assert job["status"] == "failed" and "interrupted by server restart" in job["error"], job
    assert alice.get(f"/v1/emulators/{emu_id}").json()["status"] == "ready"  # earlier results survive
    health = admin.get("/healthz").json()
    assert health["status"] == "ok" and health["database"] == "ok"
    # Ctrl-C while a job thread is inside torch: a clean exit (not std::terminate, exit 134), the job failed.
    r = admin.post(f"/v1/models/{model_id}/importance", json={"steps": 1_000_000})
    wait_job(admin, r.json()["id"], _running_at_step_2, timeout=60)
    assert server.stop(signal.SIGINT) == 0, server.log.read_text()[-2000:]
    server.start()
    job = admin.get(f"/v1/jobs/{r.json()['id']}").json()
    assert job["status"] == "failed" and "shutdown" in job["error"], job
    # Graceful stop (uvicorn re-raises SIGTERM after a clean shutdown, hence -15).
    assert server.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in server.log.read_text()
