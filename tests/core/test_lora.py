"""The PEFT round trip: a LoRA trained on the emulator, exported by the client, loads with
`PeftModel.from_pretrained(full_model, folder)` and gives the same logits as the server's merged plug-in."""

from __future__ import annotations

import copy

import pytest
import torch

from data_owner_client.train import TrainConfig
from data_owner_client.tune import tune_emulator
from model_owner_server.scaleot.emulator import build_emulator, scaleot_plan
from model_owner_server.scaleot.plugin import plug_in, plug_in_file
from scaleot_samples.tiny import byte_tokenizer, tiny_model
from shared.adapter import AdapterValidationError, adapter_spec, spec_to_json
from shared.data import load_dataset
from shared.device import DeviceChoice
from shared.emulator_file import load_emulator, save_emulator
from shared.lora import LoraSpec, issue_lora, load_adapter
from shared.modules import Harmonizer

CPU = DeviceChoice(torch.device("cpu"), None)
TEXT = "the quick brown fox jumps over the lazy dog. " * 60


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.arange(40).view(2, 20) % 250
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(params=["llama", "gpt2", "opt"])
def tuned(request, tmp_path):
    """(full model, adapter layers, issued LoRA, folder `tune --method lora` wrote) for one tiny family."""
    full = tiny_model(request.param, n_layers=6)
    plan = scaleot_plan(torch.tensor([5.0, 1.0, -1.0, 0.0, -2.0, 3.0]), 2, 0.5, 0.5, full, bottleneck=8)
    hs = {i: Harmonizer(full.config.hidden_size, 8) for i in range(6)}
    info = save_emulator(build_emulator(full, plan, hs), plan, byte_tokenizer(), tmp_path / "emu.safetensors")
    emu = load_emulator(info.path)  # the data owner's view: rebuilt from the file
    lora = issue_lora(full, plan.adapter_layers)  # what the server issues, from the FULL model
    (tmp_path / "train.txt").write_text(TEXT)
    cfg = TrainConfig(method="lora", max_steps=3, lr=3e-2, batch_size=2, seq_len=32)
    tune_emulator(
        emu.model,
        emu.tokenizer,
        emu.plan,
        load_dataset(tmp_path / "train.txt"),
        cfg,
        CPU,
        tmp_path / "out",
        lora=lora,
        progress=False,
    )
    return full, plan.adapter_layers, lora, tmp_path / "out"


def test_peft_loads_the_export_on_the_full_model_with_the_merged_plug_ins_logits(tuned):
    from peft import PeftModel

    full, layers, lora, out = tuned
    assert layers == [0, 5]
    assert {"adapter_model.safetensors", "adapter_config.json", "scaleot_adapter.json"} <= {
        p.name for p in out.iterdir()
    }
    peft_model = PeftModel.from_pretrained(copy.deepcopy(full), str(out)).eval()
    spec = adapter_spec(full, layers)
    merged = plug_in(full, load_adapter(out / "adapter_model.safetensors", spec, lora), layers, spec, lora)
    torch.testing.assert_close(_logits(peft_model), _logits(merged), rtol=0, atol=2e-5)
    assert not torch.allclose(_logits(merged), _logits(full), atol=1e-3)  # the LoRA did something
    stored = plug_in_file(full, out / "adapter_model.safetensors", layers, spec_to_json(spec), {"lora": lora.to_json()})
    torch.testing.assert_close(_logits(stored), _logits(merged), rtol=0, atol=0)


def test_lora_is_refused_by_an_emulator_issued_without_one_or_for_other_layers(tuned):
    full, layers, lora, out = tuned
    spec = adapter_spec(full, layers)
    with pytest.raises(AdapterValidationError, match="without a LoRA spec"):
        load_adapter(out / "adapter_model.safetensors", spec, None)
    other = issue_lora(full, [1, 4])
    with pytest.raises(AdapterValidationError, match="unexpected"):
        load_adapter(out / "adapter_model.safetensors", spec, other)
    tensors = load_adapter(out / "adapter_model.safetensors", spec, lora)
    with pytest.raises(AdapterValidationError, match="LoRA spec does not match"):
        plug_in(full, tensors, [1, 4], adapter_spec(full, [1, 4]), lora)  # a spec for other layers of M


def test_lora_spec_json_round_trip():
    lora = issue_lora(tiny_model("gpt2"), [0, 3], r=4, alpha=8, dtype=torch.bfloat16)
    assert LoraSpec.from_json(lora.to_json()) == lora and lora.dtype == "BF16" and lora.scaling == 2.0
    assert lora.modules and all(m.conv1d for m in lora.modules.values())  # GPT-2's Conv1D: PEFT's fan_in_fan_out
