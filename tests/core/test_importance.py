"""Stage 1 (Dynamic LayerReplace) finds a critical layer and a no-op layer; persistence; progress; seeds."""

import torch

from model_owner_server.scaleot.importance import (
    ImportanceConfig,
    estimate_importance,
    log_prob_grad,
    replace_probabilities,
    sample_replacement,
)
from model_owner_server.scaleot.importance_io import load_importance, save_importance
from scaleot_samples.tiny import tiny_model
from shared.architectures import decoder_layers

CRITICAL, NOOP = 2, 4


def rigged_model():
    """6-layer LLaMA where layer 2 dominates the residual stream and layer 4 does nothing."""
    model = tiny_model("llama", n_layers=6, hidden=32, seed=1)
    layers = decoder_layers(model)
    with torch.no_grad():
        layers[CRITICAL].mlp.down_proj.weight.mul_(30)
        layers[NOOP].self_attn.o_proj.weight.zero_()
        layers[NOOP].mlp.down_proj.weight.zero_()
        model.model.norm.weight.mul_(4)  # peaky predictions so the model's own samples are learnable
    return model


def own_samples(model, n=48, length=24, seed=0):
    """Text the model itself would write: the full model is the best predictor of it."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (n, 1), generator=gen)
    with torch.no_grad():
        for _ in range(length - 1):
            probs = torch.softmax(model(input_ids=ids, use_cache=False).logits[:, -1], -1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=gen)], 1)
    return ids


CFG = ImportanceConfig(steps=40, batch_size=8, rl_interval=2, bottleneck=8, seed=0)  # defaults otherwise


def test_critical_layer_ranks_first_and_noop_ranks_low():
    model = rigged_model()
    data = own_samples(model)
    seen = []
    result = estimate_importance(model, data[:32], data[32:], CFG, progress=seen.append)
    ranking = result.ranking()
    assert ranking[0] == CRITICAL, result.scores
    assert ranking.index(NOOP) >= 3, result.scores
    assert seen[-1].step == CFG.steps and {p.phase for p in seen} == {"dl", "rl"}
    assert len(seen[-1].scores) == 6


def test_model_is_left_unchanged_and_runs_are_reproducible():
    model = tiny_model("llama", n_layers=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    data = torch.randint(0, 256, (16, 12), generator=torch.Generator().manual_seed(0))
    cfg = ImportanceConfig(steps=6, batch_size=4, rl_interval=3, bottleneck=8, seed=3)
    a = estimate_importance(model, data, data, cfg)
    b = estimate_importance(model, data, data, cfg)
    assert torch.equal(a.scores, b.scores)
    assert a.harmonizers and all(
        torch.equal(a.harmonizers[i].up.weight, b.harmonizers[i].up.weight) for i in a.harmonizers
    )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert len(decoder_layers(model)) == 4 and type(decoder_layers(model)[0]).__name__ == "LlamaDecoderLayer"


def test_only_harmonizers_train_and_warmup_and_distillation_run():
    model = tiny_model("gpt2", n_layers=4)
    data = torch.randint(0, 256, (8, 12), generator=torch.Generator().manual_seed(0))
    cfg = ImportanceConfig(steps=3, batch_size=4, rl_interval=3, bottleneck=8, warmup_steps=2, distill_weight=0.5)
    seen = []
    result = estimate_importance(model, data, data, cfg, seen.append)
    assert any(h.up.weight.abs().sum() > 0 for h in result.harmonizers.values())  # they trained
    assert [h["phase"] for h in result.history][:2] == ["warmup", "warmup"]
    assert [p.label for p in seen[:3]] == ["warmup step 1/2", "warmup step 2/2", "dl step 1/3"]
    fractions = [p.fraction for p in seen]
    assert fractions == sorted(fractions) and fractions[0] == 0.2 and fractions[-1] == 1.0


def test_save_and_load_round_trip(tmp_path):
    model = tiny_model("opt", n_layers=4)
    data = torch.randint(0, 256, (8, 12), generator=torch.Generator().manual_seed(0))
    result = estimate_importance(model, data, data, ImportanceConfig(steps=4, rl_interval=2, bottleneck=8))
    save_importance(result, tmp_path)
    loaded = load_importance(tmp_path)
    assert torch.equal(loaded.scores, result.scores)
    x = torch.randn(1, 3, model.config.hidden_size)
    for i, h in result.harmonizers.items():
        assert torch.equal(loaded.harmonizers[i](x), h(x))
    assert loaded.config == result.config


def test_default_settings_rank_across_the_whole_model():
    """Defaults only (but the budget): critical and no-op layers are neighbours, and no pair of scores mirrors."""
    model = tiny_model("llama", n_layers=8, hidden=32, seed=1)
    layers = decoder_layers(model)
    critical, noop = 4, 5
    with torch.no_grad():
        layers[critical].mlp.down_proj.weight.mul_(30)
        layers[noop].self_attn.o_proj.weight.zero_()
        layers[noop].mlp.down_proj.weight.zero_()
        model.model.norm.weight.mul_(4)
    data = own_samples(model, n=64)
    cfg = ImportanceConfig(steps=48, bottleneck=8, seed=0)
    result = estimate_importance(model, data[:48], data[48:], cfg)
    ranking = result.ranking()
    assert ranking[0] == critical, result.scores
    assert ranking.index(noop) >= 4, result.scores
    s = result.scores
    sums = (s[:, None] + s[None, :]).abs() + torch.eye(len(s)) * 1e9
    assert float(sums.min()) > 1e-4, "two scores mirror each other exactly"


def test_policy_has_a_real_log_probability():
    scores = torch.tensor([0.0, 2.0, -1.0], dtype=torch.float64)
    q = replace_probabilities(scores, 0.5)
    assert torch.allclose(q, torch.sigmoid(-scores.double()))
    # d log pi / dS by finite differences of log pi(c) = sum log(q_i if replaced else 1 - q_i)
    config = [True, False, True]

    def logp(sc):
        qq = replace_probabilities(sc, 0.5)
        return sum(float(torch.log(qq[i] if r else 1 - qq[i])) for i, r in enumerate(config))

    eps = 1e-5
    eye = torch.eye(3, dtype=torch.float64)
    numeric = [(logp(scores + eps * eye[i]) - logp(scores - eps * eye[i])) / (2 * eps) for i in range(3)]
    assert torch.allclose(log_prob_grad(scores, 0.5, config), torch.tensor(numeric, dtype=torch.float64), atol=1e-6)


def test_sampling_follows_the_scores():
    gen = torch.Generator().manual_seed(0)
    scores = torch.zeros(8)
    share = sum(sum(sample_replacement(scores, 0.5, gen)) for _ in range(200)) / 1600
    assert 0.45 < share < 0.55
    scores[0] = 8.0  # a very important layer is almost never replaced
    assert sum(sample_replacement(scores, 0.5, gen)[0] for _ in range(200)) < 5


def test_bad_settings_are_refused():
    import pytest

    with pytest.raises(ValueError, match="n_candidates"):
        ImportanceConfig(n_candidates=1)
    with pytest.raises(ValueError, match="replace_fraction"):
        ImportanceConfig(replace_fraction=1.0)
