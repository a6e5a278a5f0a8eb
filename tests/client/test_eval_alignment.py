"""The client's side of one measurement: it scores the emulator within the server's caps (upload-info), and its
table never puts side by side columns that counted different tokens."""

from __future__ import annotations

from typing import Any

from data_owner_client.cmd_tune import _server_eval_settings
from data_owner_client.output import comparison_table
from data_owner_client.transfer import EmulatorRef
from shared.eval_settings import EvalSettings, measurements, resolve_eval_settings

REF = EmulatorRef(server="http://127.0.0.1:1", emulator_id="emu_x")


class _Info:
    def __init__(self, info: dict[str, Any] | None):
        self.info = info

    def upload_info(self, emulator_id: str) -> dict[str, Any] | None:
        assert emulator_id == "emu_x"
        return self.info


CAPS = {"seq_len": 256, "max_examples": 64, "max_seq_len": 512, "max_examples_cap": 64}


def test_the_client_scores_within_the_servers_caps(capsys):
    assert _server_eval_settings(_Info({"eval_settings": CAPS}), REF, 128, 32) == (128, 32)  # within: kept
    assert _server_eval_settings(_Info({"eval_settings": CAPS}), REF, 1024, None) == (512, 64)
    err = capsys.readouterr().err
    assert "seq_len 512, the server's cap" in err and "at most 64 examples" in err
    assert _server_eval_settings(_Info({"eval_settings": CAPS}), REF, 128, 100) == (128, 64)
    # An older server says nothing: the client's own settings stay (its table then says the server did not report).
    assert _server_eval_settings(_Info(None), REF, 1024, None) == (1024, None)
    assert _server_eval_settings(_Info({"eval_data_required": False}), REF, 128, 8) == (128, 8)


def test_columns_that_counted_different_tokens_are_never_side_by_side():
    cols = {
        "emulator zero-shot": {"perplexity": 30.0, "tokens": 8128},
        "emulator fine-tuned": {"perplexity": 20.0, "tokens": 8128},
        "full zero-shot": {"perplexity": 16.7, "tokens": 16320},
        "plug-in": {"perplexity": 15.0, "tokens": 16320},
    }
    text = comparison_table(cols)
    note, first, second = text.split("\n\n")
    assert note.startswith("not one measurement") and "8,128 tokens" in note and "16,320 tokens" in note
    assert "emulator fine-tuned" in first and "full zero-shot" not in first
    assert "plug-in" in second and "emulator" not in second
    same = {k: {**v, "tokens": 100} for k, v in cols.items()}
    one = comparison_table(same)
    assert "not one measurement" not in one and all(name in one.splitlines()[0] for name in cols)


def test_multiple_choice_columns_compare_by_questions():
    cols = {"emulator zero-shot": {"accuracy": 0.5, "n": 64}, "plug-in": {"accuracy": 0.6, "n": 50}}
    assert measurements(cols) == [["emulator zero-shot"], ["plug-in"]]
    assert "64 questions" in comparison_table(cols)


def test_the_server_clamps_what_it_cannot_honour_and_says_which():
    default = EvalSettings(256, 64)
    assert resolve_eval_settings(None, default=default, max_seq_len=2048, max_examples=64) == (
        default,
        "server default",
        [],
    )
    used, source, notes = resolve_eval_settings(
        EvalSettings(4096, None), default=default, max_seq_len=2048, max_examples=64
    )
    assert (used, source) == (EvalSettings(2048, 64), "client") and len(notes) == 2


def test_tune_against_an_older_server_prints_two_measurements_apart(
    runner, fake, client_env, train_file, eval_file, tmp_path
):
    """The issue's case: the server scored its columns with its own seq_len (the fake's 64), the client with 32."""
    from data_owner_client.cli import app

    fake.state.honour_eval_settings = False
    args = ["tune", "--emulator-url", fake.emulator_url, "--data", str(train_file), "--eval-data", str(eval_file)]
    r = runner.invoke(app, [*args, "--max-steps", "1", "--batch-size", "2", "--seq-len", "32", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert "the server did not report its settings: an older server" in r.stdout
    assert "not one measurement, so not side by side" in r.stdout
    tables = [line for line in r.stdout.splitlines() if line.startswith("metric")]
    assert len(tables) == 2 and "plug-in" not in tables[0] and "emulator" not in tables[1]
