"""benchmarks/privacy_attack.py's report: the seed spread, each row's verdict, the markdown table and the
privacy-utility frontier under attack (PNG)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


# isort: split

from benchmarks.results import markdown_table, pyplot, update_docs_block


def main_seed(budget: dict[str, Any]) -> int:
    """The data owner's seed of every row: the budget's first seed (result files before issue 24: "seed")."""
    return budget["seeds"][0] if "seeds" in budget else budget["seed"]


def spread(rows: list[dict]) -> dict[str, Any] | None:
    """Run-to-run spread (half the max-min range over seeds) of the figures of the emulator run with several seeds."""
    seeds = [r for r in rows if r["emulator"] == "scaleot_a0.5" and r["task"] == "shakespeare"]
    if len(seeds) < 2:
        return None
    return {
        "emulator": "scaleot_a0.5",
        "seeds": [r["seed"] for r in seeds],
        **{
            k: round((max(r[k] for r in seeds) - min(r[k] for r in seeds)) / 2, 4)
            for k in ("residual_gap", "gap_before_attack", "plug_in_gain")
        },
    }


def verdict(row: dict, noise: float) -> str:
    """Whether the attacker's copy stays worse than what the model owner serves; the gap is what protects M
    whether or not this task's fine-tune moved the plug-in beyond the noise (then it is said too)."""
    if row["residual_gap"] > noise:
        text = "gap kept"
    elif row["residual_gap"] < -noise:
        text = "**attacker beats the plug-in**"
    else:
        text = "**gap closed** (within noise)"
    return text + ("; plug-in gain within noise" if row["plug_in_gain"] <= noise else "")


def summary(rows: list[dict], noise: float) -> list[str]:
    """One plain sentence per verdict: which emulators keep a gap after the strongest attack and which do not."""
    kept = [r["emulator"] for r in rows if r["residual_gap"] > noise]
    lost = [r["emulator"] for r in rows if r["residual_gap"] <= noise]
    lines = []
    if kept:
        lo = min(r["residual_gap"] for r in rows if r["residual_gap"] > noise)
        lines.append(f"Gap kept after the best attack (≥ {lo:+.2f}): {', '.join(kept)}.")
    lines.append(f"Gap closed or reversed by the attacker: {', '.join(lost)}." if lost else "No attack closed the gap.")
    return lines


# ---------------------------------------------------------------- report


def share_cell(share: float | None, plug_in_gain: float, noise: float) -> str:
    """The attacker's share of the plug-in's gain; a share of a gain smaller than the noise means nothing."""
    return "–" if share is None or plug_in_gain <= noise else f"{share:.2f}"


