"""The privacy-utility benchmark's report: the paper's targets as checks on the measured rows, the markdown
tables and the privacy-utility plot."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from benchmarks.harness import SEED, Task, log
from benchmarks.results import pyplot
from data_owner_client.train import TrainConfig

# ---------------------------------------------------------------- targets


def rows_by(records: list[dict], task: str) -> dict[str, dict]:
    return {r["name"]: r for r in records if r["task"] == task}


def check_targets(records: list[dict], stage1: dict, tasks: list[Task]) -> list[dict]:
    """The paper's claims as pass/fail checks on the measured rows ('met' / 'missed'; None when not measurable)."""
    out: list[dict] = []

    def add(target: str, task: str | None, measured: str, met: bool | None) -> None:
        out.append(
            {
                "target": target,
                "task": task,
                "measured": measured,
                "status": None if met is None else ("met" if met else "missed"),
            }
        )

    for task in tasks:
        rows = rows_by(records, task.name)
        s, ot, full = rows.get("scaleot_a0.5_b0"), rows.get("ot_layerdrop"), rows.get("full_ft")
        pct = task.metric == "accuracy"
        if s and full and s["plug_in"] is not None:
            if pct:
                diff = s["plug_in"] - full["full_ft"]
                add(
                    "ScaleOT plug-in within 1 point of full fine-tuning accuracy",
                    task.name,
                    f"{s['plug_in']:.1%} vs {full['full_ft']:.1%} ({diff * 100:+.1f} pts)",
                    diff >= -0.01,
                )
            else:
                rel = s["plug_in"] / full["full_ft"] - 1
                add(
                    "ScaleOT plug-in within 1% of full fine-tuning perplexity",
                    task.name,
                    f"{s['plug_in']:.2f} vs {full['full_ft']:.2f} ({rel:+.1%})",
                    rel <= 0.01,
                )
        if s and ot:
            better = s["plug_in"] > ot["plug_in"] if task.higher_is_better else s["plug_in"] < ot["plug_in"]
            add(
                "ScaleOT plug-in better than OT plug-in",
                task.name,
                f"{fmt_metric(s['plug_in'], task)} vs {fmt_metric(ot['plug_in'], task)}",
                better,
            )
            gs, go = s.get("privacy_gap"), ot.get("privacy_gap")
            unit = "pts" if pct else "nats"
            scale = 100 if pct else 1
            add(
                "ScaleOT privacy gap (plug-in − emulator FT) at least OT's",
                task.name,
                f"{fmt_signed(gs, scale)} vs {fmt_signed(go, scale)} {unit}",
                None if gs is None or go is None else gs >= go,
            )
        for beta in (0.5, 0.8):
            b = rows.get(f"scaleot_a0.5_b{beta:g}")
            if not (s and b):
                continue
            emu_worse = (
                b["emulator_ft"] < s["emulator_ft"] if task.higher_is_better else b["emulator_ft"] > s["emulator_ft"]
            )
            if pct:
                move = b["plug_in"] - s["plug_in"]
                moved, small = f"{move * 100:+.1f} pts", abs(move) < 0.01
            else:
                move = b["plug_in"] / s["plug_in"] - 1
                moved, small = f"{move:+.1%}", abs(move) < 0.01
            add(
                f"SRC β={beta:g} lowers emulator FT quality, plug-in moves < 1{' pt' if pct else '%'}",
                task.name,
                f"emulator FT {fmt_metric(s['emulator_ft'], task)} → {fmt_metric(b['emulator_ft'], task)}; plug-in {moved}",
                emu_worse and small,
            )
    if stage1:
        frac = stage1["trainable_fraction"]
        add(
            "Stage 1 trains < 2% of the parameters",
            None,
            f"{stage1['trainable_params'] / 1e6:.2f} M of {stage1['model_params'] / 1e6:.1f} M ({frac:.2%})",
            frac < 0.02,
        )
    return out


# ---------------------------------------------------------------- reporting


def fmt_metric(v: float | None, task: Task | str) -> str:
    metric = task.metric if isinstance(task, Task) else task
    if v is None:
        return "–"
    if metric == "accuracy":
        return f"{v:.1%}"
    if not math.isfinite(v):
        return "inf"
    return f"{v:,.0f}" if v >= 1000 else f"{v:.2f}"


