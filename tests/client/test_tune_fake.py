"""`dataowner-client tune` end to end against the in-process fake server (real shared code, real HTTP)."""

from __future__ import annotations

import json

from safetensors.torch import load as load_safetensors

from data_owner_client.cli import app
from shared.adapter import spec_from_json, validate_adapter


def test_tune_full_flow_uploads_only_the_adapter(runner, fake, client_env, train_file, eval_file, tmp_path):
    out = tmp_path / "adapter"
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
            "--max-steps",
            "3",
            "--batch-size",
            "2",
            "--seq-len",
            "64",
            "--lr",
            "3e-3",
            "--out",
            str(out),
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    print(r.stderr)
    assert len(fake.state.uploads) == 1
    up = fake.state.uploads[0]
    tensors = load_safetensors(up["adapter_bytes"])
    spec = spec_from_json(fake.state.built["adapter_spec"])
    assert set(tensors) == set(spec)  # exactly the adapter tensors, nothing else
    validate_adapter(tensors, spec)
    assert up["eval_filename"] == "eval.jsonl" and up["eval_bytes"] == eval_file.read_bytes()
    assert set(up["metrics"]) == {"emulator_zero_shot", "emulator_fine_tuned", "eval_settings"}
    assert up["metrics"]["eval_settings"]["seq_len"] == 64  # the server scores M and the plug-in the same way
    assert doc["metrics"]["plug_in"]["perplexity"] > 0
    assert doc["adapter"]["status"] == "evaluated"
    assert (out / "adapter_layers.safetensors").read_bytes() == up["adapter_bytes"]