def markdown(result: dict) -> str:
    meta, b = result["meta"], result["meta"]["budget"]
    noise = result["noise"]
    lines = [
        f"### Privacy under attack ({meta['model']}, {meta['profile']} profile, "
        f"attacker's public text: {result['budgets']['public_corpus']})",
        "",
        f"Data owner: {b['ft_steps']} steps × {b['text_batch']} × {b['seq_len']} tokens of Shakespeare "
        f"({result['budgets']['task_tokens']:,} tokens). Attacker: each attack trains {b['attack_steps']} steps × "
        f"{b['attack_batch']} × {b['seq_len']} = {result['budgets']['attack_tokens']:,} tokens of public text "
        f"({result['budgets']['public_corpus'].split(' (')[0]}; "
        f"{result['budgets']['attack_tokens'] / result['budgets']['task_tokens']:.0f}× the task budget, "
        f"{result['budgets']['attack_share_of_stage1_tokens']:.0%} of stage 1's training tokens), then the same "
        f"task fine-tune. Seed {main_seed(b)}; a gap within ±{noise:.3f} nats counts as closed "
        + (
            f"(the larger of 0.02 and twice the residual gap's spread over seeds {result['spread']['seeds']} "
            f"on ScaleOT α=0.5, {result['spread']['residual_gap']:.3f})."
            if result["spread"]
            else "(0.02; no seed spread measured in this profile)."
        ),
        f"Compute time {meta['compute_seconds'] / 60:.0f} min from scratch (stage 1, emulator builds and every row, "
        f"each timed when it ran; this invocation {meta['seconds'] / 60:.0f} min; {meta['torch_threads']} torch "
        f"threads, {meta['device']}, load average {meta.get('load_average', 0):.1f} at the end).",
        attack_cost(result),
        "",
    ]
    for task in sorted({r["task"] for r in result["rows"]}):
        rows = [r for r in result["rows"] if r["task"] == task and r["seed"] == main_seed(b)]
        unit = "nats" if rows[0]["metric"] == "perplexity" else "points"
        lines += [f"Task {task} ({rows[0]['metric']}; zero-shot M {rows[0]['zero_shot']:.4g}):", ""]
        attacks = [a for a in b["attacks"] if any(a in r["attackers"] for r in rows)]
        header = [
            "emulator",
            "size of M",
            "plug-in",
            "emulator FT",
            *[f"after {a}" for a in attacks],
            f"gap before ({unit})",
            f"residual gap ({unit})",
            "attacker's share of the gain",
            "verdict",
        ]
        body = []
        for r in rows:
            att = [f"{r['attackers'][a]['attacker']:.4g}" if a in r["attackers"] else "= heal-all" for a in attacks]
            share = share_cell(r["share_of_gain"], r["plug_in_gain"], noise)
            body.append(
                [
                    r["emulator"],
                    f"{r['size_ratio']:.0%}",
                    f"{r['plug_in']:.4g}",
                    f"{r['emulator_ft']:.4g}",
                    *att,
                    f"{r['gap_before_attack']:+.3f}",
                    f"{r['residual_gap']:+.3f}" + ("" if r.get("attack_helped", True) else " ¹"),
                    share,
                    verdict(r, noise),
                ]
            )
        lines += [*markdown_table(header, body), ""]
        if not all(r.get("attack_helped", True) for r in rows):
            lines += [
                "¹ no attack helped: every healed copy fine-tuned worse than the honest emulator FT, so the attacker "
                "keeps that and the residual gap is the gap before.",
                "",
            ]
        lines += [*summary(rows, noise), ""]
        lines += longer_attacks(result, rows, unit)
    return "\n".join(lines) + "\n"


def longer_attacks(result: dict, rows: list[dict], unit: str) -> list[str]:
    """The best attack rerun with more public text on one emulator, next to the sweep's own budget."""
    row = next((r for r in rows if r.get("longer_attacks")), None)
    if row is None:
        return []
    b, task_tokens = result["budgets"], result["budgets"]["task_tokens"]
    first = {
        "multiple_of_task_tokens": b["attack_tokens"] / task_tokens,
        "steps": result["meta"]["budget"]["attack_steps"],
        "tokens": b["attack_tokens"],
        "attacker": row["attackers"][row["best_attack"]]["attacker"],
        "residual_gap": row["attackers"][row["best_attack"]]["residual_gap"],
        "share_of_gain": row["share_of_gain"] if row.get("attack_helped", True) else None,
        "seconds": row["attackers"][row["best_attack"]]["seconds"],
    }
    body = [
        [
            f"{e['multiple_of_task_tokens']:.0f}×",
            str(e["steps"]),
            f"{e['tokens']:,}",
            f"{e['tokens'] / b['stage1_tokens']:.0%}",
            f"{e['attacker']:.4g}",
            f"{e['residual_gap']:+.3f}",
            share_cell(e["share_of_gain"], row["plug_in_gain"], result["noise"]),
            f"{e['seconds']:.0f}",
        ]
        for e in [first, *row["longer_attacks"]]
    ]
    header = [
        "attacker's public text (× task)",
        "steps",
        "tokens",
        "of stage 1's tokens",
        f"attacker ({row['metric']})",
        f"residual gap ({unit})",
        "share of the gain",
        "seconds",
    ]
    return [
        f"Longer attacks: {row['best_attack']} (the best above) on {row['emulator']} with more public text "
        f"(plug-in {row['plug_in']:.4g}):",
        "",
        *markdown_table(header, body),
        "",
    ]


