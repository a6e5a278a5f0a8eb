"""Calibration's gradient-alignment term (CalibrationConfig.grad_weight, issue 21): the emulator's LM-loss gradient
w.r.t. the residual stream after the bottom adapters should point where M's does; off (0) it changes nothing."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from model_owner_server.scaleot.calibrate import (
    CalibrationConfig,
    _forward_with_junction_grad,
    bottom_junction,
    calibrate_emulator,
    junction_grad_mismatch,
    measure_fidelity,
)
from model_owner_server.scaleot.emulator import build_emulator, scaleot_plan
from scaleot_samples.tiny import tiny_model
from shared.layer_plan import LayerPlan, Role
from shared.modules import Harmonizer

N_LAYERS, HIDDEN = 6, 32
SCORES = torch.tensor([0.0, 2.0, -2.0, -1.0, 1.0, 0.0])  # plan AFHHFA (adapters 0 and 5)


def _blocks(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 16), generator=torch.Generator().manual_seed(seed))


def _setup():
    model = tiny_model("llama", N_LAYERS, HIDDEN, 0)
    plan = scaleot_plan(SCORES, 2, 0.5, 0.0, model, 8)
    torch.manual_seed(0)
    hs = {i: Harmonizer(HIDDEN, 8).requires_grad_(False) for i in range(N_LAYERS)}
    for h in hs.values():  # not the identity, so the emulator starts away from M
        torch.nn.init.normal_(h.up.weight, std=0.05)
    return model, plan, hs


def _mismatch(model, emu, plan: LayerPlan) -> float:
    ids, j = _blocks(8, 7), bottom_junction(plan)
    _, _, t_grad = _forward_with_junction_grad(model, ids, [j], j)
    _, _, grad = _forward_with_junction_grad(emu, ids, [j], j)
    return float(junction_grad_mismatch(grad, t_grad))


def plan(roles: str) -> LayerPlan:
    letters = {"A": Role.ADAPTER, "H": Role.HARMONIZER, "F": Role.FROZEN}
    return LayerPlan([letters[c] for c in roles])


def test_bottom_junction_is_the_end_of_the_leading_adapter_run():
    assert bottom_junction(plan("AAFHHFAA")) == 1
    assert bottom_junction(plan("AFHHFA")) == 0
    assert bottom_junction(plan("FAHHAF")) is None


def test_m_against_itself_has_no_mismatch():
    model, plan, _ = _setup()
    assert _mismatch(model, copy.deepcopy(model), plan) == pytest.approx(0.0, abs=1e-5)


def test_the_term_lowers_the_gradient_mismatch_it_targets():
    model, plan, hs = _setup()
    blocks = _blocks(16, 3)
    after = {}
    for w in (0.0, 10.0):
        emu = build_emulator(model, plan, copy.deepcopy(hs))
        before = _mismatch(model, emu, plan)
        cfg = CalibrationConfig(steps=5, lr=1e-2, grad_weight=w, grad_match="junction")
        info = calibrate_emulator(model, emu, plan, blocks, cfg)
        after[w] = _mismatch(model, emu, plan)
        assert ("final_grad_mismatch" in info) == (w > 0)
    assert after[10.0] < after[0.0] < before, (before, after)


def test_the_adapters_form_lowers_the_parameter_gradient_mismatch_on_its_batch():
    """grad_match = "adapters": the adapter layers' parameter-gradient cosine with M (the fidelity figure) on the
    calibration batch itself rises, and the adapter layers (M's weights) neither change nor keep a gradient."""
    model, plan, hs = _setup()
    blocks = _blocks(4, 3)  # one batch: every step sees it
    emu = build_emulator(model, plan, copy.deepcopy(hs))
    adapters = {
        k: v.clone() for k, v in emu.state_dict().items() if k.startswith(("model.layers.0.", "model.layers.5."))
    }
    before = measure_fidelity(model, emu, plan, blocks)["grad_cosine"]
    cfg = CalibrationConfig(steps=5, lr=1e-2, kl_weight=0, hidden_weight=0, grad_weight=1, grad_match="adapters")
    info = calibrate_emulator(model, emu, plan, blocks, cfg)
    assert measure_fidelity(model, emu, plan, blocks)["grad_cosine"] > before
    assert info["config"]["grad_match"] == "adapters"
    state = emu.state_dict()
    assert all(torch.equal(state[k], v) for k, v in adapters.items())
    assert all(p.grad is None for i in plan.adapter_layers for p in emu.model.layers[i].parameters())


def test_grad_weight_zero_is_the_calibration_without_the_term():
    """Off (grad_weight 0: the calibration before issue 21), the term leaves no trace: the record has the keys it
    had before the term existed, and which grad_match is named does not matter, bit for bit."""
    model, plan, hs = _setup()
    emus = [build_emulator(model, plan, copy.deepcopy(hs)) for _ in range(2)]
    seen: list = []
    info = calibrate_emulator(
        model, emus[0], plan, _blocks(16, 3), CalibrationConfig(steps=3, grad_weight=0.0), seen.append
    )
    off = CalibrationConfig(steps=3, grad_weight=0.0, grad_match="junction")
    calibrate_emulator(model, emus[1], plan, _blocks(16, 3), off)
    assert "grad_weight" not in info["config"] and "final_grad_mismatch" not in info
    assert {p.grad_mismatch for p in seen} == {None}
    a, b = (e.state_dict() for e in emus)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "grad_weight" in CalibrationConfig(grad_weight=1.0).to_dict()


def test_the_term_needs_bottom_adapters():
    model, _, hs = _setup()
    top_only = plan("FAHHAF")
    emu = build_emulator(model, top_only, copy.deepcopy(hs))
    with pytest.raises(ValueError, match="bottom"):
        calibrate_emulator(
            model, emu, top_only, _blocks(8, 3), CalibrationConfig(steps=1, grad_weight=1.0, grad_match="junction")
        )


def test_the_default_is_the_adapters_form_and_needs_no_bottom_adapters():
    """The default calibration (issue 21) matches the adapter layers' parameter gradients, so it also calibrates
    a plan whose adapters are not at the bottom (placement "importance" can give one)."""
    assert (CalibrationConfig().grad_weight, CalibrationConfig().grad_match) == (10.0, "adapters")
    model, _, hs = _setup()
    top_only = plan("FAHHAF")
    emu = build_emulator(model, top_only, copy.deepcopy(hs))
    info = calibrate_emulator(model, emu, top_only, _blocks(8, 3), CalibrationConfig(steps=2))
    assert info["config"]["grad_match"] == "adapters" and math.isfinite(info["final_grad_mismatch"])
