"""Why stage 1's ranking differs between seeds, and whether it matters for transfer (issue 21).

Stage 1's scores of seeds 0 and 1 (`benchmarks/results/transfer.json`) rank SmolLM2's 30 layers with a Spearman
of only 0.49. This script measures each layer's leave-one-out cost on M (the rise of M's Wikipedia loss when that
layer alone is skipped: its input passed on unchanged) and asks:

- where in the ranking the seeds disagree: the mean |rank difference| of the layers in each third of the
  leave-one-out order (the costliest third, the middle, the cheapest), and how far apart the costs of
  neighbouring layers are there;
- how much the α = 0.5 plans of the two seeds differ: the layers each replaces, and the summed leave-one-out
  cost of what they replace;
- and, from `benchmarks/results/transfer_recipes.json`, r of each seed's plan (`transfer_recipes.py
  --committed-stage1 [--stage1-seed 1]`, the same calibration and data-owner recipe).

    .venv/bin/python benchmarks/stage1_stability.py            # SmolLM2-135M: ~3 min on one core
    .venv/bin/python benchmarks/stage1_stability.py --tiny     # seconds; tests/benchmarks/test_stage1_stability.py

Results: benchmarks/results/stage1_stability.{json,md}.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path
from typing import Any

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import (
    DEFAULT_CALIBRATION,
    REPO,
    add_run_args,
    cached_file,
    digest,
    log,
    profile_of,
    stage1,
    start_run,
    write_json,
)  # first: environment

# isort: split
import torch

from benchmarks.results import result_paths
from benchmarks.transfer import PROFILES
from benchmarks.transfer_recipes import DEFAULT_PLAN, calibration_of, plan_name, plan_of
from benchmarks.transfer_report import spearman
from model_owner_server.scaleot.attack import mean_lm_loss
from model_owner_server.scaleot.corpus import corpus_blocks
from model_owner_server.scaleot.emulator import scaleot_roles
from shared.architectures import decoder_layers
from shared.layer_plan import Role, importance_order

RESULT_NAME = "stage1_stability"
N_BLOCKS = 16  # Wikipedia validation blocks for the leave-one-out losses


@torch.no_grad()
def leave_one_out_costs(model: torch.nn.Module, blocks: torch.Tensor) -> tuple[float, list[float]]:
    """(M's loss, the loss rise when each decoder layer alone is skipped): a skipped layer returns its input."""

    def skip(_module: torch.nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
        hidden = args[0] if args else kwargs["hidden_states"]
        return hidden if isinstance(out, torch.Tensor) else (hidden, *out[1:])

    base = mean_lm_loss(model, blocks)
    costs = []
    for layer in decoder_layers(model):
        handle = layer.register_forward_hook(skip, with_kwargs=True)
        try:
            costs.append(mean_lm_loss(model, blocks) - base)
        finally:
            handle.remove()
    return base, costs


def ranks(order: list[int]) -> dict[int, int]:
    """{layer: its place in `order`} (0: first)."""
    return {layer: place for place, layer in enumerate(order)}


def replaced_layers(scores: list[float], n_adapter: int, alpha: float) -> tuple[str, list[int]]:
    """The α plan of `scores` (one letter per layer, as the emulator's plan string) and the layers it replaces."""
    roles = scaleot_roles(scores, n_adapter, alpha)
    return "".join(role.name[0] for role in roles), [i for i, role in enumerate(roles) if role == Role.HARMONIZER]


def stability(scores_by_seed: list[list[float]], costs: list[float], n_adapter: int, alpha: float) -> dict:
    """Where two stage-1 seeds' rankings disagree, measured against the leave-one-out costs."""
    s0, s1 = scores_by_seed[:2]
    # Only the layers a plan may replace: the sandwich's adapters are fixed whatever the scores.
    candidates = [i for i, role in enumerate(scaleot_roles(s0, n_adapter, alpha)) if role != Role.ADAPTER]
    n = len(candidates)
    by_cost = sorted(candidates, key=lambda i: -costs[i])  # costliest first
    r0 = ranks([i for i in importance_order(s0) if i in candidates])
    r1 = ranks([i for i in importance_order(s1) if i in candidates])
    thirds = {}
    for name, part in zip(
        ("costliest", "middle", "cheapest"),
        (by_cost[: n // 3], by_cost[n // 3 : 2 * n // 3], by_cost[2 * n // 3 :]),
        strict=True,
    ):
        sorted_costs = sorted((costs[i] for i in part), reverse=True)
        gaps = [a - b for a, b in itertools.pairwise(sorted_costs)]
        thirds[name] = {
            "layers": part,
            "cost_range": [min(costs[i] for i in part), max(costs[i] for i in part)],
            "median_gap_between_neighbours": sorted(gaps)[len(gaps) // 2] if gaps else None,
            "mean_abs_rank_difference": sum(abs(r0[i] - r1[i]) for i in part) / len(part),
        }
    plans = {}
    for seed, s in enumerate((s0, s1)):
        plan, replaced = replaced_layers(s, n_adapter, alpha)
        plans[f"seed {seed}"] = {
            "plan": plan,
            "replaced": replaced,
            "replaced_loo_cost_sum": sum(costs[i] for i in replaced),
        }
    a, b = set(plans["seed 0"]["replaced"]), set(plans["seed 1"]["replaced"])
    # The plan that replaces the cheapest layers by leave-one-out (the same adapters): a reference point.
    loo_replaced = replaced_layers([float(c) for c in costs], n_adapter, alpha)[1]
    return {
        "spearman_with_loo": {"seed 0": spearman(s0, costs), "seed 1": spearman(s1, costs)},
        "candidates": candidates,
        "thirds": thirds,
        "plans": plans,
        "replaced_by_both": sorted(a & b),
        "replaced_by_one": sorted(a ^ b),
        "loo_plan": {"replaced": loo_replaced, "replaced_loo_cost_sum": sum(costs[i] for i in loo_replaced)},
    }


def seed_agreement(scores_by_seed: list[list[float]], candidates: list[int]) -> dict:
    """Spearman between every pair of seeds, and, with four or more seeds, between the mean ranks of two disjoint
    pairs (0, 1) and (2, 3): how stable a stage 1 averaged over two seeds would be. "all_layers" is the issue's
    figure (the whole ranking); "replaceable" leaves out the sandwich's fixed adapters, which every seed puts near
    the top and which raise the agreement without deciding anything."""
    out: dict[str, Any] = {}
    for label, sub in (
        ("all_layers", scores_by_seed),
        ("replaceable", [[s[i] for i in candidates] for s in scores_by_seed]),
    ):
        n = len(sub)
        part: dict[str, Any] = {
            "pairs": {f"{a}-{b}": spearman(sub[a], sub[b]) for a in range(n) for b in range(a + 1, n)}
        }
        if n >= 4:
            ranked = [torch.tensor(x).argsort().argsort().double() for x in sub]
            first, second = ((ranked[0] + ranked[1]) / 2).tolist(), ((ranked[2] + ranked[3]) / 2).tolist()
            part["mean_of_0_1_vs_mean_of_2_3"] = spearman(first, second)
        out[label] = part
    return out


def measured_r(results_dir: Path) -> dict[str, list[dict]]:
    """r of the default recipe on each stage-1 seed's plan, from transfer_recipes.json (Task A, α = 0.5)."""
    path = results_dir / "transfer_recipes.json"
    if not path.is_file():
        return {}
    out: dict[str, list[dict]] = {}
    plans = {  # the tags transfer_recipes.setup gives these plans' rows
        DEFAULT_PLAN: "seed 0",
        plan_name("sandwich", 4, stage1_seed=1): "seed 1",
        plan_name("sandwich", 4, scores_file=f"{RESULT_NAME}.json"): "leave-one-out",  # --plan-scores this file
    }
    for row in json.loads(path.read_text())["rows"]:
        seed = plans.get(plan_of(row))
        if seed and row["variant"] in ("default", "probe") and calibration_of(row) == DEFAULT_CALIBRATION:
            out.setdefault(seed, []).append(
                {
                    "steps": row["steps"],
                    "seed": row["seed"],
                    "r": row["r"],
                    "sha256": row["emulator"]["sha256"],
                    "ppl_ratio": row["emulator"]["fidelity"]["ppl_ratio"],
                }
            )
    return out


def r_cell(rows: list[dict]) -> str:
    """A plan's measured r, grouped by emulator build (another session's rebuild differs slightly)."""
    builds: dict[str, list[dict]] = {}
    for r in rows:
        builds.setdefault(r["sha256"], []).append(r)
    txt = "<br>".join(
        f"build {sha[:8]} (ppl ratio {rs[0]['ppl_ratio']:.2f}): "
        + ", ".join(
            f"{r['steps']} steps seed {r['seed']}: {r['r']:.3f}"
            for r in sorted(rs, key=lambda r: (r["steps"], r["seed"]))
        )
        for sha, rs in builds.items()
    )
    return txt or "not measured"


def markdown(res: dict) -> str:
    st, agree = res["stability"], res["seed_agreement"]
    lines = [
        f"M's Wikipedia loss {res['base_loss']:.4f} over {res['n_blocks']} blocks; Spearman between the two seeds' "
        f"scores {agree['all_layers']['pairs']['0-1']:.2f}; with the leave-one-out costs: seed 0 "
        f"{st['spearman_with_loo']['seed 0']:.2f}, seed 1 {st['spearman_with_loo']['seed 1']:.2f}; between the seeds "
        f"over the {len(st['candidates'])} layers a plan may replace: {agree['replaceable']['pairs']['0-1']:.2f}.",
        "",
        "| Third of the replaceable layers, by leave-one-out cost | Layers | Cost range (nats) | Median gap between neighbours | "
        "Mean rank difference between seeds |",
        "|---|---|---|---|---|",
    ]
    for name, t in st["thirds"].items():
        gap = t["median_gap_between_neighbours"]
        lines.append(
            f"| {name} | {', '.join(map(str, t['layers']))} | {t['cost_range'][0]:.3f}–{t['cost_range'][1]:.3f} | "
            f"{'–' if gap is None else f'{gap:.3f}'} | {t['mean_abs_rank_difference']:.1f} |"
        )
    lines += [
        "",
        "| α = 0.5 plan | Layers replaced | Their summed leave-one-out cost | r (Task A) |",
        "|---|---|---|---|",
    ]
    for seed, p in st["plans"].items():
        r_txt = r_cell(res["measured_r"].get(seed, []))
        lines.append(f"| {seed}: `{p['plan']}` | {p['replaced']} | {p['replaced_loo_cost_sum']:.3f} | {r_txt} |")
    lines.append(
        f"| the cheapest by leave-one-out | {st['loo_plan']['replaced']} | "
        f"{st['loo_plan']['replaced_loo_cost_sum']:.3f} | {r_cell(res['measured_r'].get('leave-one-out', []))} |"
    )
    for label, part in agree.items():
        lines += [
            "",
            f"Spearman between stage-1 seeds ({label.replace('_', ' ')}): "
            + ", ".join(f"{k}: {v:.2f}" for k, v in part["pairs"].items())
            + (
                f"; between the mean ranks of seeds 0, 1 and of seeds 2, 3: {part['mean_of_0_1_vs_mean_of_2_3']:.2f}"
                if "mean_of_0_1_vs_mean_of_2_3" in part
                else ""
            )
            + ".",
        ]
    lines.append("")
    lines.append(
        f"Replaced by both seeds' plans: {st['replaced_by_both']}; by one only: {st['replaced_by_one']}. "
        f"Leave-one-out cost per layer (nats): "
        + ", ".join(f"{i}: {c:.3f}" for i, c in enumerate(res["loo_costs"]))
        + "."
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_args(p, {"tiny": "a random-init tiny model and made-up scores (seconds; the test)"})
    p.add_argument(
        "--stage1-seeds",
        type=int,
        nargs="*",
        default=[],
        help="also run stage 1 with these seeds (cached under --work-dir) and compare all seeds' rankings",
    )
    p.add_argument(
        "--stage1-only", action="store_true", help="only run (or find cached) the --stage1-seeds; write nothing"
    )
    args = p.parse_args(argv)
    profile = profile_of(args)
    budget = PROFILES[profile]
    run = start_run(args, budget)
    extra = [
        stage1(run.model, run.tok, run.model_id, run.files, budget, seed, run.work)[1]["scores"]
        for seed in args.stage1_seeds
    ]
    if args.stage1_only:
        return
    _, blocks = corpus_blocks(run.tok, run.files["wiki_train"], budget.seq_len, val_corpus=run.files["wiki_val"])
    blocks = blocks[:N_BLOCKS]
    n = len(decoder_layers(run.model))
    if profile == "tiny":  # no stored stage 1 for the tiny model: two seeds of made-up scores
        scores_by_seed = [torch.randn(n, generator=torch.Generator().manual_seed(s)).tolist() for s in (0, 1)]
    else:
        scores_by_seed = json.loads((REPO / "benchmarks" / "results" / "transfer.json").read_text())["stage1"][
            "scores_by_seed"
        ]
    log(f"leave-one-out over {n} layers on {len(blocks)} blocks")
    # cached: the same blocks of the same M give the same costs (2: measured with attack.mean_lm_loss)
    key = digest(["loo", 2, run.model_id, blocks.tolist()])
    loo = cached_file(
        run.work / "rows" / f"{key}.json",
        lambda: dict(zip(("base", "costs"), leave_one_out_costs(run.model, blocks), strict=True)),
        ndigits=None,
    )
    base, costs = loo["base"], loo["costs"]
    if not all(math.isfinite(c) for c in costs):
        raise SystemExit(f"a leave-one-out loss is not finite: {costs}")
    results_dir = Path(args.results_dir)
    res = {
        "model": run.model_id,
        "base_loss": base,
        "n_blocks": len(blocks),
        "loo_costs": costs,
        "stability": stability(scores_by_seed, costs, budget.n_adapter, 0.5),
        "stage1_seeds": [0, 1, *args.stage1_seeds],
        "measured_r": measured_r(results_dir) if profile != "tiny" else {},
    }
    res["seed_agreement"] = seed_agreement([*scores_by_seed, *extra], res["stability"]["candidates"])
    json_path, md_path, _ = result_paths(results_dir, RESULT_NAME, profile)
    write_json(json_path, res)
    md_path.write_text(markdown(res))
    log(md_path.read_text())


if __name__ == "__main__":
    main()
