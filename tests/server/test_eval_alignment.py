"""One measurement per table: the client's emulator columns and the server's M / plug-in columns count the same
tokens, because the upload carries the client's evaluation settings and the server scores with them."""

from __future__ import annotations

import io
import json

import pytest
from server_helpers import auth
from sqlalchemy import func, select
from test_benchmark_eval import sign_in

from data_owner_client.output import columns, comparison_table, measurement_caption
from data_owner_client.train import TrainConfig, resolve_device
from data_owner_client.tune import tune_emulator
from model_owner_server.models import AdapterRow, Evaluation
from shared import schemas
from shared.data import load_dataset
from shared.emulator_file import load_emulator
from shared.eval_settings import counted

pytestmark = pytest.mark.db
EVAL_SEQ_LEN, EVAL_MAX = 16, 3  # the world's server defaults are 32 and 4: a different measurement


@pytest.fixture(scope="module")
def tuned(world, files, tmp_path_factory):
    """What `dataowner-client tune --seq-len 16 --eval-max-examples 3` produces on the world's emulator."""
    root = tmp_path_factory.mktemp("tuned")
    (root / "emulator.safetensors").write_bytes(world.emulator_bytes)
    emu = load_emulator(root / "emulator.safetensors")
    cfg = TrainConfig(max_steps=1, batch_size=2, seq_len=EVAL_SEQ_LEN, save_every=100)
    return tune_emulator(
        emu.model,
        emu.tokenizer,
        emu.plan,
        load_dataset(files["corpus"]),
        cfg,
        resolve_device("cpu"),
        root / "adapter",
        eval_data=load_dataset(files["eval"]),
        eval_max_examples=EVAL_MAX,
        progress=False,
    )


def _upload(world, tuned, files, metrics: dict | None) -> dict:
    parts = {
        "adapter": ("adapter.safetensors", io.BytesIO(tuned.adapter_file.read_bytes())),
        "eval_data": ("eval.txt", io.BytesIO(files["eval"].read_bytes())),
    }
    data = {"metrics": json.dumps(metrics)} if metrics is not None else {}
    r = world.client.post(
        f"/v1/emulators/{world.emulator['id']}/adapters", headers=auth(world.keys["alice"]), files=parts, data=data
    )
    assert r.status_code == 202, r.text
    return world.client.get(f"/v1/adapters/{r.json()['adapter']['id']}", headers=auth(world.keys["alice"])).json()


def test_the_four_columns_of_one_table_count_the_same_tokens(world, tuned, files):
    assert tuned.metrics["eval_settings"] == {"seq_len": EVAL_SEQ_LEN, "max_examples": EVAL_MAX}
    adapter = schemas.Adapter.model_validate(_upload(world, tuned, files, tuned.metrics))
    assert adapter.status == "evaluated"
    assert adapter.evaluation.settings == {"seq_len": EVAL_SEQ_LEN, "max_examples": EVAL_MAX, "source": "client"}
    table = columns(tuned.metrics, adapter)
    counts = {name: counted(m) for name, m in table.items()}
    assert set(counts) == {"emulator zero-shot", "emulator fine-tuned", "full zero-shot", "plug-in"}
    assert set(counts.values()) == {EVAL_MAX * (EVAL_SEQ_LEN - 1)}, counts  # 3 blocks of 16: 45 predicted tokens
    text = comparison_table(table)
    header = text.splitlines()[0]
    assert "not one measurement" not in text and all(name in header for name in table)  # one table
    caption = measurement_caption(tuned.metrics, adapter)
    assert "seq_len 16, max_examples 3 (this client's, used by the server too)" in caption
    assert "every column scored 45 tokens" in caption


def test_an_upload_without_settings_is_scored_with_the_servers_and_the_table_says_so(world, tuned, files):
    """An older client: no eval_settings. The server uses its defaults, records that, and the client's table puts
    the two measurements apart instead of side by side."""
    old = {k: v for k, v in tuned.metrics.items() if k != "eval_settings"}
    adapter = schemas.Adapter.model_validate(_upload(world, tuned, files, old))
    assert adapter.evaluation.settings == {"seq_len": 32, "max_examples": 4, "source": "server default"}
    text = comparison_table(columns(old, adapter))
    assert text.startswith("not one measurement") and "45 tokens" in text and "124 tokens" in text
    first, second = text.split("\n\n")[1:]
    assert "emulator zero-shot" in first and "plug-in" not in first and "plug-in" in second
    assert "the server's (seq_len 32, max_examples 4); the upload carried none" in measurement_caption(old, adapter)
    # The console's adapter page does the same: two tables and the note, no chart across measurements.
    world.client.cookies.clear()
    sign_in(world.client, world.keys["alice"])
    page = world.client.get(f"/console/adapters/{adapter.id}").text
    world.client.cookies.clear()
    assert 'id="not-one-measurement"' in page and page.count('class="evaluation"') == 2 and "<svg" not in page
    assert "the server&#39;s defaults (the upload carried no settings)" in page


def test_settings_beyond_the_servers_caps_are_clamped_with_a_note(world, tuned, files, monkeypatch):
    monkeypatch.setattr(world.settings, "eval_max_seq_len", 24)
    asked = {**tuned.metrics, "eval_settings": {"seq_len": 64, "max_examples": None}}
    adapter = _upload(world, tuned, files, asked)
    settings = adapter["evaluation"]["settings"]
    assert (settings["seq_len"], settings["max_examples"], settings["source"]) == (24, 4, "client")
    assert any("SCALEOT_EVAL_MAX_SEQ_LEN" in n for n in settings["notes"])
    assert any("SCALEOT_EVAL_MAX_EXAMPLES" in n for n in settings["notes"])
    assert adapter["evaluation"]["zero_shot"]["tokens"] == 4 * 23


@pytest.mark.parametrize(
    "bad",
    [{"seq_len": 1, "max_examples": 3}, {"seq_len": "16"}, {"seq_len": 16, "max_examples": 0}, [16, 3], True],
)
def test_malformed_settings_are_refused_and_nothing_is_stored(world, tuned, files, bad):
    with world.sessions() as s:
        before = (s.scalar(select(func.count()).select_from(AdapterRow)), s.scalar(select(func.count(Evaluation.id))))
    r = world.client.post(
        f"/v1/emulators/{world.emulator['id']}/adapters",
        headers=auth(world.keys["alice"]),
        files={"adapter": ("adapter.safetensors", io.BytesIO(tuned.adapter_file.read_bytes()))},
        data={"metrics": json.dumps({"eval_settings": bad})},
    )
    assert r.status_code == 422 and "eval_settings" in r.json()["error"]["message"], r.text
    with world.sessions() as s:
        after = (s.scalar(select(func.count()).select_from(AdapterRow)), s.scalar(select(func.count(Evaluation.id))))
    assert after == before


def test_upload_info_tells_the_client_the_servers_settings_and_caps(world):
    r = world.client.get(f"/v1/emulators/{world.emulator['id']}/upload-info", headers=auth(world.keys["alice"]))
    assert r.json()["eval_settings"] == {"seq_len": 32, "max_examples": 4, "max_seq_len": 2048, "max_examples_cap": 4}