def attack_cost(result: dict) -> str:
    """The attacks' wall time, also as a share of what stage 1 cost the model owner."""
    secs = [a["seconds"] for r in result["rows"] for a in r["attackers"].values()]
    if not secs:
        return ""
    stage1 = max(result["budgets"]["stage1_seconds"], 1e-9)
    return (
        f"Each attack (healing and the task fine-tune) took {min(secs):.0f}–{max(secs):.0f} s, "
        f"{min(secs) / stage1:.0%}–{max(secs) / stage1:.0%} of stage 1's {stage1:.0f} s."
    )


def plot(result: dict, path: Path) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    rows = [
        r for r in result["rows"] if r["task"] == "shakespeare" and r["seed"] == main_seed(result["meta"]["budget"])
    ]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    for r in rows:
        ot = r["emulator"].startswith("ot_")
        color = (
            "tab:orange"
            if ot
            else {0.0: "tab:blue", 0.5: "tab:green", 0.8: "tab:red"}.get(
                float(r["emulator"].split("_b")[1]) if "_b" in r["emulator"] else 0.0, "tab:gray"
            )
        )
        ax.annotate(
            "",
            (r["residual_gap"], r["plug_in"]),
            (r["gap_before_attack"], r["plug_in"]),
            arrowprops={"arrowstyle": "->", "color": color, "alpha": 0.4},
        )
        ax.plot(r["residual_gap"], r["plug_in"], "s" if ot else "o", color=color, ms=8)
        ax.annotate(
            r["emulator"].replace("scaleot_", "").replace("ot_", "OT "),
            (r["residual_gap"], r["plug_in"]),
            textcoords="offset points",
            xytext=(5, 4),
            fontsize=7,
        )
    ax.axvline(0, color="black", lw=1, ls="--")
    xs = [x for r in rows for x in (r["gap_before_attack"], r["residual_gap"])]
    ax.set_xlim(min(0.0, *xs) - 0.2, max(xs) * 1.08 + 0.2)  # arrows start inside the frame too
    ax.axhline(rows[0]["zero_shot"], color="gray", lw=1, ls=":", label="zero-shot M")
    ax.set_xlabel("residual privacy gap after the best attack (nats; arrows start at the gap before it)")
    ax.set_ylabel("plug-in perplexity (lower is better)")
    ax.set_title(f"Privacy–utility frontier under attack, {result['meta']['model']}", fontsize=10)
    handles = [
        plt.Line2D([], [], marker=m, color=c, ls="", label=label)
        for m, c, label in (
            ("s", "tab:orange", "OT LayerDrop"),
            ("o", "tab:blue", "ScaleOT β=0"),
            ("o", "tab:green", "ScaleOT β=0.5"),
            ("o", "tab:red", "ScaleOT β=0.8"),
        )
    ]
    ax.legend(handles=handles + ax.get_legend_handles_labels()[0][:1], fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- publishing


def render(result: dict, json_path: Path, docs: Path | None = None, marker: str = "privacy-attack") -> str:
    """Verdicts, the markdown table (.md beside the JSON), the PNG, and the docs block when `docs` is given."""
    for r in result["rows"]:
        r["verdict"] = verdict(r, result["noise"])
    md = markdown(result)
    json_path.with_suffix(".md").write_text(md)
    png = plot(result, json_path.with_suffix(".png"))
    result["plot"] = str(png or "")
    if docs is not None:
        figure = f"\n![privacy-utility frontier under attack](../benchmarks/results/{png.name})\n" if png else ""
        update_docs_block(docs, marker, md + figure)
    return md


def main(argv: list[str] | None = None) -> str:
    """Re-render a finished run's report from its JSON (no model is loaded)."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("json", type=Path, help="benchmarks/results/privacy_attack*.json")
    p.add_argument("--docs", type=Path, default=None, help="also replace the block in this file (docs/benchmarks.md)")
    p.add_argument("--marker", default="privacy-attack", help="the docs block's marker")
    args = p.parse_args(argv)
    result = json.loads(args.json.read_text())
    if not result.get("complete"):
        raise SystemExit(f"{args.json} is from an unfinished run; run benchmarks/privacy_attack.py to finish it")
    md = render(result, args.json, args.docs, args.marker)
    print(md)
    return md


if __name__ == "__main__":
    main()
