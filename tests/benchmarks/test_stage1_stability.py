"""benchmarks/stage1_stability.py on the tiny model: the leave-one-out costs are real skips of one layer, and the
stability figures are computed over the layers a plan may replace."""

from __future__ import annotations

import json
import math

import torch

from benchmarks import stage1_stability
from model_owner_server.scaleot.attack import mean_lm_loss
from scaleot_samples.tiny import tiny_model


def test_leave_one_out_skips_exactly_one_layer_and_restores_the_model():
    model = tiny_model("llama", 4, 32, 0).eval()
    blocks = torch.randint(0, model.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))
    before = mean_lm_loss(model, blocks)
    base, costs = stage1_stability.leave_one_out_costs(model, blocks)
    assert base == before == mean_lm_loss(model, blocks)  # every hook removed
    assert len(costs) == 4 and all(math.isfinite(c) and c != 0 for c in costs)
    # Skipping layer 2 by hand (its forward returns its input) gives the same rise.
    layer = model.model.layers[2]
    layer.forward = lambda hidden_states, *a, **k: hidden_states
    try:
        assert math.isclose(mean_lm_loss(model, blocks) - base, costs[2], rel_tol=1e-5)
    finally:
        del layer.forward


def test_stability_compares_the_seeds_on_the_replaceable_layers_only():
    costs = [5.0, 4.0, 0.9, 0.1, 0.5, 0.3, 0.2, 0.8, 3.0, 6.0]  # layers 0, 1, 8, 9 are the sandwich's adapters
    same = [c + 10 for c in costs]
    st = stage1_stability.stability([same, same], costs, n_adapter=4, alpha=0.5)
    assert st["candidates"] == [2, 3, 4, 5, 6, 7]
    agree = stage1_stability.seed_agreement([same, same], st["candidates"])
    assert math.isclose(agree["all_layers"]["pairs"]["0-1"], 1.0) and math.isclose(
        st["spearman_with_loo"]["seed 0"], 1.0
    )
    assert all(t["mean_abs_rank_difference"] == 0 for t in st["thirds"].values())
    assert st["thirds"]["costliest"]["layers"] == [2, 7] and st["thirds"]["cheapest"]["layers"] == [6, 3]
    assert st["plans"]["seed 0"]["replaced"] == [3, 5, 6] == st["loo_plan"]["replaced"] and not st["replaced_by_one"]
    swapped = list(same)
    swapped[2], swapped[7] = swapped[7], swapped[2]  # the two costliest replaceable layers trade places
    st = stage1_stability.stability([same, swapped], costs, n_adapter=4, alpha=0.5)
    assert st["thirds"]["costliest"]["mean_abs_rank_difference"] == 1.0
    assert st["thirds"]["middle"]["mean_abs_rank_difference"] == 0.0


def test_tiny_run_writes_the_tables(tmp_path):
    args = ["--tiny", "--work-dir", str(tmp_path / "work"), "--results-dir", str(tmp_path / "res")]
    stage1_stability.main([*args, "--stage1-seeds", "2", "3"])
    res = json.loads((tmp_path / "res" / "stage1_stability_tiny.json").read_text())
    assert len(res["loo_costs"]) == 8 and set(res["stability"]["thirds"]) == {"costliest", "middle", "cheapest"}
    md = (tmp_path / "res" / "stage1_stability_tiny.md").read_text()
    assert "| seed 0: `AA" in md and "Leave-one-out cost per layer" in md and "seeds 2, 3" in md
    for part in ("all_layers", "replaceable"):
        assert set(res["seed_agreement"][part]["pairs"]) == {"0-1", "0-2", "0-3", "1-2", "1-3", "2-3"}
        assert -1 <= res["seed_agreement"][part]["mean_of_0_1_vs_mean_of_2_3"] <= 1
