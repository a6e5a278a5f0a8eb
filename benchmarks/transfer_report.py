"""benchmarks/transfer.py's summary: r per emulator with its spread over seeds, the targets it is judged on, and
the markdown table."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


# isort: split
import torch

# ---------------------------------------------------------------- summary


def spearman(a: list[float], b: list[float]) -> float | None:
    if len(a) < 3:
        return None
    ra = torch.tensor(a).argsort().argsort().double()
    rb = torch.tensor(b).argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def summarise(rows: list[dict], budget: Any) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["emulator"], r["steps"]), []).append(r)
    out = []
    for (task, emu, steps), rs in groups.items():
        vals = [r["r"] for r in rs if r["r"] is not None]
        mean = sum(vals) / len(vals) if vals else None
        spread = (max(vals) - min(vals)) / 2 if len(vals) > 1 else None
        avg = {
            k: sum(r[k] for r in rs) / len(rs)
            for k in ("plug_in", "reference", "emulator_zero_shot", "emulator_ft", "privacy_gap")
        }
        ems = [r["exact_match"] for r in rs if r.get("exact_match")]
        exact = {k: sum(e[k] for e in ems) / len(ems) for k in ems[0]} if ems else None
        out.append(
            {
                "task": task,
                "emulator": emu,
                "steps": steps,
                "seeds": [r["seed"] for r in rs],
                "r_mean": mean,
                "r_spread": spread,
                "r_values": vals,
                "plug_in": avg["plug_in"],
                "reference": avg["reference"],
                "zero_shot": rs[0]["zero_shot"],
                "emulator_zero_shot": avg["emulator_zero_shot"],
                "emulator_ft": avg["emulator_ft"],
                "privacy_gap": avg["privacy_gap"],
                "plan": rs[0]["plan"],
                "adapter_layers": rs[0]["adapter_layers"],
                "size_ratio": rs[0]["size_ratio"],
                "fidelity": rs[0]["fidelity"],
                "exact_match": exact,  # Task C: mean over seeds of zero_shot / plug_in / reference / emulator_ft
            }
        )
    return out


def _beats(a: dict | None, b: dict | None) -> bool | None:
    """a's mean r above b's by more than the two spreads together (seed noise)."""
    if not a or not b or a["r_mean"] is None or b["r_mean"] is None:
        return None
    noise = (a["r_spread"] or 0) + (b["r_spread"] or 0)
    return a["r_mean"] - b["r_mean"] > noise


def targets(summary: list[dict], stage1_spearman: float | None, stage1_s: float, budget: Any) -> list[dict]:
    s = {(x["task"], x["emulator"], x["steps"]): x for x in summary}
    ft = budget.ft_steps
    longs = budget.long_ft_steps
    out = []

    def add(what: str, measured: str, met: bool | None) -> None:
        out.append(
            {"target": what, "measured": measured, "status": None if met is None else "met" if met else "missed"}
        )

    def fmt(x: dict | None) -> str:
        if not x or x["r_mean"] is None:
            return "–"
        return f"{x['r_mean']:.2f}" + (f" ± {x['r_spread']:.2f}" if x["r_spread"] is not None else "")

    for alpha, floor in (("0.25", 0.7), ("0.5", 0.5)):
        x = s.get(("shakespeare", f"scaleot_a{alpha}", ft))
        add(
            f"Task A: r ≥ {floor} at α = {alpha}",
            fmt(x),
            None if not x or x["r_mean"] is None else x["r_mean"] >= floor,
        )
        for base in ("ot", "crash"):
            b = s.get(("shakespeare", f"{base}_a{alpha}", ft))
            add(
                f"Task A α = {alpha}: ScaleOT r above {'OT LayerDrop' if base == 'ot' else 'CRaSh sharing'} by more "
                "than the seed spread",
                f"{fmt(x)} vs {fmt(b)}",
                _beats(x, b),
            )
        lx = s.get(("shakespeare", f"scaleot_a{alpha}", longs))
        if lx:
            add(
                f"Task A α = {alpha}: with {longs} data-owner steps the plug-in still beats zero-shot",
                f"plug-in {lx['plug_in']:.2f} vs zero-shot {lx['zero_shot']:.2f} (r {fmt(lx)})",
                lx["plug_in"] < lx["zero_shot"],
            )
    b5 = s.get(("analogy", "scaleot_a0.5", ft))
    add("Task B: r ≥ 0.5 at α = 0.5", fmt(b5), None if not b5 or b5["r_mean"] is None else b5["r_mean"] >= 0.5)
    for base in ("ot", "crash"):
        add(
            f"Task B: ScaleOT r above {'OT LayerDrop' if base == 'ot' else 'CRaSh sharing'} by more than the spread",
            f"{fmt(b5)} vs {fmt(s.get(('analogy', f'{base}_a0.5', ft)))}",
            _beats(b5, s.get(("analogy", f"{base}_a0.5", ft))),
        )
    c5 = s.get(("instruction", "scaleot_a0.5", ft))
    if c5:
        add(
            "Task C (instruction tuning): r ≥ 0.6 at α = 0.5",
            fmt(c5),
            None if c5["r_mean"] is None else c5["r_mean"] >= 0.6,
        )
    a5 = s.get(("shakespeare", "scaleot_a0.5", ft))
    if a5:
        add(
            "Task A privacy gap (plug-in − emulator FT) ≥ 0.5 nats",
            f"{a5['privacy_gap']:.2f} nats",
            a5["privacy_gap"] >= 0.5,
        )
    if b5:
        add("Task B privacy gap ≥ 10 points", f"{b5['privacy_gap']:.1f} pts", b5["privacy_gap"] >= 10)
    for beta in ("0.5", "0.8"):
        x = s.get(("shakespeare", f"scaleot_a0.5_b{beta}", ft))
        if x and a5:
            move = x["plug_in"] / a5["plug_in"] - 1
            add(
                f"SRC β = {beta}: privacy gap widens, plug-in moves < 1%",
                f"gap {a5['privacy_gap']:.2f} → {x['privacy_gap']:.2f} nats; plug-in {move:+.1%}",
                x["privacy_gap"] > a5["privacy_gap"] and abs(move) < 0.01,
            )
    add(
        "Stage-1 ranking stable across 2 seeds (Spearman ≥ 0.6)",
        "–" if stage1_spearman is None else f"{stage1_spearman:.2f}",
        None if stage1_spearman is None else stage1_spearman >= 0.6,
    )
    add("Stage 1 ≤ 15 min on this machine", f"{stage1_s / 60:.1f} min", stage1_s <= 900)
    return out


def markdown(result: dict) -> str:
    meta, summary = result["meta"], result["summary"]
    lines = [
        f"Profile `{meta['profile']}` on {meta['model']}, {meta['torch_threads']} threads; wall time "
        f"{meta['seconds'] / 60:.1f} min (compute incl. cached parts {meta['compute_seconds'] / 60:.1f} min). "
        f"Data-owner recipe: the client's defaults (AdamW lr 1e-4, cosine), {meta['budget']['ft_steps']} steps "
        f"(long rows {meta['budget']['long_ft_steps']}), seeds {list(meta['budget']['seeds'])} for the main rows. "
        f"r = (zero-shot − plug-in) / (zero-shot − the same layers tuned in M), in eval loss for Task A and "
        f"accuracy for Task B, the responses' loss for Task C; ± is half the range over seeds.",
        "",
    ]
    for task, title in (
        ("shakespeare", "Task A: Shakespeare (perplexity; r on eval loss)"),
        ("analogy", "Task B: analogies (accuracy)"),
        ("instruction", "Task C: instruction tuning, chatterbot-corpus (response perplexity; r on response loss)"),
    ):
        rows = [x for x in summary if x["task"] == task]
        if not rows:
            continue
        acc = task == "analogy"
        f = (lambda v: f"{v:.1%}") if acc else (lambda v: f"{v:.2f}")
        lines += [
            f"#### {title}",
            "",
            "| Emulator | Steps | Seeds | r | Plug-in | Same layers in M | Zero-shot M | Emulator ZS | Emulator FT | "
            "Privacy gap | Size / M | ppl ratio | grad cos | Plan |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for x in rows:
            fid = x["fidelity"] or {}
            r = (
                "–"
                if x["r_mean"] is None
                else f"{x['r_mean']:.2f}" + (f" ± {x['r_spread']:.2f}" if x["r_spread"] is not None else "")
            )
            gap = f"{x['privacy_gap']:.1f} pts" if acc else f"{x['privacy_gap']:.2f} nats"
            ezs = (
                f(x["emulator_zero_shot"]) if acc or x["emulator_zero_shot"] < 1e4 else f"{x['emulator_zero_shot']:.3g}"
            )
            lines.append(
                f"| {x['emulator']} | {x['steps']} | {len(x['seeds'])} | {r} | {f(x['plug_in'])} | "
                f"{f(x['reference'])} | {f(x['zero_shot'])} | {ezs} | {f(x['emulator_ft'])} | {gap} | "
                f"{x['size_ratio']:.0%} | {fid.get('ppl_ratio', '–')} | {fid.get('grad_cosine', '–')} | "
                f"`{x['plan']}` |"
            )
        lines.append("")
        ems = [x for x in rows if x.get("exact_match")]
        if ems:
            lines += [
                "Exact match of greedy answers to held-out trivia prompts (SQuAD normalisation):",
                "",
                "| Emulator | Steps | Zero-shot M | Plug-in | Same layers in M | Emulator FT |",
                "|---|---|---|---|---|---|",
            ]
            for x in ems:
                e = x["exact_match"]
                cells = " | ".join(
                    f"{e[k]:.1%}" if k in e else "–" for k in ("zero_shot", "plug_in", "reference", "emulator_ft")
                )
                lines.append(f"| {x['emulator']} | {x['steps']} | {cells} |")
            lines.append("")
    pred = result["fidelity_predicts_r"]
    lines += [
        f"Which fidelity figure predicts r (Spearman across the Task A {meta['budget']['ft_steps']}-step rows): "
        f"perplexity ratio {_n(pred.get('ppl_ratio'))} (a lower ratio should mean a higher r: negative is "
        f"predictive), adapter-gradient cosine {_n(pred.get('grad_cosine'))} (positive is predictive).",
        "",
        f"Stage 1: {result['stage1']['seconds'] / 60:.1f} min for seed 0 "
        f"({result['stage1']['config']['warmup_steps']} warm-up + {result['stage1']['config']['steps']} DL steps, "
        f"RL every {result['stage1']['config']['rl_interval']}); harmonizers "
        f"{result['stage1']['harmonizer_fraction']:.2%} of M; ranking (seed 0) {result['stage1']['ranking']}; "
        f"Spearman between seeds {_n(result['stage1'].get('spearman_between_seeds'))}; "
        f"max |s_i + s_j| mirror check: min over pairs {result['stage1'].get('min_pair_sum')}.",
        "",
        "#### Targets",
        "",
        "| Target | Measured | Status |",
        "|---|---|---|",
    ]
    lines += [f"| {t['target']} | {t['measured']} | {t['status'] or 'n/a'} |" for t in result["targets"]]
    return "\n".join(lines) + "\n"


def _n(v: float | None) -> str:
    return "–" if v is None else f"{v:+.2f}"
