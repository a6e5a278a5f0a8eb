"""The privacy audit of an emulator: the cheapest recovery attack at a small budget, stored with the emulator.

A data owner holds the emulator file and public text. The audit heals the emulator on public text
(scaleot/attack.py) and measures, on held-out public text, how far the healed emulator still is from the
full model M: the *residual gap* in nats per token (> 0: the attacker's copy is still worse than M). The
model owner sees it (GET /v1/emulators/{id}, the console) before granting a download.

Run by the `privacy_audit` job (jobs/tasks/privacy_audit.py; POST /v1/emulators/{id}/privacy-audit, admins) and
by `modelowner-server audit-emulator EMULATOR_ID`; both store the same record in `emulators.privacy`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from torch import nn

from model_owner_server.scaleot.attack import AttackConfig, heal, mean_lm_loss
from model_owner_server.scaleot.corpus import corpus_blocks

DEFAULT_CORPUS = "pydoc_data.topics"  # Python's reference docs: public, disjoint from stage-1 and task text


def pydoc_text() -> str:
    """Python's own reference documentation (``pydoc_data.topics``, ~465 kB, in every CPython): public text
    with nothing in common with the Wikipedia excerpt (stage 1) or Shakespeare (the demo's task). The
    privacy audit and benchmarks/privacy_attack.py use it as the attacker's public corpus."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k].strip() for k in sorted(topics))


def run_privacy_audit(
    full_model: nn.Module,
    tokenizer: Any,
    emulator_path: str | Path,
    cfg: AttackConfig,
    *,
    corpus: str | Path | None = None,
    seq_len: int = 128,
    max_blocks: int = 512,
    val_blocks: int = 16,
    device: str = "cpu",
    progress: Callable[[float, str, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Heal the emulator file on public text with `cfg`; return the record stored as `emulators.privacy`.

    `full_model` is only evaluated (never changed), so the server's shared model cache can be passed.
    """
    from shared.emulator_file import load_emulator

    report = progress or (lambda fraction, message, metrics: None)
    report(0.02, "tokenising the public corpus", {})
    with tempfile.TemporaryDirectory() as tmp:
        if corpus is None:
            path = Path(tmp) / "public.txt"
            path.write_text(pydoc_text())
        else:
            path = Path(corpus)
        train, val = corpus_blocks(tokenizer, path, seq_len, max_blocks=max_blocks)
    val = val[:val_blocks]
    report(0.05, "scoring the full model on held-out public text", {})
    full_loss = mean_lm_loss(full_model, val, cfg.batch_size)
    report(0.08, "loading the emulator", {})
    emulator = load_emulator(emulator_path, device=device).model

    def step(i: int, n: int, loss: float) -> None:
        report(0.1 + 0.85 * i / n, f"{cfg.kind} step {i}/{n}", {"step": i, "total_steps": n, "loss": round(loss, 4)})

    _, res = heal(emulator, train, val, cfg, progress=step)
    before, after = res.loss_before - full_loss, res.loss_after - full_loss
    return {
        "attack": cfg.kind,
        "steps": cfg.steps,
        "batch_size": cfg.batch_size,
        "seq_len": seq_len,
        "seed": cfg.seed,
        "tokens": res.tokens,
        "corpus": DEFAULT_CORPUS if corpus is None else Path(corpus).name,
        "val_blocks": len(val),
        "full_model_loss": round(full_loss, 4),
        "emulator_loss": round(res.loss_before, 4),
        "attacker_loss": round(res.loss_after, 4),
        "gap_before_nats": round(before, 4),
        "residual_gap_nats": round(after, 4),
        # share of the emulator's gap to M that the attack closed (1: the attacker matches M)
        "share_closed": round((before - after) / before, 4) if before > 1e-9 else None,
        "seconds": round(res.seconds, 1),
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
