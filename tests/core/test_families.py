"""Every registered family end to end on a tiny random-init model saved as a normal HF folder: stage 1
(importance), stage 2 (calibrated emulator with SRC), emulator file round trip, a training step on the
emulator, and plug-in into the full model. The per-family exactness identities (plug-in of an unchanged
adapter, file round trip at several betas, SRC per q/k/v block) run over the same FAMILIES in
test_core_identities.py and test_src.py."""

import pytest
import torch

from model_owner_server.scaleot.calibrate import CalibrationConfig
from model_owner_server.scaleot.emulator import make_emulator
from model_owner_server.scaleot.importance import ImportanceConfig, estimate_importance
from model_owner_server.scaleot.model_io import load_causal_lm
from model_owner_server.scaleot.plugin import plug_in
from scaleot_samples.tiny import FAMILIES, save_tiny_model_dir
from shared.adapter import adapter_spec, extract_adapter
from shared.architectures import decoder_layers, family_for
from shared.emulator_file import load_emulator
from shared.layer_plan import Role
from shared.modules import HarmonizerLayer
from shared.src import ConcatLinear

BLOCKS = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", FAMILIES)
def test_family_through_stage1_stage2_file_training_and_plugin(tmp_path, family):
    model, tok = load_causal_lm(save_tiny_model_dir(tmp_path / family, family, n_layers=6, hidden=32))
    fam = family_for(model.config)
    result = estimate_importance(
        model,
        BLOCKS[:6],
        BLOCKS[6:],
        ImportanceConfig(steps=4, batch_size=2, rl_interval=2, n_candidates=2, bottleneck=8),
    )
    assert result.scores.shape == (6,) and torch.isfinite(result.scores).all()
    assert any(not torch.equal(h.up.weight, torch.zeros_like(h.up.weight)) for h in result.harmonizers.values())

    info = make_emulator(
        model,
        tok,
        result,
        2,
        0.5,
        0.5,
        tmp_path / "emu.safetensors",
        calibration=CalibrationConfig(steps=2),
        calibration_blocks=BLOCKS[:6],
        fidelity_blocks=BLOCKS[6:],
    )
    plan = info.plan
    assert len(plan.adapter_layers) == 2 and len(plan.layers_with(Role.HARMONIZER)) == 2
    assert set(plan.ranks) == set(plan.layers_with(Role.FROZEN)) and info.extra["fidelity"] is not None
    assert info.n_params < info.extra["full_model_params"]

    emu = load_emulator(info.path)
    layers = decoder_layers(emu.model)
    assert all(isinstance(layers[i], HarmonizerLayer) for i in plan.layers_with(Role.HARMONIZER))
    frozen = plan.layers_with(Role.FROZEN)[0]
    fused = [p for p in fam.projections if p.fused]
    assert all(isinstance(layers[frozen].get_submodule(p.path), ConcatLinear) for p in fused)
    assert adapter_spec(emu.model, plan.adapter_layers) == adapter_spec(model, plan.adapter_layers)

    # The data owner's side: a gradient step on the adapter layers of the emulator rebuilt from the file.
    emu.model.requires_grad_(False)
    params = [p for i in plan.adapter_layers for p in layers[i].parameters()]
    for p in params:
        p.requires_grad_(True)
    ids = BLOCKS[:2]
    out = emu.model(input_ids=ids, labels=ids, use_cache=False)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    with torch.no_grad():
        for p in params:
            p -= 1e-2 * p.grad

    # Plug-in: the tuned adapter goes into the full model; only its layers change, and they change the output.
    tuned = extract_adapter(emu.model, plan.adapter_layers)
    patched = plug_in(model, tuned, plan.adapter_layers)
    with torch.no_grad():
        before, after = model(input_ids=ids).logits, patched(input_ids=ids).logits
    assert torch.isfinite(after).all() and not torch.equal(before, after)
    psd = patched.state_dict()
    assert all(torch.equal(psd[k], v) == (k not in tuned) for k, v in model.state_dict().items())
