"""Chat (`messages`) evaluation files on the server: the plug-in evaluation scores the assistant tokens exactly
as the client's shared code does; a bad chat file, or one for a model without a chat template, is refused at
upload with the file's line and the fix, and nothing is stored."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from server_helpers import World, adapter_bytes, auth, data_dir_listing, fast_settings

from model_owner_server import crud
from model_owner_server.main import create_app
from model_owner_server.scaleot.model_io import load_causal_lm
from shared.data import NO_CHAT_TEMPLATE, load_dataset
from shared.evaluation import evaluate

SEQ_LEN = 512  # byte tokens: a short conversation is a few hundred

CHAT = [
    {"role": "system", "content": "Answer with one word."},
    {"role": "user", "content": "Athens is to Greece as Rome is to what?"},
    {"role": "assistant", "content": "Italy"},
    {"role": "user", "content": "Paris is to France as Oslo is to what?"},
    {"role": "assistant", "content": "Norway"},
]


@dataclass
class ChatWorld(World):
    model_dir: Path = Path()


def _jsonl(*conversations) -> bytes:
    return b"".join(json.dumps({"messages": c}).encode() + b"\n" for c in conversations)


@pytest.fixture(scope="module")
def chat_world(tmp_path_factory, new_database_url) -> Iterator[ChatWorld]:
    """A server with one tiny model whose tokenizer has a chat template, its emulator, and alice (granted)."""
    from scaleot_samples.tiny import save_tiny_model_dir
    from shared.adapter import extract_adapter
    from shared.emulator_file import load_emulator

    root = tmp_path_factory.mktemp("chat")
    model_dir = save_tiny_model_dir(root / "tiny-chat", "llama", n_layers=4, hidden=32, chat_template=True)
    corpus = root / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    settings = fast_settings(root / "data", new_database_url(), eval_seq_len=SEQ_LEN)
    with TestClient(create_app(settings)) as client:
        w = ChatWorld(client, settings, {}, model_dir=model_dir)
        with w.sessions() as s:
            for name, role in (("admin", "admin"), ("alice", "data-owner")):
                org, key = crud.create_org(s, name, role)
                w.keys[name], w.org_ids[name] = key, org.id
            s.commit()
        h = auth(w.keys["admin"])
        r = client.post("/v1/models", headers=h, json={"name": "tiny-chat", "path": str(model_dir)})
        assert r.status_code == 201, r.text
        w.model_id = r.json()["id"]
        assert client.post(f"/v1/models/{w.model_id}/grants", headers=h, json={"org": "alice"}).status_code == 201
        r = client.post(
            f"/v1/models/{w.model_id}/importance",
            headers=h,
            json={"steps": 2, "corpus": str(corpus), "warmup_steps": 1, "rl_interval": 2},
        )
        assert r.status_code == 202, r.text
        assert client.get(f"/v1/jobs/{r.json()['id']}", headers=h).json()["status"] == "succeeded"
        r = client.post(
            "/v1/emulators",
            headers=auth(w.keys["alice"]),
            json={"model_id": w.model_id, "n_adapter": 2, "alpha": 0.5, "beta": 0.5},
        )
        assert r.status_code in (200, 202), r.text
        w.emulator = r.json()["emulator"]
        assert w.emulator["status"] == "ready", r.json()
        emu_file = root / "emulator.safetensors"
        emu_file.write_bytes(
            client.get(f"/v1/emulators/{w.emulator['id']}/file", headers=auth(w.keys["alice"])).content
        )
        loaded = load_emulator(emu_file)
        assert loaded.tokenizer.chat_template  # the emulator carries M's chat template to the data owner
        w.adapter_tensors = extract_adapter(loaded.model, loaded.plan.adapter_layers)
        yield w


def _upload(w: World, eval_name: str, eval_bytes: bytes):
    return w.client.post(
        f"/v1/emulators/{w.emulator['id']}/adapters",
        headers=auth(w.keys["alice"]),
        files={
            "adapter": ("adapter.safetensors", io.BytesIO(adapter_bytes(w.adapter_tensors))),
            "eval_data": (eval_name, io.BytesIO(eval_bytes)),
        },
    )


def _snapshot(w: World):
    with w.sessions() as s:
        return crud.row_counts(s), data_dir_listing(w.settings.resolved_data_dir)


def test_plug_in_evaluation_scores_the_assistant_tokens_as_the_client_does(chat_world, tmp_path):
    w = chat_world
    data = _jsonl(CHAT, CHAT[1:3])
    r = _upload(w, "chat.jsonl", data)
    assert r.status_code == 202, r.text
    adapter = w.client.get(f"/v1/adapters/{r.json()['adapter']['id']}", headers=auth(w.keys["alice"])).json()
    assert adapter["status"] == "evaluated", adapter
    zero, plug = adapter["evaluation"]["zero_shot"], adapter["evaluation"]["plug_in"]
    # the emulator's own adapter layers came back unchanged, so M' == M: both score the same
    assert zero["assistant_loss"] == pytest.approx(plug["assistant_loss"])
    # the same number the shared code gives on the full model (the client's emulator evaluation runs it too)
    local = tmp_path / "chat.jsonl"
    local.write_bytes(data)
    model, tok = load_causal_lm(w.model_dir)
    expected = evaluate(model, tok, load_dataset(local), seq_len=SEQ_LEN, max_examples=w.settings.eval_max_examples)
    assert set(zero) >= {"assistant_loss", "perplexity", "tokens"} and "completion_loss" not in zero
    assert zero["tokens"] == expected["tokens"] == len("Italy") + 2 + len("Norway") + 2 + len("Italy") + 2
    assert zero["assistant_loss"] == pytest.approx(expected["assistant_loss"], rel=1e-4)


BAD_CHATS = {
    "missing role": (
        [{"content": "hi"}, {"role": "assistant", "content": "yo"}],
        'message 1 has no "role"; add "role": "system", "user" or "assistant"',
    ),
    "empty assistant turn": (
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}],
        "message 2 is an empty assistant turn; give it the reply's text or remove the message",
    ),
    "no assistant turn": ([{"role": "user", "content": "hi"}], "the conversation has no assistant turn"),
}


@pytest.mark.parametrize("case", list(BAD_CHATS))
def test_a_bad_chat_file_is_refused_with_its_line_and_nothing_is_stored(chat_world, case):
    messages, fix = BAD_CHATS[case]
    before = _snapshot(chat_world)
    r = _upload(chat_world, "mine.jsonl", _jsonl(CHAT, messages))
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_eval_data"
    assert err["message"].startswith("mine.jsonl line 2: ") and fix in err["message"], err
    assert str(chat_world.settings.resolved_data_dir) not in err["message"]  # no server path in the answer
    assert _snapshot(chat_world) == before


def test_a_chat_file_for_a_model_without_chat_template_is_refused_at_upload(world):
    # The shared world's tiny model has a plain byte tokenizer: no chat template.
    with world.sessions() as s:
        before = crud.row_counts(s), data_dir_listing(world.settings.resolved_data_dir)
    r = _upload(world, "mine.jsonl", _jsonl(CHAT))
    assert r.status_code == 422, r.text
    assert r.json()["error"] == {"code": "invalid_eval_data", "message": f"mine.jsonl: {NO_CHAT_TEMPLATE}"}
    with world.sessions() as s:
        assert (crud.row_counts(s), data_dir_listing(world.settings.resolved_data_dir)) == before
