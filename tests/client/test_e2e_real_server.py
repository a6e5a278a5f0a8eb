"""The whole offsite-tuning round trip across two real processes on loopback.

Model owner: `modelowner-server create-org / register-model / grant`, then `serve`, importance and
emulator through the REST API (tiny model from scaleot_samples/tiny.py). Data owner: the `dataowner-client tune`
console script as a subprocess, pinning the server key by its fingerprint.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

import model_owner_server.main  # noqa: F401 - a broken server import must fail these tests, not skip them
from data_owner_client.cli import app
from scaleot_samples.tiny import save_tiny_model_dir
from tooling.procs import ServeProcess, wait_job

from .conftest import TRAIN_TEXT

BIN = Path(sys.executable).parent


def _script(name: str) -> list[str]:
    exe = BIN / name
    if exe.exists():
        return [str(exe)]
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"console script {name} not installed (pip install -e . --no-deps)")
    return [found]


def _run(cmd: list[str], env: dict[str, str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd} -> {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


@pytest.fixture
def real_server(tmp_path: Path):
    """A migrated server with an admin org, a granted data-owner org and a registered tiny model."""
    server = _script("modelowner-server")
    env = {
        **os.environ,
        "SCALEOT_DATA_DIR": str(tmp_path / "server-data"),
        "SCALEOT_DEVICE": "cpu",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "SCALEOT_EVAL_MAX_EXAMPLES": "8",
        "SCALEOT_EVAL_SEQ_LEN": "64",
    }
    for k in (
        "SCALEOT_API_KEY",
        "SCALEOT_SERVER_PUBKEY",
        "SCALEOT_DATABASE_URL",
        "SCALEOT_QUEUE_URL",
        "SCALEOT_DEFAULT_EVAL",
    ):
        env.pop(k, None)
    model_dir = save_tiny_model_dir(tmp_path / "tiny-llama", "llama", n_layers=4, hidden=32)
    admin_key = _run([*server, "create-org", "model-owner", "--role", "admin"], env, tmp_path).stdout.strip()
    owner_key = _run([*server, "create-org", "acme", "--role", "data-owner"], env, tmp_path).stdout.strip()
    model = json.loads(_run([*server, "register-model", "tiny", "--path", str(model_dir)], env, tmp_path).stdout)
    _run([*server, "grant", "acme", "tiny"], env, tmp_path)

    with ServeProcess(
        env, tmp_path / "server.log", command=server, args=("--log-level", "warning"), cwd=tmp_path
    ) as srv:
        yield {
            "base": srv.url,
            "admin_key": admin_key,
            "owner_key": owner_key,
            "model_id": model["id"],
            "log": srv.log,
        }


def test_tune_round_trip_against_the_real_server(real_server, tmp_path):
    base = real_server["base"]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TRAIN_TEXT * 2)
    with httpx.Client(
        base_url=base, headers={"Authorization": f"Bearer {real_server['admin_key']}"}, timeout=60
    ) as admin:
        r = admin.post(f"/v1/models/{real_server['model_id']}/importance", json={"steps": 2, "corpus": str(corpus)})
        assert r.status_code == 202, r.text
        wait_job(admin, r.json()["id"], succeeded=True)
    with httpx.Client(
        base_url=base, headers={"Authorization": f"Bearer {real_server['owner_key']}"}, timeout=60
    ) as owner:
        r = owner.post(
            "/v1/emulators", json={"model_id": real_server["model_id"], "n_adapter": 2, "alpha": 0.5, "beta": 0.5}
        )
        assert r.status_code in (200, 202), r.text
        created = r.json()
        if created.get("job"):
            wait_job(owner, created["job"]["id"], succeeded=True)
        emulator_id = created["emulator"]["id"]
        # The model owner tells the data owner its key fingerprint out of band; here we read it.
        kid = owner.get("/v1/signing-keys").json()["keys"][0]["key_id"]

    train = tmp_path / "train.txt"
    train.write_text(TRAIN_TEXT)
    evalf = tmp_path / "eval.jsonl"
    evalf.write_text(
        "".join(
            json.dumps({"prompt": f"The cat sat on the mat number {i}.", "completion": " The dog ran to the park."})
            + "\n"
            for i in range(4)
        )
    )
    env = {
        **os.environ,
        "SCALEOT_API_KEY": real_server["owner_key"],
        "SCALEOT_SERVER_PUBKEY": kid,
        "SCALEOT_CLIENT_CACHE": str(tmp_path / "client-cache"),
        "HF_HUB_OFFLINE": "1",
    }
    # This server has no default evaluation file: without --eval-data the client says so before training.
    never = tmp_path / "never"
    r = CliRunner().invoke(
        app,
        [
            "tune",
            "--emulator-url",
            f"{base}/v1/emulators/{emulator_id}",
            "--data",
            str(train),
            "--device",
            "cpu",
            "--out",
            str(never),
        ],
        env=env,
    )
    assert r.exit_code == 2 and "--eval-data" in r.stderr and "no default evaluation file" in r.stderr, r.output
    assert not never.exists()
    out = tmp_path / "adapter"
    r = subprocess.run(
        [
            *_script("dataowner-client"),
            "tune",
            "--emulator-url",
            f"{base}/v1/emulators/{emulator_id}",
            "--data",
            str(train),
            "--eval-data",
            str(evalf),
            "--max-steps",
            "3",
            "--batch-size",
            "2",
            "--seq-len",
            "64",
            "--lr",
            "5e-3",
            "--device",
            "cpu",
            "--out",
            str(out),
            "--json",
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}\n--- server log ---\n{real_server['log'].read_text()[-4000:]}"
    doc = json.loads(r.stdout)
    assert doc["adapter"]["status"] == "evaluated" and doc["job"]["status"] == "succeeded"
    metrics = doc["metrics"]
    for stage in ("emulator_zero_shot", "emulator_fine_tuned", "zero_shot", "plug_in"):
        assert metrics[stage] and metrics[stage]["completion_loss"] > 0, (stage, metrics)
    assert doc["adapter"]["client_metrics"]["emulator_fine_tuned"] == pytest.approx(metrics["emulator_fine_tuned"])
    assert (out / "adapter_layers.safetensors").is_file() and (out / "scaleot_adapter.json").is_file()
    # The human-readable status of the same adapter (in-process: a second interpreter start costs seconds).
    s = CliRunner().invoke(
        app, ["status", f"{base}/v1/adapters/{doc['adapter']['id']}"], env={"SCALEOT_API_KEY": real_server["owner_key"]}
    )
    assert s.exit_code == 0 and "plug-in" in s.stdout and "evaluated" in s.stdout, s.output
