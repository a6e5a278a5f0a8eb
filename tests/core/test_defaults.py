"""Each default lives in one place: stage 1's and calibration's knobs in ImportanceConfig / CalibrationConfig
(shared/importance_config.py), the data and device knobs in Settings. The CLI (`estimate-importance`, `make-emulator`), the API schema
(ImportanceRequest) and the README read them, so they cannot drift apart again (the CLI used to say
--rl-interval 4, --seq-len 256 and --device cpu where the API and the server said 2, 128 and auto)."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import typer

from model_owner_server.cli import app
from model_owner_server.core.config import Settings
from model_owner_server.scaleot import calibrate
from model_owner_server.scaleot.importance import ImportanceConfig
from shared.importance_config import CalibrationConfig
from shared.schemas import EmulatorCreate, ImportanceRequest

ROOT = Path(__file__).resolve().parents[2]
LIBRARY = ImportanceConfig()
# CLI option name -> ImportanceConfig field, where they differ.
CLI_TO_LIBRARY = {"candidates": "n_candidates"}


def cli_defaults(command: str) -> dict[str, object]:
    click_command = typer.main.get_command(app).commands[command]
    return {p.name: p.default for p in click_command.params if p.name}


def setting(name: str) -> object:
    return Settings.model_fields[name].default


def test_estimate_importance_cli_defaults_are_the_library_and_the_servers():
    cli = cli_defaults("estimate-importance")
    library_knobs = {f.name for f in dataclasses.fields(ImportanceConfig)}
    compared = 0
    for option, default in cli.items():
        field = CLI_TO_LIBRARY.get(option, option)
        if field in library_knobs and field not in ("batch_size", "device"):
            assert default == getattr(LIBRARY, field), f"--{option}: CLI {default!r}, ImportanceConfig {field}"
            compared += 1
    assert compared >= 11  # steps, replace_fraction, rl_interval, candidates, lr, ... seed
    assert cli["rl_interval"] == LIBRARY.rl_interval == 2
    # Data and device: what the server's importance job uses.
    assert cli["seq_len"] == setting("importance_seq_len")
    assert cli["max_blocks"] == setting("importance_max_blocks")
    assert cli["batch_size"] == setting("importance_batch_size") == LIBRARY.batch_size
    assert cli["device"] == setting("device") == "auto"


def test_api_schema_defaults_are_the_library_defaults():
    request = ImportanceRequest()
    knobs = [name for name in ImportanceRequest.model_fields if hasattr(LIBRARY, name)]
    assert set(knobs) == {"steps", "warmup_steps", "rl_interval", "distill_weight", "hidden_weight", "seed"}
    for name in knobs:
        assert getattr(request, name) == getattr(LIBRARY, name), name
    # What a request with no knobs queues is exactly the library's default run.
    assert ImportanceConfig(**{k: getattr(request, k) for k in knobs}) == LIBRARY


def test_make_emulator_cli_defaults_are_the_servers():
    """The emulator job reads these settings; the CLI used to hard-code 512 blocks and 8 fidelity blocks."""
    cli = cli_defaults("make-emulator")
    assert cli["placement"] == setting("emulator_placement")
    assert cli["calibration_steps"] == setting("emulator_calibration_steps")
    assert cli["kept_lr"] == setting("emulator_calibration_kept_lr")
    assert cli["grad_weight"] == setting("emulator_calibration_grad_weight")
    assert cli["grad_match"] == setting("emulator_calibration_grad_match")
    assert cli["mix_heads"] == setting("emulator_mix_heads")
    assert cli["seq_len"] == setting("importance_seq_len")
    assert cli["max_blocks"] == setting("importance_max_blocks")
    assert cli["fidelity_blocks"] == setting("emulator_fidelity_blocks")
    source = (ROOT / "model_owner_server" / "cli" / "algorithm.py").read_text()
    assert not re.search(r"\b512\b|\[:8\]", source), "a setting's value is copied into cli/algorithm.py"


def test_the_readme_states_the_library_defaults():
    readme = (ROOT / "README.md").read_text()
    line = next(ln for ln in readme.splitlines() if "optional: rl_interval (" in ln)
    stated = dict(re.findall(r"(\w+) \(([\d.]+)\)", line))
    assert stated, line
    for name, value in stated.items():
        assert float(value) == float(getattr(LIBRARY, name)), f"README says {name} ({value})"


def test_calibration_defaults_are_the_library_and_the_servers():
    """The emulator job builds its CalibrationConfig from Settings, `make-emulator` from its options: both must
    start from the library's defaults (Settings used to repeat 50 steps and kept_lr 0 on its own)."""
    library = CalibrationConfig()
    assert calibrate.CalibrationConfig is CalibrationConfig  # the library's class is the torch-free one
    assert setting("emulator_calibration_steps") == library.steps
    assert setting("emulator_calibration_kept_lr") == library.kept_lr
    assert setting("emulator_calibration_grad_weight") == library.grad_weight
    assert setting("emulator_calibration_grad_match") == library.grad_match
    assert set(typing.get_args(Settings.model_fields["emulator_calibration_grad_match"].annotation)) == set(
        calibrate.GRAD_MATCHES
    )
    assert setting("importance_batch_size") == library.batch_size == LIBRARY.batch_size
    cli = cli_defaults("make-emulator")
    assert cli["calibration_steps"] == library.steps and cli["kept_lr"] == library.kept_lr


def test_make_emulator_storage_dtype_default_is_the_apis():
    assert cli_defaults("make-emulator")["dtype"] == EmulatorCreate.model_fields["dtype"].default == "float32"


def test_device_defaults_agree_between_the_server_and_both_clis():
    """SCALEOT_DEVICE, `estimate-importance --device` and `dataowner-client tune --device` all default to auto
    (the GPU when CUDA is there, else the CPU)."""
    from data_owner_client.cli import app as client_app

    tune = typer.main.get_command(client_app).commands["tune"]
    client_device = next(p.default for p in tune.params if p.name == "device")
    assert client_device == cli_defaults("estimate-importance")["device"] == setting("device") == "auto"


def test_tune_cli_defaults_are_the_client_recipes():
    """Every `dataowner-client tune` option that is a TrainConfig field defaults to TrainConfig's value (the CLI used
    to repeat batch size 4, seq-len 256, seed 0, cosine, ... by hand); the issued LoRA's rank and alpha are the
    server's and the client's one pair."""
    from data_owner_client.cli import app as client_app
    from data_owner_client.train_config import TrainConfig
    from shared import lora
    from shared.importance_config import LORA_ALPHA, LORA_R

    tune = typer.main.get_command(client_app).commands["tune"]
    cli = {p.name: p.default for p in tune.params if p.name}
    recipe = dataclasses.asdict(TrainConfig())
    shared_names = {"epochs", "batch_size", "grad_accum", "seq_len", "seed", "scheduler", "warmup_ratio"}
    shared_names |= {"lora_dropout", "save_every", "max_steps", "lr"}
    assert shared_names <= cli.keys() & recipe.keys()
    assert {k: cli[k] for k in shared_names} == {k: recipe[k] for k in shared_names}
    assert cli["method"] == recipe["method"] == "full"
    assert (
        (lora.DEFAULT_R, lora.DEFAULT_ALPHA) == (TrainConfig().lora_r, TrainConfig().lora_alpha) == (LORA_R, LORA_ALPHA)
    )
