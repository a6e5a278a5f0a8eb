"""Trained stand-ins keep float32 weights when M computes in bf16 (issue 22).

An AdamW update of ~lr = 1e-3 to a LayerNorm weight of 1.0 is below half a bf16 step there (2^-8 below 1.0), so
in bf16 it rounds away every step and the weight never trains, silently. Stage 1 therefore trains float32
harmonizers (Harmonizer.forward computes in its weights' dtype and returns M's), the emulator build keeps them
float32 through calibration, calibration gives whatever else it trains (kept layers, kept_lr > 0) float32 master
weights, and the file is cast to the issued dtype when it is written. In float32 all of this is a no-op.
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from model_owner_server.scaleot.calibrate import CalibrationConfig, calibrate_emulator
from model_owner_server.scaleot.emulator import build_emulator, make_emulator, scaleot_plan
from model_owner_server.scaleot.importance import ImportanceConfig, ImportanceResult, estimate_importance
from scaleot_samples.tiny import byte_tokenizer, tiny_model
from shared.layer_plan import Role
from shared.modules import Harmonizer

N_LAYERS, HIDDEN = 6, 32
# Loud (1, 4) and silent (2, 3) layers, so the plan is the same in every test: harmonizers at the least
# important non-adapter layers, frozen layers in between (adapters at 0 and 5: sandwich placement).
SCORES = torch.tensor([0.0, 2.0, -2.0, -1.0, 1.0, 0.0])


def _model(dtype: torch.dtype):
    return tiny_model("llama", N_LAYERS, HIDDEN, 0).to(dtype)


def _blocks(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 16), generator=torch.Generator().manual_seed(seed))


def _ln_moved(h: Harmonizer) -> float:
    return float((h.norm.weight.detach().float() - 1).abs().max())


def _stage1(dtype: torch.dtype) -> ImportanceResult:
    cfg = ImportanceConfig(steps=8, rl_interval=4, warmup_steps=2, seed=0, bottleneck=8, batch_size=4)
    return estimate_importance(_model(dtype), _blocks(16, 1), _blocks(4, 2), cfg)


def test_harmonizer_computes_in_its_dtype_and_returns_the_inputs():
    torch.manual_seed(0)
    h = Harmonizer(HIDDEN, 8)
    torch.nn.init.normal_(h.up.weight, std=0.1)
    x = torch.randn(2, 5, HIDDEN)
    # float32 in, float32 weights: exactly the formula (bit for bit, as before stand-ins kept their own dtype)
    assert torch.equal(h(x), x + h.up(torch.nn.functional.gelu(h.down(h.norm(x)))))
    xb = x.bfloat16()
    out = h(xb)  # a float32 harmonizer inside a bf16 model
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, h(xb.float()).bfloat16())


def test_stage1_trains_the_harmonizer_layernorm_in_bf16():
    fp32, bf16 = _stage1(torch.float32), _stage1(torch.bfloat16)
    assert {h.norm.weight.dtype for h in bf16.harmonizers.values()} == {torch.float32}
    moved = {name: max(_ln_moved(h) for h in r.harmonizers.values()) for name, r in (("fp32", fp32), ("bf16", bf16))}
    # bf16 kept them at exactly 1.0 before they were float32; now they move as much as in a float32 run
    assert moved["fp32"] > 1e-3
    assert moved["bf16"] > 0.5 * moved["fp32"], moved


def _fresh_importance(model) -> ImportanceResult:
    """Stage-1 output with fresh harmonizers (LayerNorm weights exactly 1.0), so any change is calibration's."""
    torch.manual_seed(0)
    cfg = ImportanceConfig(steps=1, bottleneck=8)
    hs = {i: Harmonizer(HIDDEN, 8).requires_grad_(False) for i in range(N_LAYERS)}
    for h in hs.values():  # not the identity, so the LayerNorm has a gradient
        torch.nn.init.normal_(h.up.weight, std=0.05)
    return ImportanceResult(SCORES.clone(), hs, cfg, [], 0.0, 0)


def _calibrated_file(tmp_path, model, dtype: torch.dtype | None, kept_lr: float):
    out = tmp_path / f"emu-{dtype}-{kept_lr}.safetensors"
    info = make_emulator(
        model,
        byte_tokenizer(),
        _fresh_importance(model),
        2,
        0.5,
        0.0,
        out,
        calibration=CalibrationConfig(steps=10, batch_size=4, kept_lr=kept_lr, seed=0),
        calibration_blocks=_blocks(16, 3),
        fidelity_blocks=_blocks(2, 4),
        dtype=dtype,
    )
    with safe_open(str(out), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    return info.plan, load_file(str(out)), dtypes


def _harmonizer_ln(tensors: dict[str, torch.Tensor], plan) -> list[torch.Tensor]:
    return [tensors[f"model.layers.{i}.harmonizer.norm.weight"] for i in plan.layers_with(Role.HARMONIZER)]


def _kept_norms(tensors: dict[str, torch.Tensor], plan) -> list[torch.Tensor]:
    return [tensors[f"model.layers.{i}.input_layernorm.weight"] for i in plan.layers_with(Role.FROZEN)]


def test_calibration_trains_stand_ins_and_kept_layers_in_bf16_and_writes_the_issued_dtype(tmp_path):
    model = _model(torch.bfloat16)
    before = copy.deepcopy(model.state_dict())
    plan, tensors, dtypes = _calibrated_file(tmp_path, model, torch.float32, kept_lr=1e-3)
    assert plan.layers_with(Role.HARMONIZER) and plan.layers_with(Role.FROZEN)
    assert dtypes == {"F32"}  # the issued dtype, not M's
    # LayerNorm / RMSNorm weights start at exactly 1.0; updates of ~1e-3 round away next to 1.0 in bf16
    assert max(float((w - 1).abs().max()) for w in _harmonizer_ln(tensors, plan)) > 1e-3
    assert max(float((w - 1).abs().max()) for w in _kept_norms(tensors, plan)) > 0  # through float32 masters
    assert next(model.parameters()).dtype == torch.bfloat16  # M untouched
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(("issued", "stored"), [(torch.bfloat16, "BF16"), (None, "BF16")])
def test_a_bf16_emulator_file_is_bf16_throughout(tmp_path, issued, stored):
    """Float32 stand-ins inside the build never leak into the file: it has the issued dtype (M's when none)."""
    _, _, dtypes = _calibrated_file(tmp_path, _model(torch.bfloat16), issued, kept_lr=0.0)
    assert dtypes == {stored}


def test_float32_emulator_is_what_build_and_calibrate_always_gave(tmp_path):
    """In float32 the stand-in dtype, the masters and the final cast are no-ops: make_emulator's file holds
    exactly the tensors of the plain build + calibration (the same seeded run, compared bit for bit)."""
    model = _model(torch.float32)
    plan, tensors, dtypes = _calibrated_file(tmp_path, model, None, kept_lr=1e-3)
    assert dtypes == {"F32"}
    importance = _fresh_importance(model)
    expected = build_emulator(model, scaleot_plan(SCORES, 2, 0.5, 0.0, model, 8), importance.harmonizers)
    calibrate_emulator(
        model, expected, plan, _blocks(16, 3), CalibrationConfig(steps=10, batch_size=4, kept_lr=1e-3, seed=0)
    )
    state = expected.state_dict()
    assert set(tensors) <= set(state)
    assert all(torch.equal(t, state[k]) for k, t in tensors.items())