def fmt_signed(v: float | None, scale: float = 1) -> str:
    return "–" if v is None else f"{v * scale:+.2f}"


def markdown(result: dict, tasks: list[Task]) -> str:
    meta, stage1, kd = result["meta"], result["stage1"], result["ot_distillation"]
    b = meta["budget"]
    lr = TrainConfig(method="full", lr=b["lr"]).learning_rate
    lines = [
        (
            f"Profile `{meta['profile']}` on {meta['model']} ({meta['n_layers']} layers), "
            f"{meta['torch_threads']} torch threads, device {meta['device']}; total wall time "
            f"{meta['seconds'] / 60:.1f} min (this invocation; stage 1 + rows measured: "
            f"{meta.get('compute_seconds', 0) / 60:.1f} min). Fine-tuning budget per row: {b['ft_steps']} optimizer steps, "
            f"seq_len {b['seq_len']}, batch {b['text_batch']} (Task A) / {b['mc_batch']} (Task B), the client's "
            f"recipe (AdamW lr {lr:g}, cosine, 5% warm-up). Eval: first {b['text_eval_blocks']} blocks of the "
            f"held-out work (Task A), first {b['mc_eval_questions']} held-out questions (Task B). Seed {SEED}."
        ),
        "",
    ]
    for task in tasks:
        rows = [r for r in result["rows"] if r["task"] == task.name]
        if not rows:
            continue
        gap_unit = "pts" if task.metric == "accuracy" else "nats"
        lines += [
            f"#### {task.title}",
            "",
            (
                "| Method | N_a | α | β | Emulator params / size | Emulator zero-shot | Emulator FT | Plug-in | "
                f"Full model M | Privacy gap ({gap_unit}) | Trainable params | Train s/step | Row s |"
            ),
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            size = (
                f"{r['emulator_params'] / 1e6:.1f} M / {r['emulator_bytes'] / 2**20:.0f} MiB"
                if r.get("emulator_params")
                else "–"
            )
            if r["method"] == "zero_shot":
                size = f"(M: {meta['model_params'] / 1e6:.1f} M)"
            scale = 100 if task.metric == "accuracy" else 1
            sps = f"{r['train_seconds'] / r['train_steps']:.2f}" if r.get("train_steps") else "–"
            full_model = {"zero_shot": r["zero_shot"], "full_ft": r["full_ft"]}.get(r["method"])
            trainable = f"{r['trainable_params'] / 1e6:.1f} M" if r.get("trainable_params") else "–"
            alpha = "–" if r["alpha"] is None else f"{r['alpha']:g}"
            beta = "–" if r["beta"] is None else f"{r['beta']:g}"
            lines.append(
                f"| {r['label']} | {r['n_adapter'] or '–'} | {alpha} | {beta} | {size} | "
                f"{fmt_metric(r['emulator_zero_shot'], task)} | {fmt_metric(r['emulator_ft'], task)} | "
                f"{fmt_metric(r['plug_in'], task)} | {fmt_metric(full_model, task)} | {fmt_signed(r.get('privacy_gap'), scale)} | "
                f"{trainable} | {sps} | {r['seconds']:.0f} |"
            )
        lines.append("")
        plans = [r for r in rows if r.get("emulator_plan")]
        if plans:
            lines += ["Layer plans (A adapter, H harmonizer, F frozen, f frozen+SRC, . dropped):", "", "```"]
            lines += [f"{r['label']:<24} {r['emulator_plan']}" for r in plans]
            lines += ["```", ""]
    lines += ["#### Cost", "", "| Step | Trainable params | Wall time |", "|---|---|---|"]
    if stage1:
        lines.append(
            f"| ScaleOT stage 1 (Dynamic LayerReplace, {stage1['warmup_steps']} warm-up + {stage1['dl_steps']} DL "
            f"steps, RL every {stage1['rl_interval']}, batch {stage1['batch_size']}×{stage1['seq_len']}) | "
            f"{stage1['trainable_params'] / 1e6:.2f} M ({stage1['trainable_fraction']:.2%} of M) | "
            f"{stage1['seconds']:.0f} s total, {stage1['dl_seconds_per_step'] or float('nan'):.2f} s/DL step |"
        )
    if kd:
        lines.append(
            f"| OT emulator distillation (KD of the LayerDrop emulator on M's logits, batch "
            f"{kd['batch_size']}×{kd['seq_len']}) | {kd['trainable_params'] / 1e6:.1f} M "
            f"({kd['trainable_params'] / kd['model_params']:.1%} of M) | {kd['seconds_per_step']:.2f} s/step "
            f"({kd['steps_timed']} steps timed) |"
        )
    if stage1:
        lines += ["", f"Stage-1 importance ranking (most important first): {stage1['ranking']}"]
    lines += ["", "#### Targets (from the paper)", "", "| Target | Task | Measured | Status |", "|---|---|---|---|"]
    for t in result["targets"]:
        lines.append(f"| {t['target']} | {t['task'] or 'all'} | {t['measured']} | {t['status'] or 'n/a'} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, tasks: list[Task], path: Path) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    tasks = [t for t in tasks if any(r["task"] == t.name for r in result["rows"])]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.2 * len(tasks), 5.8), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        rows = rows_by(result["rows"], task.name)
        scale = 100 if task.metric == "accuracy" else 1
        sweep = sorted(
            (r for r in rows.values() if r["method"] == "scaleot" and r["beta"] == 0), key=lambda r: r["alpha"]
        )
        if sweep:
            xs = [r["alpha"] for r in sweep]
            ax.plot(
                xs, [r["emulator_ft"] * scale for r in sweep], "o--", color="tab:red", label="ScaleOT emulator FT (β=0)"
            )
            ax.plot(xs, [r["plug_in"] * scale for r in sweep], "o-", color="tab:blue", label="ScaleOT plug-in (β=0)")
        for beta, marker, dx in ((0.5, "^", -0.02), (0.8, "v", 0.02)):  # nudged sideways so markers stay visible
            r = rows.get(f"scaleot_a0.5_b{beta:g}")
            if r:
                ax.plot(
                    [0.5 + dx],
                    [r["emulator_ft"] * scale],
                    marker,
                    color="tab:red",
                    mfc="none",
                    ms=9,
                    label=f"ScaleOT emulator FT (α=0.5, β={beta:g})",
                )
                ax.plot(
                    [0.5 + dx],
                    [r["plug_in"] * scale],
                    marker,
                    color="tab:blue",
                    mfc="none",
                    ms=9,
                    label=f"ScaleOT plug-in (α=0.5, β={beta:g})",
                )
        ot = rows.get("ot_layerdrop")
        if ot:
            ax.plot(
                [0.5], [ot["emulator_ft"] * scale], "X", color="tab:orange", ms=10, label="OT LayerDrop emulator FT"
            )
            ax.plot([0.5], [ot["plug_in"] * scale], "P", color="tab:green", ms=10, label="OT LayerDrop plug-in")
        full = rows.get("full_ft")
        if full:
            ax.axhline(full["full_ft"] * scale, color="black", ls="--", lw=1, label="full fine-tuning")
        oracle = rows.get("adapter_on_m")
        if oracle:
            ax.axhline(
                oracle["plug_in"] * scale,
                color="tab:purple",
                ls="-.",
                lw=1,
                label="ScaleOT adapter layers tuned on M (diagnostic)",
            )
        zs = rows.get("zero_shot")
        if zs:
            ax.axhline(zs["zero_shot"] * scale, color="gray", ls=":", lw=1, label="zero-shot M")
        ax.set_xlabel("α (share of non-adapter layers replaced; OT: share of middle layers dropped)")
        ax.set_ylabel("accuracy (%)" if task.metric == "accuracy" else "perplexity (log scale)")
        if task.metric == "perplexity":
            ax.set_yscale("log")
        ax.set_title(task.title, fontsize=10)
        ax.grid(alpha=0.3)
    # One legend under both panels, so it never covers a curve.
    legend: dict[str, Any] = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    fig.legend(list(legend.values()), list(legend.keys()), loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(f"Privacy–utility on {result['meta']['model']} ({result['meta']['profile']} profile)")
    fig.tight_layout(rect=(0, 0.2, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    log(f"wrote {path}")
    return path
