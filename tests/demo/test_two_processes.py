"""Server and client as separate processes with separate directories: the client needs only the emulator
URL, its API key and the pinned server key.

The model owner's side is the demo's own code (server process + create-org + REST); the client is started
with an environment built from nothing but those three strings (plus PATH/HOME), in a directory that shares
no file with the server. Without the pinned key, with a wrong one, or with a wrong API key it refuses.

Marked `db`: in the PostgreSQL pass (SCALEOT_TEST_DATABASE_URL) the server runs on PostgreSQL, as in
docker-compose.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from safetensors import safe_open

from .conftest import venv_tool

pytestmark = pytest.mark.db


def _client_env(home: Path, **scaleot: str) -> dict[str, str]:
    """From scratch, not a copy of ours: nothing of the server's configuration can leak in."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "LANG": "C.UTF-8",
    }
    env.update(scaleot)
    return env


def _client(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [venv_tool("dataowner-client"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def model_owner(demo, tmp_path_factory):
    """A running server (own data dir, SQLite or SCALEOT_TEST_DATABASE_URL) set up by the demo's model-owner code."""
    base = tmp_path_factory.mktemp("model-owner")
    cfg = demo.DemoConfig(
        tiny=True,
        steps=2,
        train_steps=2,
        n_adapter=2,
        alpha=0.5,
        beta=0.5,
        seq_len=32,
        batch_size=2,
        eval_max_examples=4,
        wiki_train_chars=20_000,
        model_name=f"tiny-{secrets.token_hex(4)}",
    )  # unique: the PostgreSQL database is shared
    demo.processes.TINY = True
    server_env = {
        "SCALEOT_EVAL_SEQ_LEN": "32",
        "SCALEOT_EVAL_MAX_EXAMPLES": "4",
        "SCALEOT_IMPORTANCE_SEQ_LEN": "32",
        "SCALEOT_IMPORTANCE_MAX_BLOCKS": "32",
    }
    if os.environ.get("SCALEOT_TEST_DATABASE_URL"):
        server_env["SCALEOT_DATABASE_URL"] = os.environ["SCALEOT_TEST_DATABASE_URL"]
    with demo.LocalServer(base / "server-data", base, 0, server_env) as server:
        owner = demo.model_owner_flow(
            cfg, server_url=server.url, cli_env=server.env, owner_dir=base, alive=server.check_alive
        )
        yield server, owner, cfg


@pytest.fixture(scope="module")
def client_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data-owner")
    (d / "home").mkdir()
    (d / "train.txt").write_text("To be, or not to be, that is the question.\n" * 60)
    (d / "eval.txt").write_text("All the world's a stage, and all the men and women merely players.\n" * 20)
    return d


def test_client_needs_only_url_key_and_pinned_server_key(model_owner, client_dir):
    server, owner, _cfg = model_owner
    inv = owner.invitation
    server_dir = server.data_dir.resolve()
    assert not client_dir.resolve().is_relative_to(server_dir.parent) and not server_dir.is_relative_to(client_dir)

    env = _client_env(
        client_dir / "home",
        SCALEOT_API_KEY=inv.api_key,
        SCALEOT_SERVER_PUBKEY=inv.server_pubkey,
        SCALEOT_CLIENT_CACHE=str(client_dir / "cache"),
    )
    proc = _client(
        [
            "tune",
            "--emulator-url",
            inv.emulator_url,
            "--data",
            "train.txt",
            "--eval-data",
            "eval.txt",
            "--max-steps",
            "2",
            "--batch-size",
            "2",
            "--seq-len",
            "32",
            "--eval-max-examples",
            "4",
            "--out",
            "adapter",
            "--json",
            "--no-progress",
        ],
        client_dir,
        env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    doc = json.loads(proc.stdout)
    assert doc["adapter"]["status"] == "evaluated"
    for k in ("emulator_zero_shot", "emulator_fine_tuned", "zero_shot", "plug_in"):
        assert doc["metrics"][k]["perplexity"] > 0, k

    # what went back is only the adapter layers' tensors
    layers = owner.emulator["adapter_layers"]
    with safe_open(str(client_dir / "adapter" / "adapter_layers.safetensors"), "pt") as f:
        names = list(f.keys())
    assert names and all(any(f".layers.{i}." in n for i in layers) for n in names), names

    # the client wrote only into its own directory; the server's directory got the upload
    assert not list(client_dir.rglob("*.db")) and not list(client_dir.rglob("*.pem"))
    assert any(server_dir.rglob("*.safetensors"))

    # and the model owner sees the same evaluation through its own API
    adapter_id = doc["adapter"]["id"]
    r = httpx.get(f"{server.url}/v1/adapters/{adapter_id}", headers={"Authorization": f"Bearer {inv.api_key}"})
    assert r.status_code == 200 and r.json()["evaluation"]["plug_in"]["perplexity"] > 0


def test_client_refuses_without_the_pinned_key(model_owner, client_dir):
    _, owner, _ = model_owner
    inv = owner.invitation
    base = {"SCALEOT_API_KEY": inv.api_key, "SCALEOT_CLIENT_CACHE": str(client_dir / "cache-unpinned")}
    proc = _client(
        ["download", "--emulator-url", inv.emulator_url], client_dir, _client_env(client_dir / "home", **base)
    )
    assert proc.returncode == 2, proc.stderr
    assert "SCALEOT_SERVER_PUBKEY" in proc.stderr


def test_client_refuses_a_wrong_server_key(model_owner, client_dir):
    _, owner, _ = model_owner
    inv = owner.invitation
    impostor = base64.b64encode(
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    ).decode()
    env = _client_env(
        client_dir / "home",
        SCALEOT_API_KEY=inv.api_key,
        SCALEOT_SERVER_PUBKEY=impostor,
        SCALEOT_CLIENT_CACHE=str(client_dir / "cache-impostor"),
    )
    proc = _client(["download", "--emulator-url", inv.emulator_url], client_dir, env)
    assert proc.returncode == 3, proc.stderr  # verification failure
    assert not list((client_dir / "cache-impostor").rglob("*.safetensors"))


def test_client_refuses_a_wrong_api_key(model_owner, client_dir):
    _, owner, _ = model_owner
    inv = owner.invitation
    env = _client_env(
        client_dir / "home",
        SCALEOT_API_KEY="sot_" + secrets.token_urlsafe(32),
        SCALEOT_SERVER_PUBKEY=inv.server_pubkey,
        SCALEOT_CLIENT_CACHE=str(client_dir / "cache-badkey"),
    )
    proc = _client(["download", "--emulator-url", inv.emulator_url], client_dir, env)
    assert proc.returncode == 4, proc.stderr  # the server said 401
    assert "401" in proc.stderr or "unauthor" in proc.stderr.lower()
