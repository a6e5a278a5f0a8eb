"""`dataowner-client tune` on chat (`messages`) data, against the in-process fake server: trained and scored on the
assistant turns with the emulator's chat template; a bad chat file, or a model without a chat template, stops
the command with the file, the line and the fix, and nothing is uploaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_owner_client.cli import app
from shared.data import NO_CHAT_TEMPLATE
from shared.signing import public_key_to_b64

from .conftest import EMULATOR_ID, MODEL_ID
from .fake_server import API_KEY, FakeServer, FakeState, build_tiny_emulator


def _conversation(i: int) -> dict:
    return {
        "messages": [
            {"role": "system", "content": "Reply with the number."},
            {"role": "user", "content": f"What comes after {i}?"},
            {"role": "assistant", "content": str(i + 1)},
            {"role": "user", "content": f"And after {i + 1}?"},
            {"role": "assistant", "content": str(i + 2)},
        ]
    }


def _write(path: Path, *records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def chat_emulator(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("chat-emulator") / "emulator.safetensors"
    return path, build_tiny_emulator(path, EMULATOR_ID, MODEL_ID, chat_template=True)


@pytest.fixture
def chat_fake(chat_emulator, tmp_path, monkeypatch):
    path, built = chat_emulator
    with FakeServer(FakeState(path, EMULATOR_ID, MODEL_ID, built, chat_template=True)) as server:
        monkeypatch.setenv("SCALEOT_API_KEY", API_KEY)
        monkeypatch.setenv("SCALEOT_SERVER_PUBKEY", public_key_to_b64(server.state.key.public_key()))
        monkeypatch.delenv("SCALEOT_SERVER_URL", raising=False)
        yield server


def _tune(runner, url: str, data: Path, eval_data: Path, out: Path, *extra: str):
    return runner.invoke(
        app,
        [
            "tune",
            "--emulator-url",
            url,
            "--data",
            str(data),
            "--eval-data",
            str(eval_data),
            "--max-steps",
            "2",
            "--batch-size",
            "2",
            "--seq-len",
            "256",
            "--out",
            str(out),
            *extra,
        ],
    )


def test_chat_tune_scores_the_assistant_turns_on_both_sides_and_uploads(runner, chat_fake, tmp_path):
    train = _write(tmp_path / "train.jsonl", *(_conversation(i) for i in range(6)))
    evalf = _write(tmp_path / "eval.jsonl", *(_conversation(i) for i in range(10, 13)))
    r = _tune(runner, chat_fake.emulator_url, train, evalf, tmp_path / "adapter", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["training"]["data_kind"] == "chat" and doc["training"]["examples"] == 6
    m = doc["metrics"]
    for stage in ("emulator_zero_shot", "emulator_fine_tuned", "zero_shot", "plug_in"):
        # 2 replies of 2 digits + EOS + newline, 3 conversations: the same assistant tokens on both sides
        assert set(m[stage]) == {"assistant_loss", "perplexity", "tokens"} and m[stage]["tokens"] == 24, stage
    [upload] = chat_fake.state.uploads
    assert upload["eval_filename"] == "eval.jsonl" and upload["eval_bytes"] == evalf.read_bytes()
    assert "assistant_loss" in upload["metrics"]["emulator_fine_tuned"]


def test_the_table_shows_the_assistant_loss(runner, chat_fake, tmp_path):
    train = _write(tmp_path / "train.jsonl", *(_conversation(i) for i in range(4)))
    r = _tune(runner, chat_fake.emulator_url, train, train, tmp_path / "adapter")
    assert r.exit_code == 0, r.output
    assert any(line.startswith("assistant_loss") for line in r.stdout.splitlines()), r.stdout


BAD = {
    "missing role": ({"content": "hi"}, 'message 2 has no "role"; add "role": "system", "user" or "assistant"'),
    "empty assistant turn": (
        {"role": "assistant", "content": " "},
        "message 2 is an empty assistant turn; give it the reply's text or remove the message",
    ),
    "no assistant turn": (None, "the conversation has no assistant turn"),
}


@pytest.mark.parametrize("which", ["--data", "--eval-data"])
@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_chat_file_stops_tune_before_anything_is_sent(runner, chat_fake, tmp_path, case, which):
    second, fix = BAD[case]
    messages = [{"role": "user", "content": "hi"}] + ([second] if second else [])
    good = _write(tmp_path / "good.jsonl", _conversation(1))
    bad = _write(tmp_path / "bad.jsonl", _conversation(0), {"messages": messages})
    data, evalf = (bad, good) if which == "--data" else (good, bad)
    r = _tune(runner, chat_fake.emulator_url, data, evalf, tmp_path / "adapter")
    assert r.exit_code == 2, r.output
    assert f"{bad} line 2: " in r.stderr and fix in r.stderr, r.stderr
    assert chat_fake.state.requests == [] and chat_fake.state.uploads == []  # not even the emulator was fetched


def test_chat_data_for_a_model_without_chat_template_names_the_fix_and_uploads_nothing(
    runner, fake: FakeServer, client_env, tmp_path
):
    data = _write(tmp_path / "chat.jsonl", _conversation(0))
    r = _tune(runner, fake.emulator_url, data, data, tmp_path / "adapter")
    assert r.exit_code == 2, r.output
    assert f"{data}: {NO_CHAT_TEMPLATE}" in r.stderr, r.stderr
    assert fake.state.uploads == []
