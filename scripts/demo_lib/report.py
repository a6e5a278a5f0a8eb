"""The demo's report: built from both parties' results (`build_report`, the JSON saved), and printed."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from .config import DemoConfig
from .console import fmt_bytes, fmt_seconds, say
from .data_owner import ClientResult
from .owner import OwnerResult, plan_summary


def build_report(
    cfg: DemoConfig,
    client: ClientResult,
    owner: OwnerResult | None,
    total_s: float,
    reference: dict[str, Any] | None = None,
) -> dict[str, Any]:
    m = client.doc.get("metrics") or {}
    emu = client.emulator
    rows = {
        "full model, zero-shot (server)": m.get("zero_shot"),
        "emulator, zero-shot (data owner)": m.get("emulator_zero_shot"),
        "emulator + fine-tuned adapter (data owner)": m.get("emulator_fine_tuned"),
        "plug-in: full model + adapter (server)": m.get("plug_in"),
    }
    if reference:
        rows["same layers tuned in M (demo diagnostic)"] = reference["metrics"]
    chat = None
    if client.chat is not None:  # the chat-format tune: the same four stages, on the assistant-token loss
        cm = client.chat.get("metrics") or {}
        chat = {
            "training": client.chat.get("training") or {},
            "adapter_status": (client.chat.get("adapter") or {}).get("status"),
            "metrics": {
                "full model, zero-shot (server)": cm.get("zero_shot"),
                "emulator, zero-shot (data owner)": cm.get("emulator_zero_shot"),
                "emulator + fine-tuned adapter (data owner)": cm.get("emulator_fine_tuned"),
                "plug-in: full model + adapter (server)": cm.get("plug_in"),
            },
        }
    training = client.doc.get("training") or {}
    adapter = client.doc.get("adapter") or {}
    timings = dict(owner.timings) if owner else {}
    timings["data owner (tune + evaluation)"] = client.seconds
    return {
        "tiny": cfg.tiny,
        "config": asdict(cfg),
        "emulator_id": emu.get("id"),
        "plan": plan_summary(emu),
        "emulator_bytes": emu.get("size_bytes"),
        "full_model_bytes": emu.get("full_model_bytes"),
        "fidelity": emu.get("fidelity"),
        "emulator_params": emu.get("n_params"),
        "full_model_params": emu.get("full_model_params"),
        "adapter_bytes": adapter.get("size_bytes"),
        "adapter_id": adapter.get("id"),
        "adapter_status": adapter.get("status"),
        "train_works": client.train_titles,
        "eval_works": client.eval_titles,
        "training": training,
        "metrics": rows,
        "chat": chat,
        **({"benchmarks": owner.benchmarks} if owner and owner.benchmarks else {}),
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "total_s": round(total_s, 1),
    }


def print_report(r: dict[str, Any]) -> None:
    def ppl(row: dict | None) -> str:
        return (
            f"{row['perplexity']:>12.1f}" if row and isinstance(row.get("perplexity"), (int, float)) else f"{'-':>12}"
        )

    def loss(row: dict | None) -> str:
        key = next((k for k in ("loss", "completion_loss", "assistant_loss") if row and k in row), "loss")
        return f"{row[key]:>8.3f}" if row and isinstance(row.get(key), (int, float)) else f"{'-':>8}"

    say("\n" + "=" * 78)
    say("ScaleOT two-party demo: report" + ("  (--tiny: random model, numbers are meaningless)" if r["tiny"] else ""))
    say("=" * 78)
    cfg = r["config"]
    eb, fb = r["emulator_bytes"], r["full_model_bytes"]
    ep, fp = r["emulator_params"], r["full_model_params"]
    say(f"emulator {r['emulator_id']}  N_a={cfg['n_adapter']} alpha={cfg['alpha']} beta={cfg['beta']}")
    say(f"  {r['plan']}")
    if eb and fb:
        say(
            f"  size {fmt_bytes(eb)} vs full model {fmt_bytes(fb)} ({eb / fb:.0%})"
            + (f"; {ep / 1e6:.1f}M vs {fp / 1e6:.1f}M parameters" if ep and fp else "")
        )
    fid = r.get("fidelity") or {}
    if fid:
        say(
            f"  fidelity at build time: perplexity {fid.get('ppl_ratio')}x the full model's, adapter-gradient "
            f"cosine {fid.get('grad_cosine')}"
        )
    say(f"  what came back: adapter {r['adapter_id']} ({fmt_bytes(r['adapter_bytes'])}, {r['adapter_status']})")
    tr = r["training"]
    if tr:
        say(
            f"data owner trained {tr.get('steps')} steps on {', '.join(r['train_works'])}: loss "
            f"{tr.get('first_loss', float('nan')):.3f} -> {tr.get('final_loss', float('nan')):.3f} "
            f"({fmt_seconds(tr.get('seconds') or 0)})"
        )
    say(
        f"held-out text: {', '.join(r['eval_works'])} ({cfg['eval_max_examples']} blocks x {cfg['seq_len']} tokens,"
        " scored by the same shared.evaluation code on both sides)"
    )
    say("")
    say(f"{'':44}{'perplexity':>12}{'loss':>8}")
    for name, row in r["metrics"].items():
        say(f"{name:44}{ppl(row)}{loss(row)}")
    rows = r["metrics"]
    zs, ft, pi = (
        rows["full model, zero-shot (server)"],
        rows["emulator + fine-tuned adapter (data owner)"],
        rows["plug-in: full model + adapter (server)"],
    )
    if zs and pi and ft and all(isinstance(x.get("perplexity"), (int, float)) for x in (zs, pi, ft)):
        gain = 1 - pi["perplexity"] / zs["perplexity"]
        gap = ft["perplexity"] / max(pi["perplexity"], 1e-9)
        say("")
        say(
            f"utility: plug-in vs zero-shot full model, perplexity {zs['perplexity']:.1f} -> {pi['perplexity']:.1f} "
            f"({gain:+.1%} {'better' if gain > 0 else 'worse'})"
        )
        ref = rows.get("same layers tuned in M (demo diagnostic)")
        if ref and isinstance(ref.get("loss"), (int, float)) and ref["loss"] < zs["loss"]:
            r_ratio = (zs["loss"] - pi["loss"]) / (zs["loss"] - ref["loss"])
            say(
                f"transfer: the plug-in keeps {r_ratio:.0%} of the gain the same layers reach when tuned inside M "
                f"(loss {zs['loss']:.3f} -> {pi['loss']:.3f}, in M -> {ref['loss']:.3f})"
            )
        say(
            f"privacy: what the data owner holds (emulator + adapter) scores {ft['perplexity']:.1f}, "
            f"{gap:.1f}x the plug-in's perplexity"
            + (" - it still needs the model owner's full model" if gap > 1.5 else "")
        )
    chat = r.get("chat")
    if chat:
        tr = chat["training"]
        say("")
        say(
            f"chat data (messages records, the model's chat template; loss on the assistant turns only): trained "
            f"{tr.get('steps')} steps, loss {tr.get('first_loss', float('nan')):.3f} -> "
            f"{tr.get('final_loss', float('nan')):.3f}; adapter {chat['adapter_status']}"
        )
        say(f"{'':44}{'perplexity':>12}{'loss':>8}")
        for name, row in chat["metrics"].items():
            say(f"{name:44}{ppl(row)}{loss(row)}")
    if r.get("benchmarks"):
        say("")
        say(f"evaluation job (lm-evaluation-harness on M and the plug-in): {r['benchmarks']}")
    say("")
    say(
        "time: "
        + ", ".join(f"{k} {fmt_seconds(v)}" for k, v in r["timings_s"].items())
        + f"; total {fmt_seconds(r['total_s'])}"
    )
