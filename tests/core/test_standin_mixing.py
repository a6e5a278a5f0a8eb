"""Stand-ins with token mixing (issue 21): a harmonizer may carry a cheap causal attention (CausalMix) so the
emulator's replaced layers move information between tokens, as M's layers do.

What must hold: a fresh or newly added mixer changes nothing (stage 1's harmonizers keep their function); the
mixer is causal and ignores right padding (the product pads on the right); the plan carries it so the data
owner's rebuild from the file alone has the same tensors, in every family; plans without it serialise exactly
as before; and seeded builds are reproducible.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from model_owner_server.scaleot.calibrate import CalibrationConfig
from model_owner_server.scaleot.emulator import make_emulator, model_head_dim, scaleot_plan
from model_owner_server.scaleot.importance import ImportanceConfig, ImportanceResult
from scaleot_samples.tiny import byte_tokenizer, tiny_model
from shared.architectures import decoder_layers
from shared.emulator_file import load_emulator
from shared.layer_plan import LayerPlan, Role
from shared.modules import CausalMix, Harmonizer

N_LAYERS, HIDDEN = 8, 32
SCORES = torch.tensor([0.0, 2.0, -2.0, -1.0, 1.0, 0.0, 0.5, -0.5])


def _trained_harmonizer(seed: int = 0) -> Harmonizer:
    torch.manual_seed(seed)
    h = Harmonizer(HIDDEN, 8)
    torch.nn.init.normal_(h.up.weight, std=0.1)
    return h


def _importance() -> ImportanceResult:
    hs = {i: _trained_harmonizer(i).requires_grad_(False) for i in range(N_LAYERS)}
    return ImportanceResult(SCORES.clone(), hs, ImportanceConfig(steps=1, bottleneck=8), [], 0.0, 0)


def _blocks(n: int, seed: int, t: int = 16) -> torch.Tensor:
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))


def _build(family: str, path, mix_heads: int = 2, dtype: torch.dtype | None = None):
    model = tiny_model(family, N_LAYERS, HIDDEN, 0).requires_grad_(False)
    info = make_emulator(
        model,
        byte_tokenizer(),
        _importance(),
        2,
        0.5,
        0.0,
        path,
        calibration=CalibrationConfig(steps=4, batch_size=2, lr=1e-2, seed=0),
        calibration_blocks=_blocks(8, 1),
        fidelity_blocks=_blocks(2, 2),
        dtype=dtype,
        mix_heads=mix_heads,
    )
    return model, info


def test_a_new_mixer_keeps_the_harmonizer_s_function():
    h = _trained_harmonizer()
    x = torch.randn(2, 7, HIDDEN)
    before = h(x)
    h.add_mix(2, 8, torch.Generator().manual_seed(0))
    assert h.mix is not None and h.mix.out.weight.abs().sum() == 0
    assert torch.equal(h(x), before)
    fresh = Harmonizer(HIDDEN, 8, mix_heads=2, mix_head_dim=8)
    assert torch.equal(fresh(x), x)  # a fresh stand-in is still the identity


def test_the_mixer_is_causal_and_ignores_right_padding():
    torch.manual_seed(0)
    mix = CausalMix(HIDDEN, 2, 8)
    torch.nn.init.normal_(mix.out.weight, std=0.2)
    x = torch.randn(1, 6, HIDDEN)
    padded = torch.cat([x, torch.randn(1, 3, HIDDEN)], dim=1)  # what right padding appends
    assert torch.allclose(mix(padded)[:, :6], mix(x), atol=1e-6)
    # and it does mix: the last position depends on the first
    moved = x.clone()
    moved[:, 0] = torch.randn(HIDDEN)  # (a constant shift would vanish in the LayerNorm)
    assert not torch.allclose(mix(moved)[:, -1], mix(x)[:, -1])


def test_rope_makes_the_mixer_see_relative_order():
    torch.manual_seed(0)
    mix = CausalMix(HIDDEN, 1, 8)
    torch.nn.init.normal_(mix.out.weight, std=0.2)
    a, b = torch.randn(1, 1, HIDDEN), torch.randn(1, 1, HIDDEN)
    c = torch.randn(1, 1, HIDDEN)
    # the same set of earlier tokens in another order: without positions the last output would be identical
    assert not torch.allclose(mix(torch.cat([a, b, c], 1))[:, -1], mix(torch.cat([b, a, c], 1))[:, -1])
    # the rotary frequencies are no buffer, so casting a bf16 emulator leaves them float32: the same rotation
    assert not list(mix.buffers())
    x = torch.randn(1, 40, HIDDEN)
    assert torch.allclose(mix.to(torch.bfloat16)(x.bfloat16()).float(), mix.float()(x), atol=0.1)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_the_data_owner_rebuilds_a_mixing_emulator_from_the_file(tmp_path, family: str):
    path = tmp_path / "emu.safetensors"
    model, info = _build(family, path)
    assert info.plan.mix_heads == 2 and info.plan.mix_head_dim == model_head_dim(model)
    with safe_open(str(path), framework="pt") as f:
        plan = json.loads(f.metadata()["plan"])
    assert plan["mix_heads"] == 2
    stored = load_file(str(path))
    mixers = [k for k in stored if ".harmonizer.mix." in k]
    assert len(mixers) == 4 * len(info.plan.layers_with(Role.HARMONIZER))  # norm w/b, qkv, out per stand-in
    assert all(stored[k].abs().sum() > 0 for k in mixers if k.endswith("mix.out.weight"))  # calibration trained them

    loaded = load_emulator(path)
    rebuilt = loaded.model.state_dict()
    assert set(stored) <= set(rebuilt)  # tied embeddings are stored once
    assert all(torch.equal(rebuilt[k], stored[k]) for k in stored)
    # the data owner trains the adapters through it; the stand-ins, mixers included, stay frozen
    net = loaded.model.train()
    for i, layer in enumerate(decoder_layers(net)):
        layer.requires_grad_(i in loaded.plan.adapter_layers)
    ids = _blocks(2, 3)
    net(ids, labels=ids).loss.backward()
    grads = [p.grad for i in loaded.plan.adapter_layers for p in decoder_layers(net)[i].parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert all(
        p.grad is None for i in loaded.plan.layers_with(Role.HARMONIZER) for p in decoder_layers(net)[i].parameters()
    )


def test_mixing_builds_are_reproducible_and_bf16_files_load(tmp_path):
    _, a = _build("llama", tmp_path / "a.safetensors")
    _, b = _build("llama", tmp_path / "b.safetensors")
    ta, tb = load_file(str(a.path)), load_file(str(b.path))
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    _, half = _build("llama", tmp_path / "h.safetensors", dtype=torch.bfloat16)
    loaded = load_emulator(half.path)
    out = loaded.model(_blocks(2, 4)).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_plans_without_mixing_serialise_as_before_and_bad_values_are_refused():
    model = tiny_model("llama", N_LAYERS, HIDDEN, 0)
    plain = scaleot_plan(SCORES, 2, 0.5, 0.0, model, 8).to_dict()
    assert "mix_heads" not in plain and "mix_head_dim" not in plain
    mixing = scaleot_plan(SCORES, 2, 0.5, 0.0, model, 8, mix_heads=2)
    assert LayerPlan.from_dict(json.loads(json.dumps(mixing.to_dict()))) == mixing
    with pytest.raises(ValueError, match="mix_heads"):
        scaleot_plan(SCORES, 2, 0.5, 0.0, model, 8, mix_heads=-1)
    with pytest.raises(ValueError, match="token mixing"):
        LayerPlan.from_dict({**mixing.to_dict(), "mix_head_dim": 3})
    no_standins = scaleot_plan(SCORES, 2, 0.0, 0.0, model, 8, mix_heads=2)  # alpha 0: nothing to give a mixer
    assert no_standins.mix_heads == 0 and "mix_heads" not in no_standins.to_dict()
