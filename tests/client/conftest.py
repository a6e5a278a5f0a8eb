"""Fixtures for the data-owner client tests: a tiny signed emulator served by an in-process fake server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from shared.signing import key_id, public_key_to_b64

from .fake_server import API_KEY, FakeServer, FakeState, build_tiny_emulator

EMULATOR_ID = "emu_test"
MODEL_ID = "model_test"

# A few KB of repetitive English: enough structure that a tiny byte-level model's loss drops fast.
TRAIN_TEXT = "".join(f"The cat sat on the mat number {i % 7}. The dog ran to the park. " for i in range(60))


@pytest.fixture(scope="session")
def emulator_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("emulator") / "emulator.safetensors"
    return path, build_tiny_emulator(path, EMULATOR_ID, MODEL_ID)


@pytest.fixture
def fake(emulator_build: tuple[Path, dict]):
    path, built = emulator_build
    with FakeServer(FakeState(path, EMULATOR_ID, MODEL_ID, built)) as server:
        yield server


@pytest.fixture(autouse=True)
def _hermetic_client_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reads or writes the real ~/.cache/scaleot (key records, downloads) or inherits key-safety switches."""
    monkeypatch.setenv("SCALEOT_CLIENT_CACHE", str(tmp_path / "cache"))
    for name in ("SCALEOT_API_KEY_FILE", "SCALEOT_INSECURE", "SCALEOT_ALLOW_NEW_HOST"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def client_env(tmp_path: Path, fake: FakeServer, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Environment of a correctly configured data owner: API key, pinned server key, private cache."""
    env = {
        "SCALEOT_API_KEY": API_KEY,
        "SCALEOT_SERVER_PUBKEY": public_key_to_b64(fake.state.key.public_key()),
        "SCALEOT_CLIENT_CACHE": str(tmp_path / "cache"),
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("SCALEOT_SERVER_URL", raising=False)
    return env


@pytest.fixture
def pinned_key_id(fake: FakeServer) -> str:
    return key_id(fake.state.key.public_key())


@pytest.fixture
def train_file(tmp_path: Path) -> Path:
    p = tmp_path / "train.txt"
    p.write_text(TRAIN_TEXT)
    return p


@pytest.fixture
def eval_file(tmp_path: Path) -> Path:
    p = tmp_path / "eval.jsonl"
    p.write_text(
        "".join(
            json.dumps({"text": f"The cat sat on the mat number {i}. The dog ran to the park."}) + "\n"
            for i in range(4)
        )
    )
    return p


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()
