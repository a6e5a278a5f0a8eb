"""CLI contract: exit codes, bad data files, server/network errors, upload and status subcommands."""

from __future__ import annotations

import json
import shlex

import pytest
import torch
from safetensors.torch import load_file, save_file

from data_owner_client.cli import app
from data_owner_client.errors import ExitCode
from tooling.procs import free_port

from .fake_server import API_KEY

TUNE_FAST = ["--max-steps", "2", "--batch-size", "2", "--seq-len", "32"]


def _closed_port_url() -> str:
    return f"http://127.0.0.1:{free_port()}/v1/emulators/emu_x"


def test_help_documents_exit_codes(runner):
    for args in (["--help"], ["tune", "--help"], ["upload", "--help"]):
        r = runner.invoke(app, args)
        assert r.exit_code == 0
        text = " ".join(r.output.split())
        assert "Exit codes" in text and "3 verification failure" in text and "5 the server's evaluation failed" in text


@pytest.mark.parametrize("command", ["tune", "download", "verify", "upload", "status"])
def test_help_never_cuts_option_names_at_80_columns(runner, command):
    r = runner.invoke(app, [command, "--help"], env={"COLUMNS": "80", "TERMINAL_WIDTH": None})
    assert r.exit_code == 0, r.output
    assert "…" not in r.output
    click_command = typer_main_command().get_command(None, command)
    for param in click_command.params:
        for opt in [*param.opts, *param.secondary_opts]:
            if opt.startswith("--"):
                assert opt in r.output, f"{command} --help lacks {opt}"


def typer_main_command():
    import typer.main

    return typer.main.get_command(app)


