"""Selective Rank Compression: exact rank, Eckart–Young error, attention-only, beta = 0 lossless, per-block
fused q/k/v."""

import itertools

import pytest
import torch

from model_owner_server.scaleot.emulator import build_emulator, scaleot_plan
from scaleot_samples.tiny import FAMILIES, tiny_model
from shared.architectures import decoder_layers, family_for, projection_blocks
from shared.layer_plan import Role
from shared.src import (
    ConcatLinear,
    LowRankLinear,
    RankReducedLinear,
    projection_full_ranks,
    projection_weight,
    src_rank,
)


@pytest.mark.parametrize("beta", [0.1, 0.25, 0.5, 0.8, 0.95])
def test_low_rank_keeps_exact_rank_and_error_is_discarded_spectrum(beta):
    torch.manual_seed(0)
    w = torch.randn(48, 40, dtype=torch.float64)
    full = min(w.shape)
    k = src_rank(full, beta)
    assert k == max(1, round((1 - beta) * full))
    lr = LowRankLinear.from_weight(w, None, k)
    approx = lr.dense_weight()
    assert lr.rank == k and torch.linalg.matrix_rank(approx).item() == k
    s = torch.linalg.svdvals(w)
    err = torch.linalg.matrix_norm(w - approx) ** 2
    assert torch.allclose(err, (s[k:] ** 2).sum(), rtol=1e-8, atol=1e-10)


def test_low_rank_forward_matches_dense_with_bias():
    torch.manual_seed(0)
    w, b = torch.randn(16, 12), torch.randn(16)
    lr = LowRankLinear.from_weight(w, b, 12)  # full rank: exact up to float error
    x = torch.randn(3, 12)
    assert torch.allclose(lr(x), x @ w.T + b, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_src_touches_only_attention_projections(family):
    model = tiny_model(family, n_layers=4)
    plan = scaleot_plan(torch.tensor([3.0, 0.0, 1.0, 2.0]), 1, 0.0, 0.5, model)
    emu = build_emulator(model, plan)
    fam = family_for(model.config)
    assert plan.ranks and set(plan.ranks) == set(plan.layers_with(Role.FROZEN))  # every kept middle layer
    for i in plan.ranks:
        orig, new = decoder_layers(model)[i], decoder_layers(emu)[i]
        for proj in fam.projections:
            mod = new.get_submodule(proj.path)
            assert isinstance(mod, (LowRankLinear, RankReducedLinear, ConcatLinear))
            w, _ = projection_weight(orig.get_submodule(proj.path), proj)
            parts = mod.parts if isinstance(mod, ConcatLinear) else [mod]
            blocks = projection_blocks(proj, orig, w.shape[0])
            assert len(blocks) == len(parts) == (3 if proj.fused else 1)
            # The planned rank is SRC's round((1 - beta) * full) of each block, and the stored weight has
            # exactly that rank (measured, not read back from the module's own bookkeeping).
            planned = [src_rank(min(len(rows), w.shape[1]), 0.5) for rows in blocks]
            assert plan.ranks[i][proj.path] == planned
            actual = [int(torch.linalg.matrix_rank(p.dense_weight().detach().double(), rtol=1e-4)) for p in parts]
            assert actual == planned, (i, proj.path, actual, planned)
            assert torch.equal(torch.cat(blocks).sort().values, torch.arange(w.shape[0]))  # a partition of the rows
            for rows, p in zip(blocks, parts, strict=True):  # each block's error is its own discarded spectrum
                wb = w[rows].double()
                k = p.rank
                err = torch.linalg.matrix_norm(wb - p.dense_weight().double()) ** 2
                assert torch.allclose(err, (torch.linalg.svdvals(wb)[k:] ** 2).sum(), rtol=1e-4, atol=1e-6)
        # everything that is not an attention projection (FFN, norms) is bit-identical
        attn = tuple(p.path for p in fam.projections)
        orig_sd = {k: v for k, v in orig.state_dict().items() if not k.startswith(attn)}
        new_sd = new.state_dict()
        assert all(torch.equal(v, new_sd[k]) for k, v in orig_sd.items())


@pytest.mark.parametrize("family", FAMILIES)
def test_beta_zero_is_lossless(family):
    model = tiny_model(family, n_layers=4)
    plan = scaleot_plan(torch.tensor([3.0, 0.0, 1.0, 2.0]), 1, 0.0, 0.0, model)
    assert plan.ranks == {}
    emu = build_emulator(model, plan)
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        assert torch.equal(emu(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_full_rank_src_reproduces_the_model(family):
    """Every block kept at full rank: the factored projections (fused q/k/v re-assembled in the family's own
    row order, GPT-NeoX's per-head interleaving included) compute what the original ones did."""
    model = tiny_model(family, n_layers=4)
    plan = scaleot_plan(torch.tensor([3.0, 0.0, 1.0, 2.0]), 1, 0.0, 0.01, model)
    ranks = plan.ranks[1]
    assert all(
        r == full
        for p in family_for(model.config).projections
        for r, full in zip(ranks[p.path], projection_full_ranks(decoder_layers(model)[1], p), strict=True)
    )
    emu = build_emulator(model, plan)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(emu(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-4)


def test_src_rank_rejects_out_of_range_beta():
    with pytest.raises(ValueError, match="beta"):
        src_rank(10, 1.5)


@pytest.mark.parametrize("cls", [LowRankLinear, RankReducedLinear])
def test_both_storages_keep_the_same_rank_k_approximation(cls):
    torch.manual_seed(0)
    w = torch.randn(24, 24, dtype=torch.float64)
    k = src_rank(24, 0.25)
    approx = cls.from_weight(w, None, k).dense_weight()
    s = torch.linalg.svdvals(w)
    assert torch.linalg.matrix_rank(approx).item() == k
    assert torch.allclose(torch.linalg.matrix_norm(w - approx) ** 2, (s[k:] ** 2).sum(), rtol=1e-8)


@pytest.mark.parametrize("family", FAMILIES)
def test_src_never_grows_the_emulator(family):
    model = tiny_model(family, n_layers=4)
    scores = torch.tensor([3.0, 0.0, 1.0, 2.0])
    sizes = [
        sum(p.numel() for p in build_emulator(model, scaleot_plan(scores, 1, 0.0, b, model)).parameters())
        for b in (0.0, 0.1, 0.25, 0.5, 0.8)
    ]
    assert all(a >= b for a, b in itertools.pairwise(sizes)), sizes
    assert sizes[-1] < sizes[0]
