"""A real `modelowner-server serve` process on loopback: CLI setup commands, the real huey queue with the
embedded worker, download + verification over HTTP, and a job interrupted by a hard restart."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from shared import signing


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command() -> list[str]:
    script = Path(sys.executable).with_name("modelowner-server")
    if script.exists():
        return [str(script)]
    found = shutil.which("modelowner-server")
    return [found] if found else [sys.executable, "-m", "model_owner_server.cli"]


class Server:
    def __init__(self, env: dict[str, str], port: int, log: Path):
        self.env, self.port, self.log = env, port, log
        self.proc: subprocess.Popen | None = None
        self.url = f"http://127.0.0.1:{port}"

    def cli(self, *args: str) -> str:
        out = subprocess.run(_command() + list(args), env=self.env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    def start(self) -> None:
        with open(self.log, "ab") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                [*_command(), "serve", "--host", "127.0.0.1", "--port", str(self.port)],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError("server did not come up:\n" + self.log.read_text()[-3000:])

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=30)
        finally:
            self.proc = None


@pytest.fixture
def server(tmp_path, new_database_url, files):
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "SCALEOT_DATA_DIR": str(tmp_path / "data"),
        "SCALEOT_DATABASE_URL": new_database_url(),
        "SCALEOT_DEVICE": "cpu",
        "SCALEOT_QUEUE_URL": "",
        "SCALEOT_EMBEDDED_WORKER": "true",
        "SCALEOT_IMPORTANCE_SEQ_LEN": "32",
        "SCALEOT_IMPORTANCE_BATCH_SIZE": "2",
        "SCALEOT_EVAL_SEQ_LEN": "32",
        "SCALEOT_EVAL_MAX_EXAMPLES": "4",
        "SCALEOT_DEFAULT_CORPUS": str(files["corpus"]),
        "SCALEOT_DEFAULT_EVAL": str(files["eval"]),
        "SCALEOT_HEARTBEAT_SECONDS": "1",
    }
    srv = Server(env, _free_port(), tmp_path / "server.log")
    yield srv
    if srv.proc is not None:
        srv.proc.kill()
        srv.proc.wait()


def _wait_job(client: httpx.Client, job_id: str, pred, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if pred(job):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job never reached the expected state: {job}")


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
    job = _wait_job(admin, r.json()["id"], lambda j: j["status"] in ("succeeded", "failed"))
    assert job["status"] == "succeeded", job

    r = alice.post("/v1/emulators", json={"model_id": model_id, "n_adapter": 1, "alpha": 0.5, "beta": 0.3})
    assert r.status_code == 202, r.text
    emu_id = r.json()["emulator"]["id"]
    assert (
        _wait_job(alice, r.json()["job"]["id"], lambda j: j["status"] != "queued" and j["status"] != "running")[
            "status"
        ]
        == "succeeded"
    )
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
    _wait_job(admin, long_id, lambda j: j["status"] == "running" and (j.get("metrics") or {}).get("step", 0) >= 2)
    server.stop(signal.SIGKILL)
    server.start()
    job = admin.get(f"/v1/jobs/{long_id}").json()
    assert job["status"] == "failed" and "interrupted by server restart" in job["error"], job
    assert alice.get(f"/v1/emulators/{emu_id}").json()["status"] == "ready"  # earlier results survive
    health = admin.get("/healthz").json()
    assert health["status"] == "ok" and health["database"] == "ok"
    # Ctrl-C while a job thread is inside torch: a clean exit (not std::terminate, exit 134), the job failed.
    r = admin.post(f"/v1/models/{model_id}/importance", json={"steps": 1_000_000})
    _wait_job(
        admin, r.json()["id"], lambda j: j["status"] == "running" and (j.get("metrics") or {}).get("step", 0) >= 2
    )
    assert server.stop(signal.SIGINT) == 0, server.log.read_text()[-2000:]
    server.start()
    job = admin.get(f"/v1/jobs/{r.json()['id']}").json()
    assert job["status"] == "failed" and "shutdown" in job["error"], job
    # Graceful stop (uvicorn re-raises SIGTERM after a clean shutdown, hence -15).
    assert server.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in server.log.read_text()