BAD_FILES = {
    "empty.txt": ("", "empty", None),
    "bad.jsonl": ('{"text": "ok"}\n{"text": "unterminated\n', "invalid JSON", 2),
    "keys.jsonl": ('{"body": "x"}\n', "expected a JSON object", 1),
    "mixed.jsonl": ('{"text": "a"}\n{"prompt": "p", "completion": "c"}\n', "same form", 2),
    "mc.jsonl": (
        '{"question": "q", "choices": ["a", "b"], "answer": 0}\n'
        '{"question": "q", "choices": ["a", "b"], "answer": 5}\n',
        "out of range",
        2,
    ),
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
    r = runner.invoke(
        app,
        ["tune", "--emulator-url", _closed_port_url(), "--data", str(train_file), "--device", "cuda"],
        env={"CUDA_VISIBLE_DEVICES": ""},
    )
    assert r.exit_code == 2 and "CUDA" in r.stderr
    r = runner.invoke(
        app, ["tune", "--emulator-url", _closed_port_url(), "--data", str(train_file), "--batch-size", "0"]
    )
    assert r.exit_code == 2


def test_network_and_server_errors_exit_4(runner, fake, client_env, train_file, monkeypatch):
    r = runner.invoke(app, ["download", "--emulator-url", _closed_port_url()])
    assert r.exit_code == ExitCode.SERVER and "cannot GET" in r.stderr
    r = runner.invoke(app, ["download", "--emulator-url", fake.emulator_url.replace("emu_test", "emu_missing")])
    assert r.exit_code == ExitCode.SERVER and "404 not_found" in r.stderr
    monkeypatch.setenv("SCALEOT_API_KEY", "wrong")
    r = runner.invoke(app, ["download", "--emulator-url", fake.emulator_url])
    assert r.exit_code == ExitCode.SERVER and "401" in r.stderr and "SCALEOT_API_KEY" in r.stderr


def test_missing_api_key_says_ask_the_model_owner(runner, fake, client_env, monkeypatch):
    monkeypatch.delenv("SCALEOT_API_KEY")
    r = runner.invoke(app, ["download", "--emulator-url", fake.emulator_url, "--json"])
    assert r.exit_code == ExitCode.SERVER
    assert "Ask the model owner for an API key" in r.stderr and "SCALEOT_API_KEY" in r.stderr
    assert "--api-key" in r.stderr and "modelowner-server" not in r.stderr + r.stdout
    err = json.loads(r.stdout)["error"]
    assert err["code"] == "unauthorized" and err["http_status"] == 401 and err["exit_code"] == ExitCode.SERVER
    assert "Ask the model owner" in err["message"]


def test_json_failures_print_an_error_object_on_stdout(runner, fake, client_env, tmp_path):
    r = runner.invoke(
        app, ["tune", "--emulator-url", fake.emulator_url, "--data", str(tmp_path / "nope.txt"), "--json"]
    )
    assert r.exit_code == ExitCode.BAD_INPUT and "not found" in r.stderr
    err = json.loads(r.stdout)["error"]
    assert err["code"] == "bad_input" and err["exit_code"] == ExitCode.BAD_INPUT and "nope.txt" in err["message"]
    r = runner.invoke(app, ["download", "--emulator-url", _closed_port_url(), "--json"])
    assert r.exit_code == ExitCode.SERVER and json.loads(r.stdout)["error"]["code"] == "server_error"


def test_status_of_an_unknown_adapter_says_adapter(runner, fake, client_env):
    r = runner.invoke(app, ["status", "adp_0123456789abcdef", "--server", fake.url])
    assert r.exit_code == ExitCode.SERVER
    assert "adapter adp_0123456789abcdef not found" in r.stderr and "job" not in r.stderr.split("(")[0]
    assert "not visible to your organization" in r.stderr
    r = runner.invoke(app, ["status", f"{fake.url}/v1/adapters/ad_missing", "--json"])
    assert r.exit_code == ExitCode.SERVER and "adapter ad_missing not found" in r.stderr
    assert json.loads(r.stdout)["error"]["code"] == "not_found"
    r = runner.invoke(app, ["status", "whatever", "--server", fake.url])
    assert r.exit_code == ExitCode.SERVER and "adapter or job whatever not found" in r.stderr
    r = runner.invoke(app, ["status", "job_missing", "--server", fake.url])
    assert r.exit_code == ExitCode.SERVER and "job job_missing not found" in r.stderr


def test_tune_without_eval_data_fails_before_training_when_the_server_needs_it(
    runner, fake, client_env, train_file, tmp_path
):
    fake.state.default_eval = False
    out = tmp_path / "o"
    r = runner.invoke(
        app,
        [
            "tune",
            "--emulator-url",
            fake.emulator_url,
            "--data",
            str(train_file),
            *TUNE_FAST,
            "--out",
            str(out),
            "--json",
        ],
    )
    assert r.exit_code == ExitCode.BAD_INPUT, r.output
    assert "--eval-data" in r.stderr and "no default evaluation file" in r.stderr
    assert json.loads(r.stdout)["error"]["eval_data_required"] is True
    assert not out.exists() and not fake.state.uploads
    assert not any(path.endswith("/file") for _, path, _ in fake.state.requests), "the emulator was downloaded"


def test_upload_refused_for_lack_of_eval_data_names_the_command_to_retry(
    runner, fake, client_env, train_file, eval_file, tmp_path, monkeypatch
):
    """A server that cannot be asked beforehand (no upload-info): training runs, the upload is refused, and
    the error gives the exact `dataowner-client upload` command for the adapter already on disk."""
    fake.state.default_eval, fake.state.upload_info = False, False
    out = tmp_path / "o"
    r = runner.invoke(
        app,
        [
            "tune",
            "--emulator-url",
            fake.emulator_url,
            "--data",
            str(train_file),
            *TUNE_FAST,
            "--out",
            str(out),
            "--json",
        ],
    )
    assert r.exit_code == ExitCode.SERVER, r.output
    assert "no_eval_data" in r.stderr and (out / "adapter_layers.safetensors").is_file()
    err = json.loads(r.stdout)["error"]
    assert err["code"] == "no_eval_data" and err["upload_command"] in r.stderr
    argv = shlex.split(err["upload_command"])
    assert argv[:2] == ["dataowner-client", "upload"] and "EVAL_FILE" in argv
    argv[argv.index("EVAL_FILE")] = str(eval_file)
    monkeypatch.chdir(tmp_path.parent)  # the command does not depend on the directory it runs in
    r = runner.invoke(app, [*argv[1:], "--no-wait"])
    assert r.exit_code == 0, r.output
    assert fake.state.uploads[-1]["eval_filename"] == eval_file.name
    assert fake.state.requests[-1][2].get("authorization") == f"Bearer {API_KEY}"


@pytest.mark.parametrize("method", ["full", "lora"])
def test_tune_prints_side_by_side_table(runner, fake, client_env, train_file, eval_file, tmp_path, method):
    r = runner.invoke(
        app,
        [
            "tune",
            "--emulator-url",
            fake.emulator_url,
            "--data",
            str(train_file),
            "--eval-data",
            str(eval_file),
            "--method",
            method,
            *TUNE_FAST,
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert r.exit_code == 0, r.output
    assert "(this client's, used by the server too); every column scored" in r.stdout  # one measurement
    header = next(line for line in r.stdout.splitlines() if line.startswith("metric"))
    for column in ("emulator zero-shot", "emulator fine-tuned", "full zero-shot", "plug-in"):
        assert column in header
    assert "perplexity" in r.stdout
    cfg = json.loads((tmp_path / "o" / "scaleot_adapter.json").read_text())
    assert cfg["emulator_id"] == "emu_test" and cfg["method"] == method and cfg["adapter_layers"] == [0, 3]
    upload = fake.state.uploads[0]
    assert upload["adapter_config"]["method"] == method
    if method == "lora":  # PEFT's own files, the LoRA the emulator issued (signed manifest)
        assert upload["adapter_filename"] == "adapter_model.safetensors" and cfg["lora"] == fake.state.built["lora"]
        assert upload["adapter_config"]["peft"]["peft_type"] == "LORA"
    else:
        assert upload["adapter_filename"] == "adapter_layers.safetensors"


def test_upload_subcommand_sends_a_peft_lora_folder(runner, fake, client_env, train_file, eval_file, tmp_path):
    out = tmp_path / "o"
    r = runner.invoke(
        app,
        [
            "tune",
            "--emulator-url",
            fake.emulator_url,
            "--data",
            str(train_file),
            "--method",
            "lora",
            *TUNE_FAST,
            "--out",
            str(out),
            "--no-upload",
        ],
    )
    assert r.exit_code == 0, r.output
    r = runner.invoke(
        app,
        ["upload", "--emulator-url", fake.emulator_url, "--adapter", str(out), "--eval-data", str(eval_file), "--json"],
    )
    assert r.exit_code == 0, r.output
    upload = fake.state.uploads[0]
    assert upload["adapter_bytes"] == (out / "adapter_model.safetensors").read_bytes()
    assert upload["adapter_config"]["peft"] == json.loads((out / "adapter_config.json").read_text())
    assert json.loads(r.stdout)["adapter"]["evaluation"]["plug_in"]["perplexity"] > 0


def test_tune_refuses_lora_settings_the_emulator_did_not_issue(runner, fake, client_env, train_file, tmp_path):
    r = runner.invoke(
        app,
        [
            "tune",
            "--emulator-url",
            fake.emulator_url,
            "--data",
            str(train_file),
            "--method",
            "lora",
            "--lora-r",
            "4",
            *TUNE_FAST,
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert r.exit_code == ExitCode.BAD_INPUT and "--lora-r 8" in r.stderr, r.output
    assert not fake.state.uploads


def test_server_evaluation_failure_exits_5(runner, fake, client_env, train_file, tmp_path):
    fake.state.fail_evaluation = True
    r = runner.invoke(
        app,
        [
            "tune",
            "--emulator-url",
            fake.emulator_url,
            "--data",
            str(train_file),
            *TUNE_FAST,
            "--out",
            str(tmp_path / "o"),
            "--json",
        ],
    )
    assert r.exit_code == ExitCode.EVALUATION_FAILED, r.output
    assert "simulated evaluation failure" in r.stderr
    doc = json.loads(r.stdout)
    assert doc["adapter"]["status"] == "failed"
    assert doc["error"]["code"] == "evaluation_failed" and doc["error"]["exit_code"] == ExitCode.EVALUATION_FAILED


def test_upload_and_status_subcommands(runner, fake, client_env, train_file, eval_file, tmp_path):
    out = tmp_path / "o"
    r = runner.invoke(
        app,
        [
            "tune",
            "--emulator-url",
            fake.emulator_url,
            "--data",
            str(train_file),
            "--eval-data",
            str(eval_file),
            *TUNE_FAST,
            "--out",
            str(out),
            "--no-upload",
        ],
    )
    assert r.exit_code == 0 and not fake.state.uploads, r.output
    r = runner.invoke(
        app,
        [
            "upload",
            "--emulator-url",
            fake.emulator_url,
            "--adapter",
            str(out),
            "--eval-data",
            str(eval_file),
            "--no-wait",
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    adapter_id = json.loads(r.stdout)["adapter"]["id"]
    assert fake.state.uploads[0]["metrics"]["emulator_fine_tuned"]  # taken from scaleot_adapter.json
    r = runner.invoke(app, ["status", adapter_id, "--server", fake.url, "--wait", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["adapter"]["evaluation"]["plug_in"]["perplexity"] > 0
    r = runner.invoke(app, ["status", f"{fake.url}/v1/adapters/{adapter_id}"])
    assert r.exit_code == 0 and "plug-in" in r.stdout
    r = runner.invoke(app, ["status", "nope", "--server", fake.url])
    assert r.exit_code == ExitCode.SERVER


def test_upload_refuses_an_adapter_that_does_not_match_the_spec(runner, fake, client_env, train_file, tmp_path):
    out = tmp_path / "o"
    r = runner.invoke(
        app,
        [
            "tune",
            "--emulator-url",
            fake.emulator_url,
            "--data",
            str(train_file),
            *TUNE_FAST,
            "--out",
            str(out),
            "--no-upload",
        ],
    )
    assert r.exit_code == 0, r.output
    tensors = load_file(out / "adapter_layers.safetensors")
    tensors["model.norm.weight"] = torch.zeros(32)  # smuggling a non-adapter tensor
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, bad)
    r = runner.invoke(app, ["upload", "--emulator-url", fake.emulator_url, "--adapter", str(bad)])
    assert r.exit_code == ExitCode.BAD_INPUT and "unexpected" in r.stderr
    assert not fake.state.uploads


def test_upload_reads_a_folder_written_by_an_older_client(runner, fake, client_env, train_file, eval_file, tmp_path):
    """Before PEFT's names were kept for PEFT files: whole layers in adapter_model.safetensors, our record in
    adapter_config.json. Such a folder still uploads, as whole layers with its recorded metrics."""
    out = tmp_path / "o"
    r = runner.invoke(
        app,
        [
            "tune",
            "--emulator-url",
            fake.emulator_url,
            "--data",
            str(train_file),
            *TUNE_FAST,
            "--out",
            str(out),
            "--no-upload",
        ],
    )
    assert r.exit_code == 0, r.output
    old = tmp_path / "old"
    old.mkdir()
    (old / "adapter_model.safetensors").write_bytes((out / "adapter_layers.safetensors").read_bytes())
    record = json.loads((out / "scaleot_adapter.json").read_text())
    (old / "adapter_config.json").write_text(json.dumps({**record, "metrics": {"emulator_fine_tuned": {"loss": 1.0}}}))
    r = runner.invoke(
        app,
        [
            "upload",
            "--emulator-url",
            fake.emulator_url,
            "--adapter",
            str(old),
            "--eval-data",
            str(eval_file),
            "--no-wait",
        ],
    )
    assert r.exit_code == 0, r.output
    upload = fake.state.uploads[0]
    assert upload["adapter_bytes"] == (out / "adapter_layers.safetensors").read_bytes()
    assert upload["metrics"] == {"emulator_fine_tuned": {"loss": 1.0}} and upload["adapter_config"]["method"] == "full"


@pytest.mark.parametrize(
    ("option", "good", "key"),
    [
        ("--anchor-decay", "100", "anchor_decay"),  # L2-SP toward the issued weights (issue 21)
        ("--sam-rho", "0.5", "sam_rho"),  # sharpness-aware minimisation (issue 21)
    ],
)
def test_tune_recipe_option_reaches_the_recipe_and_a_negative_one_is_refused(
    runner, fake, client_env, train_file, tmp_path, option, good, key
):
    """A recipe option of issue 21 is the recipe's, recorded with the adapter; a negative value fails before any
    download or training and writes nothing."""
    base = ["tune", "--emulator-url", fake.emulator_url, "--data", str(train_file), *TUNE_FAST, "--no-upload"]
    bad = tmp_path / "bad"
    r = runner.invoke(app, [*base, option, "-1", "--out", str(bad)])
    assert r.exit_code != 0 and f"{option} must be >= 0" in r.output and not bad.exists()
    r = runner.invoke(app, [*base, option, good, "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    record = json.loads((tmp_path / "o" / "scaleot_adapter.json").read_text())
    assert record["hyperparameters"][key] == float(good)
