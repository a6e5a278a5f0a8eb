"""Recovery attacks on an emulator (model_owner_server/scaleot/attack.py) on a tiny model: what each attack
trains, that it is deterministic for a seed, that densify keeps the function, and that healing really
lowers the attacker's loss on its public text."""

import pytest
import torch

from model_owner_server.scaleot.attack import AttackConfig, densify, heal, mean_lm_loss
from model_owner_server.scaleot.emulator import make_emulator
from model_owner_server.scaleot.importance import ImportanceConfig, estimate_importance
from scaleot_samples.tiny import byte_tokenizer, tiny_model
from shared.emulator_file import load_emulator
from shared.src import LowRankLinear

GEN = torch.Generator().manual_seed(0)
STAGE1_TEXT = torch.randint(0, 256, (16, 16), generator=GEN)
# The attacker's public text: a repetitive pattern the random tiny model does not know, so healing can learn it.
PATTERN = torch.tensor([(7 * i) % 50 + 60 for i in range(16)])
PUBLIC = torch.stack([PATTERN.roll(k) for k in range(24)])


@pytest.fixture(scope="module")
def emulator_file(tmp_path_factory):
    model, tok = tiny_model("llama", n_layers=6, hidden=32, seed=2), byte_tokenizer()
    imp = estimate_importance(model, STAGE1_TEXT, STAGE1_TEXT, ImportanceConfig(steps=2, rl_interval=2, bottleneck=8))
    path = tmp_path_factory.mktemp("emu") / "emu.safetensors"
    make_emulator(model, tok, imp, 2, 0.5, 0.8, path)  # beta 0.8: low-rank attention factors in frozen layers
    return path


def _fresh(path):
    return load_emulator(path).model


def test_config_is_validated():
    with pytest.raises(ValueError, match="unknown attack"):
        AttackConfig(kind="steal")
    with pytest.raises(ValueError):
        AttackConfig(steps=0)
    assert AttackConfig(kind="heal-all").learning_rate == 1e-4


@pytest.mark.parametrize("kind", ["heal-lora", "heal-all", "densify"])
def test_healing_lowers_the_attackers_public_loss_and_is_deterministic(emulator_file, kind):
    cfg = AttackConfig(kind=kind, steps=12, batch_size=4, lr=3e-3, lora_rank=4, seed=1)
    model_a, res_a = heal(_fresh(emulator_file), PUBLIC[:20], PUBLIC[20:], cfg)
    _model_b, res_b = heal(_fresh(emulator_file), PUBLIC[:20], PUBLIC[20:], cfg)
    assert res_a.loss_after < res_a.loss_before - 0.1, (res_a.loss_before, res_a.loss_after)
    assert res_a.history == res_b.history and res_a.loss_after == res_b.loss_after
    assert res_a.tokens == 12 * 4 * 16 and len(res_a.history) == 12
    assert not any(p.requires_grad for p in model_a.parameters())
    assert "lora" not in " ".join(n for n, _ in model_a.named_parameters())  # LoRA merged back
    assert res_a.to_dict()["config"]["kind"] == kind
    assert (res_a.densified > 0) == (kind == "densify")
    assert mean_lm_loss(model_a, PUBLIC[20:]) == pytest.approx(res_a.loss_after)


def test_densify_keeps_the_function_and_removes_every_factor(emulator_file):
    model = _fresh(emulator_file)
    assert any(isinstance(m, LowRankLinear) for m in model.modules())
    ids = PUBLIC[:2]
    with torch.no_grad():
        before = model(input_ids=ids).logits
        n = densify(model)
        after = model(input_ids=ids).logits
    assert n > 0 and not any(isinstance(m, LowRankLinear) for m in model.modules())
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_no_public_text_is_a_clear_error(emulator_file):
    with pytest.raises(ValueError, match="public text"):
        heal(_fresh(emulator_file), PUBLIC[:0], PUBLIC[20:], AttackConfig(steps=1))
