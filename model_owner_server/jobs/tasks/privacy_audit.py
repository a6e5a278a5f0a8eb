"""The `privacy_audit` job: attack one ready emulator the way a data owner could and store the residual gap.

The measurement itself (`run_privacy_audit`) is shared with `modelowner-server audit-emulator`; see
model_owner_server/privacy_audit.py.
"""

from __future__ import annotations

from typing import Any

from model_owner_server.core.db import session_scope
from model_owner_server.jobs.context import JobContext, JobFailure, still_ours
from model_owner_server.jobs.runner import JobRunner
from model_owner_server.models import EmulatorRow, RegisteredModel
from model_owner_server.privacy_audit import run_privacy_audit
from model_owner_server.scaleot.attack import AttackConfig


def privacy_audit_job(runner: JobRunner, ctx: JobContext, params: dict[str, Any]) -> dict[str, Any]:
    """Audit one ready emulator and store the record on its row (`emulators.privacy`)."""
    settings = runner.settings
    with session_scope(runner.sessions) as s:
        emu = s.get(EmulatorRow, params["emulator_id"])
        if emu is None or emu.status != "ready" or not emu.path:
            raise JobFailure(f"emulator {params['emulator_id']} was deleted or is not ready any more")
        model_row = s.get(RegisteredModel, emu.model_id)
        if model_row is None:
            raise JobFailure(f"the model of emulator {emu.id} was deleted")
        emu_id, path = emu.id, runner.storage.abs(emu.path)
    if not path.is_file():
        raise JobFailure(
            f"the file of emulator {emu_id} is missing from the server's storage ({path}); "
            "rebuild it with POST /v1/emulators"
        )
    ctx.update(0.01, "loading the full model", force=True)
    model, tokenizer = runner.full_model(model_row, ctx, "privacy_audit")
    cfg = AttackConfig(
        kind=params["attack"],
        steps=int(params["steps"]),
        batch_size=settings.importance_batch_size,
        seed=int(params.get("seed", 0)),
    )
    with ctx.stage("audit"):
        record = run_privacy_audit(
            model,
            tokenizer,
            path,
            cfg,
            corpus=params.get("corpus"),
            seq_len=settings.importance_seq_len,
            max_blocks=settings.importance_max_blocks,
            val_blocks=settings.audit_val_blocks,
            device=str(runner.device),
            progress=lambda f, m, x: ctx.update(f, m, x),
        )
    with session_scope(runner.sessions) as s:
        still_ours(s, ctx)
        row = s.get(EmulatorRow, emu_id)
        if row is None:
            raise JobFailure(f"emulator {emu_id} was deleted while it was being audited; nothing was stored")
        row.privacy = record
    return {"emulator_id": emu_id, "privacy": record}
