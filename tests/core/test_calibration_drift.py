"""Calibration along the data owner's trajectory (CalibrationConfig.drift_lr, issue 21): between calibration steps
the adapter layers take fine-tuning steps through the emulator and the stand-ins are matched to M carrying them.
M must never be written, the emulator must come back with M's own adapter tensors, and off (0) changes nothing."""

from __future__ import annotations

import pytest
import torch

from model_owner_server.scaleot.calibrate import CalibrationConfig, calibrate_emulator
from model_owner_server.scaleot.emulator import build_emulator, scaleot_plan
from scaleot_samples.tiny import tiny_model
from shared.architectures import decoder_layers
from shared.layer_plan import Role
from shared.modules import Harmonizer

N_LAYERS, HIDDEN = 6, 32
SCORES = torch.tensor([0.0, 2.0, -2.0, -1.0, 1.0, 0.0])  # plan AFHHFA (adapters 0 and 5)


def _setup(arch: str = "llama"):
    model = tiny_model(arch, N_LAYERS, HIDDEN, 0).requires_grad_(False)
    plan = scaleot_plan(SCORES, 2, 0.5, 0.0, model, 8)
    torch.manual_seed(0)
    hs = {i: Harmonizer(HIDDEN, 8).requires_grad_(False) for i in range(N_LAYERS)}
    for h in hs.values():  # not the identity, so the emulator starts away from M
        torch.nn.init.normal_(h.up.weight, std=0.05)
    emu = build_emulator(model, plan, hs, share_weights=True)
    return model, plan, emu


def _blocks(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 16), generator=torch.Generator().manual_seed(seed))


def _harmonizer_tensors(emu, plan) -> list[torch.Tensor]:
    return [p.detach().clone() for i in plan.layers_with(Role.HARMONIZER) for p in decoder_layers(emu)[i].parameters()]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("grad_weight", [0.0, 10.0])
def test_drift_never_writes_m_and_gives_the_emulator_back_m_s_adapters(arch: str, grad_weight: float):
    model, plan, emu = _setup(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    versions = [p._version for p in model.parameters()]
    adapter_ptrs = [p.data_ptr() for i in plan.adapter_layers for p in decoder_layers(emu)[i].parameters()]
    moved: list[float] = []

    def watch(_p) -> None:  # while calibrating, the emulator's adapters are away from M's
        a = decoder_layers(emu)[plan.adapter_layers[0]]
        m = decoder_layers(model)[plan.adapter_layers[0]]
        moved.append(max(float((x - y).abs().max()) for x, y in zip(a.parameters(), m.parameters(), strict=True)))

    cfg = CalibrationConfig(steps=6, batch_size=2, lr=1e-2, grad_weight=grad_weight, drift_lr=1e-2, drift_reset=3)
    rec = calibrate_emulator(model, emu, plan, _blocks(16, 3), cfg, progress=watch)
    assert rec["config"]["drift_lr"] == 1e-2 and rec["config"]["drift_reset"] == 3
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert [p._version for p in model.parameters()] == versions  # not even written with the same values
    # the emulator's adapters share M's storage again, and hold M's values
    assert [p.data_ptr() for i in plan.adapter_layers for p in decoder_layers(emu)[i].parameters()] == adapter_ptrs
    # steps 1 and 4 start a trajectory at M's weights; the steps between have moved
    assert moved[0] == 0.0 and moved[3] == 0.0
    assert moved[1] > 0 and moved[2] > moved[1] and moved[4] > 0


def test_drift_changes_what_the_stand_ins_learn_and_off_changes_nothing():
    blocks = _blocks(16, 3)
    out = {}
    for name, kw in {"off": {}, "zero": {"drift_lr": 0.0, "drift_reset": 7}, "on": {"drift_lr": 1e-2}}.items():
        model, plan, emu = _setup()
        cfg = CalibrationConfig(steps=6, batch_size=2, lr=1e-2, grad_weight=0.0, **kw)
        rec = calibrate_emulator(model, emu, plan, blocks, cfg)
        out[name] = (_harmonizer_tensors(emu, plan), rec["config"])
    assert all(torch.equal(a, b) for a, b in zip(out["off"][0], out["zero"][0], strict=True))
    assert "drift_lr" not in out["off"][1] and out["off"][1] == out["zero"][1]  # records read as before
    assert not all(torch.equal(a, b) for a, b in zip(out["off"][0], out["on"][0], strict=True))


@pytest.mark.parametrize("kw", [{"drift_lr": -1e-4}, {"drift_reset": 0}])
def test_bad_drift_settings_are_refused(kw):
    with pytest.raises(ValueError, match="drift"):
        CalibrationConfig(**kw)
