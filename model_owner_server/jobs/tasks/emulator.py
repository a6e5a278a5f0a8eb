"""The `emulator` job: stage 2, build the emulator a POST /v1/emulators asked for, and sign its manifest.

Reads the emulator row (model, importance run, N_a, alpha, beta, storage dtype), calibrates the stand-ins on
the stage-1 corpus, writes the emulator file, describes the adapter layers the data owner may train and
upload, and marks the row ready.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig

from model_owner_server import policy
from model_owner_server.core.db import session_scope
from model_owner_server.jobs.context import JobContext, JobFailure, still_ours
from model_owner_server.jobs.resources import calibration_activation_bytes
from model_owner_server.jobs.runner import JobRunner
from model_owner_server.keyring import manifest_for
from model_owner_server.models import EmulatorRow, ImportanceRun, RegisteredModel
from model_owner_server.privacy_audit import run_privacy_audit
from model_owner_server.scaleot.attack import AttackConfig
from model_owner_server.scaleot.calibrate import CalibrationConfig
from model_owner_server.scaleot.emulator import build_blocks, make_emulator
from model_owner_server.scaleot.importance_io import load_importance
from shared.adapter import adapter_spec, max_adapter_bytes, spec_to_json
from shared.emulator_file import emulator_dtype
from shared.lora import issue_lora


def emulator_job(runner: JobRunner, ctx: JobContext, params: dict[str, Any]) -> dict[str, Any]:
    """Build emulator `params["emulator_id"]`: calibrate, write the file, describe its adapter, mark it ready."""
    settings, storage = runner.settings, runner.storage
    with session_scope(runner.sessions) as s:
        emu = s.get(EmulatorRow, params["emulator_id"])
        if emu is None:
            raise JobFailure(f"emulator {params['emulator_id']} was deleted before it was built")
        model_row = s.get(RegisteredModel, emu.model_id)
        run = s.get(ImportanceRun, emu.importance_run_id)
        if model_row is None or run is None or not run.path:
            raise JobFailure(f"the model or the importance run of emulator {emu.id} was deleted; request it again")
        emu_id, model_id, n_adapter, alpha, beta = emu.id, emu.model_id, emu.n_adapter, emu.alpha, emu.beta
        run_path, corpus = storage.abs(run.path), run.corpus
        dtype_name = (emu.build_info or {}).get("dtype", "float32")  # set by POST /v1/emulators
    dtype = emulator_dtype(dtype_name)
    calibration = CalibrationConfig(
        steps=settings.emulator_calibration_steps,
        batch_size=settings.importance_batch_size,
        kept_lr=settings.emulator_calibration_kept_lr,
        grad_weight=settings.emulator_calibration_grad_weight,
        grad_match=settings.emulator_calibration_grad_match,
    )
    ctx.update(0.05, "loading model", force=True)
    activations = 0
    if calibration.steps > 0 and torch.device(runner.device).type == "cuda":  # the GPU fit check counts them
        config = AutoConfig.from_pretrained(model_row.path, local_files_only=True)
        tokens = calibration.batch_size * settings.importance_seq_len
        activations = calibration_activation_bytes(config, tokens, calibration.grad_weight > 0)
    model, tokenizer = runner.full_model(model_row, ctx, "emulator", activations)
    compute = next(model.parameters()).dtype  # the model's compute dtype: calibration and fidelity run in it
    # float32 harmonizers: make_emulator keeps them float32 through calibration, then casts the file to the issued dtype
    importance = load_importance(run_path)
    # Calibration and the fidelity figure use the stage-1 corpus (task-agnostic, the model owner's own).
    blocks = build_blocks(
        tokenizer,
        corpus,
        settings.importance_seq_len,
        settings.importance_max_blocks,
        need=calibration.steps > 0 or settings.emulator_fidelity_blocks > 0,
    )
    train_blocks, val_blocks = blocks if blocks is not None else (None, None)

    def progress(p: Any) -> None:
        ctx.update(
            0.1 + 0.75 * p.fraction,
            f"calibrating step {p.step}/{p.total_steps}",
            {"step": p.step, "total_steps": p.total_steps, "kl": p.kl, "nmse": p.nmse},
        )

    ctx.update(0.1, "building emulator", force=True)
    out = storage.emulators / f"{emu_id}.safetensors"  # save_emulator writes a temp name and renames
    with ctx.stage("build"):  # plan, copy of M, calibration, fidelity figure, file
        info = make_emulator(
            model,
            tokenizer,
            importance,
            n_adapter,
            alpha,
            beta,
            out,
            placement=settings.emulator_placement,
            calibration=calibration if train_blocks is not None else None,
            calibration_blocks=train_blocks,
            fidelity_blocks=(
                val_blocks[: settings.emulator_fidelity_blocks]
                if val_blocks is not None and settings.emulator_fidelity_blocks
                else None
            ),
            calibration_progress=progress,
            gradient_checkpointing=settings.gradient_checkpointing,
            mix_heads=settings.emulator_mix_heads,
            dtype=dtype,
            extra_metadata={"model_id": model_id, "emulator_id": emu_id},
        )

    ctx.update(0.9, "describing adapter layers", force=True)  # then the privacy audit, when the policy wants one
    layers = list(info.plan.adapter_layers)
    spec = adapter_spec(model, layers, dtype)  # uploads come back in the emulator's dtype
    fields: dict[str, Any] = dict(
        path=storage.rel(out),
        sha256=info.sha256,
        size_bytes=info.size_bytes,
        n_params=info.n_params,
        full_model_params=int(info.extra.get("full_model_params", 0)) or None,
        full_model_bytes=int(info.extra.get("full_model_bytes", 0)) or None,
        plan=info.plan.to_dict(),
        adapter_layers=layers,
        adapter_spec=spec_to_json(spec),
        max_adapter_bytes=max_adapter_bytes(spec),
        fidelity=info.extra.get("fidelity"),
        build_info={
            "placement": info.extra.get("placement"),
            "calibration": info.extra.get("calibration"),
            "dtype": dtype_name,
            "compute_dtype": str(compute).removeprefix("torch."),
            "lora": issue_lora(model, layers, dtype=dtype).to_json(),
        },
    )
    with session_scope(runner.sessions) as s:  # the policy as of now: it may have changed while we built
        current = s.get(RegisteredModel, model_id)
        audit = current is not None and policy.effective_policy(current, settings)[0].require_audit
    if audit:
        # Data owners get only audited emulators: measure the privacy gap now, so the emulator is issuable
        # (or withheld, with the figure that says why) the moment it is ready. Same audit as the admin's job.
        with ctx.stage("privacy_audit"):
            fields["privacy"] = run_privacy_audit(
                model,
                tokenizer,
                out,
                AttackConfig(
                    kind=settings.audit_attack, steps=settings.audit_steps, batch_size=settings.importance_batch_size
                ),
                corpus=settings.audit_corpus,
                seq_len=settings.importance_seq_len,
                max_blocks=settings.importance_max_blocks,
                val_blocks=settings.audit_val_blocks,
                device=str(runner.device),
                progress=lambda f, m, x: ctx.update(0.92 + 0.07 * f, f"privacy audit: {m}", x),
            )
    with session_scope(runner.sessions) as s:
        still_ours(s, ctx)
        emu = s.get(EmulatorRow, emu_id)
        if emu is None:
            raise JobFailure(f"emulator {emu_id} was deleted while it was being built; nothing was stored")
        for k, v in fields.items():
            setattr(emu, k, v)
        if runner.keyring is not None:  # a worker without the key leaves signing to the API (lazy)
            emu.signed_manifest = runner.keyring.sign(manifest_for(emu))
        emu.status, emu.error = "ready", None
    return {
        "emulator_id": emu_id,
        "sha256": info.sha256,
        "size_bytes": info.size_bytes,
        "plan_summary": info.plan.summary(),
        "fidelity": info.extra.get("fidelity"),
        "privacy": fields.get("privacy"),
        "compute_dtype": str(compute).removeprefix("torch."),
    }
