"""Stage 1 (Dynamic LayerReplace) finds a critical layer and a no-op layer; persistence; progress; seeds."""

import torch

from model_owner_server.scaleot.importance import (ImportanceConfig, estimate_importance, load_importance,
                                                   sample_replacement, save_importance)
from shared.architectures import decoder_layers
from shared.tiny import tiny_model

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


CFG = ImportanceConfig(steps=40, batch_size=8, group_size=3, rl_interval=2, n_candidates=4, lr=1e-4,
                       score_lr=10.0, bottleneck=8, seed=0)


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
    assert all(torch.equal(a.harmonizers[i].up.weight, b.harmonizers[i].up.weight) for i in a.harmonizers)
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


def test_grouped_sampling_replaces_about_half_of_each_group():
    gen = torch.Generator().manual_seed(0)
    scores = torch.zeros(8)
    for _ in range(20):
        r = sample_replacement(scores, 2, 0.5, gen)
        assert all(sum(r[g:g + 2]) == 1 for g in range(0, 8, 2))
    # a very important layer is almost never replaced
    scores[0] = 8.0
    picks = sum(sample_replacement(scores, 2, 0.5, gen)[0] for _ in range(200))
    assert picks < 5
