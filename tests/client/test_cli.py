"""CLI contract: exit codes, bad data files, server/network errors, upload and status subcommands."""

from __future__ import annotations

import json
import socket

import pytest
import torch
from safetensors.torch import load_file, save_file

from data_owner_client.cli import app
from data_owner_client.errors import ExitCode

TUNE_FAST = ["--max-steps", "2", "--batch-size", "2", "--seq-len", "32"]


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1/emulators/emu_x"


def test_help_documents_exit_codes(runner):
    for args in (["--help"], ["tune", "--help"], ["upload", "--help"]):
        r = runner.invoke(app, args)
        assert r.exit_code == 0
        text = " ".join(r.output.split())
        assert "Exit codes" in text and "3 verification failure" in text and "5 the server's evaluation failed" in text


BAD_FILES = {
    "empty.txt": ("", "empty", None),
    "bad.jsonl": ('{"text": "ok"}\n{"text": "unterminated\n', "invalid JSON", 2),
    "keys.jsonl": ('{"body": "x"}\n', "expected a JSON object", 1),
    "mixed.jsonl": ('{"text": "a"}\n{"prompt": "p", "completion": "c"}\n', "same form", 2),
    "mc.jsonl": ('{"question": "q", "choices": ["a", "b"], "answer": 0}\n'
                 '{"question": "q", "choices": ["a", "b"], "answer": 5}\n', "out of range", 2),
    "blank.jsonl": ("\n\n", "no records", None),
    "data.csv": ("a,b\n", "unsupported file type", None),
    "latin1.txt": (b"caf\xe9\n", "UTF-8", 1),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
@pytest.mark.parametrize("flag", ["--data", "--eval-data"])
def test_bad_data_file_is_reported_with_file_and_line(runner, tmp_path, train_file, name, flag):
    content, message, line = BAD_FILES[name]
    bad = tmp_path / name
    bad.write_bytes(content if isinstance(content, bytes) else content.encode())
    args = ["--data", str(bad)] if flag == "--data" else ["--data", str(train_file), "--eval-data", str(bad)]
    # The server is unreachable: data problems must be reported before any network traffic.
    r = runner.invoke(app, ["tune", "--emulator-url", _closed_port_url(), *args, "--server-pubkey", "0" * 16])
    assert r.exit_code == ExitCode.BAD_INPUT, r.output
    assert str(bad) in r.stderr and message in r.stderr
    if line is not None:
        assert f"line {line}:" in r.stderr


def test_missing_data_file(runner, tmp_path):
    r = runner.invoke(app, ["tune", "--emulator-url", _closed_port_url(), "--data", str(tmp_path / "nope.jsonl")])
    assert r.exit_code == ExitCode.BAD_INPUT and "not found" in r.stderr


def test_usage_errors_exit_2(runner, train_file):
    assert runner.invoke(app, ["tune", "--data", str(train_file)]).exit_code == 2  # missing --emulator-url
    r = runner.invoke(app, ["tune", "--emulator-url", "http://host/not-an-emulator", "--data", str(train_file)])
    assert r.exit_code == 2 and "not an emulator URL" in r.stderr
    r = runner.invoke(app, ["tune", "--emulator-url", _closed_port_url(), "--data", str(train_file),
                            "--device", "cuda"], env={"CUDA_VISIBLE_DEVICES": ""})
    assert r.exit_code == 2 and "CUDA" in r.stderr
    r = runner.invoke(app, ["tune", "--emulator-url", _closed_port_url(), "--data", str(train_file),
                            "--batch-size", "0"])
    assert r.exit_code == 2


def test_network_and_server_errors_exit_4(runner, fake, client_env, train_file, monkeypatch):
    r = runner.invoke(app, ["download", "--emulator-url", _closed_port_url()])
    assert r.exit_code == ExitCode.SERVER and "cannot GET" in r.stderr
    r = runner.invoke(app, ["download", "--emulator-url", fake.emulator_url.replace("emu_test", "emu_missing")])
    assert r.exit_code == ExitCode.SERVER and "404 not_found" in r.stderr
    monkeypatch.setenv("SCALEOT_API_KEY", "wrong")
    r = runner.invoke(app, ["download", "--emulator-url", fake.emulator_url])
    assert r.exit_code == ExitCode.SERVER and "401" in r.stderr and "SCALEOT_API_KEY" in r.stderr


@pytest.mark.parametrize("method", ["full", "lora"])
def test_tune_prints_side_by_side_table(runner, fake, client_env, train_file, eval_file, tmp_path, method):
    r = runner.invoke(app, ["tune", "--emulator-url", fake.emulator_url, "--data", str(train_file), "--eval-data",
                            str(eval_file), "--method", method, *TUNE_FAST, "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    header = r.stdout.splitlines()[1]
    for column in ("emulator zero-shot", "emulator fine-tuned", "full zero-shot", "plug-in"):
        assert column in header
    assert "perplexity" in r.stdout
    cfg = json.loads((tmp_path / "o" / "adapter_config.json").read_text())
    assert cfg["emulator_id"] == "emu_test" and cfg["method"] == method and cfg["adapter_layers"] == [0, 3]
    assert fake.state.uploads[0]["adapter_config"]["method"] == method


def test_server_evaluation_failure_exits_5(runner, fake, client_env, train_file, tmp_path):
    fake.state.fail_evaluation = True
    r = runner.invoke(app, ["tune", "--emulator-url", fake.emulator_url, "--data", str(train_file), *TUNE_FAST,
                            "--out", str(tmp_path / "o"), "--json"])
    assert r.exit_code == ExitCode.EVALUATION_FAILED, r.output
    assert "simulated evaluation failure" in r.stderr
    assert json.loads(r.stdout)["adapter"]["status"] == "failed"


def test_upload_and_status_subcommands(runner, fake, client_env, train_file, eval_file, tmp_path):
    out = tmp_path / "o"
    r = runner.invoke(app, ["tune", "--emulator-url", fake.emulator_url, "--data", str(train_file), "--eval-data",
                            str(eval_file), *TUNE_FAST, "--out", str(out), "--no-upload"])
    assert r.exit_code == 0 and not fake.state.uploads, r.output
    r = runner.invoke(app, ["upload", "--emulator-url", fake.emulator_url, "--adapter", str(out), "--eval-data",
                            str(eval_file), "--no-wait", "--json"])
    assert r.exit_code == 0, r.output
    adapter_id = json.loads(r.stdout)["adapter"]["id"]
    assert fake.state.uploads[0]["metrics"]["emulator_fine_tuned"]  # taken from adapter_config.json
    r = runner.invoke(app, ["status", adapter_id, "--server", fake.url, "--wait", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["adapter"]["evaluation"]["plug_in"]["perplexity"] > 0
    r = runner.invoke(app, ["status", f"{fake.url}/v1/adapters/{adapter_id}"])
    assert r.exit_code == 0 and "plug-in" in r.stdout
    r = runner.invoke(app, ["status", "nope", "--server", fake.url])
    assert r.exit_code == ExitCode.SERVER


def test_upload_refuses_an_adapter_that_does_not_match_the_spec(runner, fake, client_env, train_file, tmp_path):
    out = tmp_path / "o"
    r = runner.invoke(app, ["tune", "--emulator-url", fake.emulator_url, "--data", str(train_file), *TUNE_FAST,
                            "--out", str(out), "--no-upload"])
    assert r.exit_code == 0, r.output
    tensors = load_file(out / "adapter_model.safetensors")
    tensors["model.norm.weight"] = torch.zeros(32)  # smuggling a non-adapter tensor
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, bad)
    r = runner.invoke(app, ["upload", "--emulator-url", fake.emulator_url, "--adapter", str(bad)])
    assert r.exit_code == ExitCode.BAD_INPUT and "unexpected" in r.stderr
    assert not fake.state.uploads
