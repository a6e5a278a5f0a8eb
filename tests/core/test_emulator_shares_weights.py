"""The emulator build holds M plus only what differs (issue 22, bounded memory).

make_emulator's emulator shares M's tensors wherever the plan keeps them as they are (embeddings, head, final
norm, adapter layers, frozen layers that SRC does not compress) and owns the rest (stand-ins, SRC factors, what
calibration trains, layer-sharing slots). Two things must hold: M is never written (it is the served model), and
the file is exactly what the deep-copy build wrote, here rebuilt in the test as the reference.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from model_owner_server.scaleot import emulator as emulator_module
from model_owner_server.scaleot.calibrate import CalibrationConfig, calibrate_emulator
from model_owner_server.scaleot.emulator import (
    baseline_edge,
    build_emulator,
    layer_sharing_plan,
    make_emulator,
    scaleot_plan,
    uniform_layerdrop_plan,
)
from model_owner_server.scaleot.importance import ImportanceConfig, ImportanceResult
from scaleot_samples.tiny import byte_tokenizer, tiny_model
from shared.architectures import decoder_layers
from shared.emulator_file import save_emulator
from shared.layer_plan import Role
from shared.modules import Harmonizer

N_LAYERS, HIDDEN = 8, 32
SCORES = torch.tensor([0.0, 2.0, -2.0, -1.0, 1.0, 0.0, 0.5, -0.5])
FAMILIES = ["llama", "gpt2", "opt"]


def _importance(model) -> ImportanceResult:
    torch.manual_seed(0)
    hs = {i: Harmonizer(HIDDEN, 8).requires_grad_(False) for i in range(N_LAYERS)}
    for h in hs.values():  # not the identity, so calibration moves them
        torch.nn.init.normal_(h.up.weight, std=0.05)
    return ImportanceResult(SCORES.clone(), hs, ImportanceConfig(steps=1, bottleneck=8), [], 0.0, 0)


def _blocks(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 16), generator=torch.Generator().manual_seed(seed))


def _calibration(kept_lr: float) -> CalibrationConfig:
    return CalibrationConfig(steps=3, batch_size=2, kept_lr=kept_lr, seed=0)


def _make(model, path, method, beta, kept_lr, dtype):
    return make_emulator(
        model,
        byte_tokenizer(),
        _importance(model),
        2 if method == "scaleot" else 4,
        0.5,
        beta,
        path,
        method=method,
        calibration=_calibration(kept_lr),
        calibration_blocks=_blocks(8, 1),
        fidelity_blocks=_blocks(2, 2),
        dtype=dtype,
    )


def _reference(model, path, method, beta, kept_lr, dtype) -> dict[str, torch.Tensor]:
    """What make_emulator wrote before the build shared M's tensors: a deep copy of M, the plan applied, the
    layer-sharing slots loaded with load_state_dict, calibrated, cast to the issued dtype, saved."""
    importance, sources = _importance(model), {}
    if method == "scaleot":
        plan = scaleot_plan(importance.scores, 2, 0.5, beta, model, 8)
    else:
        n_edge = baseline_edge(N_LAYERS, 4, method)
        dropped = (N_LAYERS - 2 * n_edge) // 2
        if method == "uniform_layerdrop":
            plan = uniform_layerdrop_plan(N_LAYERS, dropped, n_edge)
        else:
            plan, sources = layer_sharing_plan(N_LAYERS, dropped, n_edge)
    compute = next(model.parameters()).dtype
    emu = build_emulator(model, plan, importance.harmonizers, standin_dtype=torch.float32, share_weights=False)
    for slot, src in sources.items():
        decoder_layers(emu)[slot].load_state_dict(decoder_layers(model)[src].state_dict())
    calibrate_emulator(model, emu, plan, _blocks(8, 1), _calibration(kept_lr))
    emu.to(dtype or compute)
    save_emulator(emu, plan, byte_tokenizer(), path)
    return load_file(str(path))


CASES = [  # (method, beta, kept_lr, issued dtype, M's dtype)
    ("scaleot", 0.0, 0.0, None, torch.float32),
    ("scaleot", 0.5, 0.0, None, torch.float32),
    ("scaleot", 0.5, 1e-3, None, torch.float32),
    ("scaleot", 0.5, 1e-3, torch.bfloat16, torch.float32),
    ("scaleot", 0.5, 0.0, torch.float16, torch.float32),
    ("scaleot", 0.0, 1e-3, None, torch.bfloat16),
    ("uniform_layerdrop", 0.0, 0.0, None, torch.float32),
    ("layer_sharing", 0.0, 0.0, None, torch.float32),
    ("layer_sharing", 0.0, 1e-3, torch.bfloat16, torch.float32),
]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("method", "beta", "kept_lr", "dtype", "m_dtype"), CASES)
def test_m_is_untouched_and_the_file_is_the_deep_copy_builds(tmp_path, family, method, beta, kept_lr, dtype, m_dtype):
    model = tiny_model(family, N_LAYERS, HIDDEN, 0).to(m_dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    versions = {k: v._version for k, v in model.state_dict().items()}
    _make(model, tmp_path / "new.safetensors", method, beta, kept_lr, dtype)
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) and after[k].dtype == v.dtype for k, v in before.items())
    assert {k: v._version for k, v in after.items()} == versions  # not even rewritten with the same values
    got = load_file(str(tmp_path / "new.safetensors"))
    expected = _reference(model, tmp_path / "ref.safetensors", method, beta, kept_lr, dtype)
    assert got.keys() == expected.keys()
    for k, t in expected.items():
        assert got[k].dtype == t.dtype and torch.equal(got[k], t), k


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _captured_emulator(monkeypatch, model, tmp_path, **kwargs) -> tuple[torch.nn.Module, object]:
    """make_emulator's emulator module as it is saved (after calibration and the cast)."""
    seen = {}
    real = emulator_module.save_emulator

    def capture(emu, plan, *args, **kw):
        seen["emu"], seen["plan"] = emu, plan
        return real(emu, plan, *args, **kw)

    monkeypatch.setattr(emulator_module, "save_emulator", capture)
    make_emulator(
        model,
        byte_tokenizer(),
        _importance(model),
        2,
        0.5,
        0.5,
        tmp_path / "emu.safetensors",
        calibration_blocks=_blocks(8, 1),
        **kwargs,
    )
    return seen["emu"], seen["plan"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kept_lr", [0.0, 1e-3])
def test_the_emulator_shares_what_it_keeps_and_owns_what_it_changes(monkeypatch, tmp_path, family, kept_lr):
    model = tiny_model(family, N_LAYERS, HIDDEN, 0)
    emu, plan = _captured_emulator(monkeypatch, model, tmp_path, calibration=_calibration(kept_lr))
    m_layers, e_layers = decoder_layers(model), decoder_layers(emu)
    m_storages = {_storage(t) for t in model.parameters()}
    # Outside the decoder layers (embeddings, head, final norm): M's own tensors, nothing copied.
    outside = {n: p for n, p in emu.named_parameters() if ".layers." not in n and ".h." not in n}
    assert outside
    m_named = dict(model.named_parameters())
    for n, p in outside.items():
        assert _storage(p) == _storage(m_named[n]), n
        assert p is not m_named[n]  # a Parameter object of its own: flags and casts never reach M
    for i in plan.adapter_layers:  # not trained during the build: shared
        for (n, p), q in zip(e_layers[i].named_parameters(), m_layers[i].parameters(), strict=True):
            assert _storage(p) == _storage(q), (i, n)
    for i in plan.layers_with(Role.HARMONIZER):  # new stand-ins
        assert all(_storage(p) not in m_storages for p in e_layers[i].parameters())
    frozen = plan.layers_with(Role.FROZEN)
    assert frozen and all(plan.ranks[i] for i in frozen)
    for i in frozen:
        m_params = dict(m_layers[i].named_parameters())
        compressed = tuple(f"{path}." for path in plan.ranks[i])
        for n, p in e_layers[i].named_parameters():
            if kept_lr > 0 or n.startswith(compressed):  # trained by calibration, or SRC's new matrices: own
                assert _storage(p) not in m_storages, (i, n)
            else:  # kept as they are (FFN, norms): shared
                assert _storage(p) == _storage(m_params[n]), (i, n)


def test_a_cast_to_the_issued_dtype_leaves_m_in_its_own(monkeypatch, tmp_path):
    model = tiny_model("llama", N_LAYERS, HIDDEN, 0)
    emu, _ = _captured_emulator(monkeypatch, model, tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in emu.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_layer_sharing_slots_hold_copies_of_their_source_layer(monkeypatch, tmp_path):
    model = tiny_model("llama", N_LAYERS, HIDDEN, 0)
    seen = {}
    real = emulator_module.save_emulator

    def capture(emu, plan, *args, **kw):
        seen["emu"] = emu
        return real(emu, plan, *args, **kw)

    monkeypatch.setattr(emulator_module, "save_emulator", capture)
    make_emulator(model, byte_tokenizer(), None, 4, 0.5, 0.0, tmp_path / "e.safetensors", method="layer_sharing")
    _, sources = layer_sharing_plan(N_LAYERS, 2, 2)
    m_layers, e_layers = decoder_layers(model), decoder_layers(seen["emu"])
    for slot, src in sources.items():
        for (n, p), q in zip(e_layers[slot].named_parameters(), m_layers[src].parameters(), strict=True):
            assert torch.equal(p, q), (slot, n)
            # its own copy: neither M's slot layer nor M's source layer is written or aliased
            assert _storage(p) not in {_storage(t) for t in model.parameters()}
        assert not torch.equal(next(m_layers[slot].parameters()), next(e_layers[slot].parameters()))


def test_a_write_into_a_shared_tensor_fails_the_build(monkeypatch, tmp_path):
    """If calibration trained something make_emulator did not give its own storage (here: it is told nothing
    will be trained), the write lands in M and the build refuses to finish rather than return silently."""
    model = tiny_model("llama", N_LAYERS, HIDDEN, 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(emulator_module, "calibration_params", lambda *a, **k: [])
    with pytest.raises(RuntimeError, match=r"wrote into .* of the model's own tensors"):
        _make(model, tmp_path / "e.safetensors", "scaleot", 0.5, 1e-2, None)
    assert not (tmp_path / "e.safetensors").exists()
    assert any(not torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the guard saw a real write


def test_build_emulator_by_default_owns_every_tensor():
    model = tiny_model("llama", N_LAYERS, HIDDEN, 0)
    plan = scaleot_plan(SCORES, 2, 0.5, 0.5, model, 8)
    emu = build_emulator(model, plan, _importance(model).harmonizers)
    m_storages = {_storage(t) for t in (*model.parameters(), *model.buffers())}
    assert all(_storage(t) not in m_storages for t in (*emu.parameters(), *emu.buffers()))
