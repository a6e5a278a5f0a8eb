"""The `importance` job: stage 1 (Dynamic LayerReplace) on a registered model and a task-agnostic corpus.

Same data path and algorithm as `modelowner-server estimate-importance`; the result is an importance run
folder (scores + harmonizers) under the data dir, recorded on its `importance_runs` row.
"""

from __future__ import annotations

from typing import Any

from model_owner_server.core.db import session_scope
from model_owner_server.jobs.context import JobContext, JobFailure, still_ours
from model_owner_server.jobs.resources import DoesNotFit, check_fits, dtype_name
from model_owner_server.jobs.runner import JobRunner
from model_owner_server.models import ImportanceRun, RegisteredModel, utcnow
from model_owner_server.scaleot.corpus import corpus_blocks
from model_owner_server.scaleot.importance import ImportanceConfig, estimate_importance
from model_owner_server.scaleot.importance_io import save_importance
from model_owner_server.scaleot.model_io import load_causal_lm
from shared.training import gradient_checkpointing


def importance_job(runner: JobRunner, ctx: JobContext, params: dict[str, Any]) -> dict[str, Any]:
    """Stage 1 for importance run `params["run_id"]`: tokenise the corpus, estimate, save, record the scores."""
    settings, storage = runner.settings, runner.storage
    with session_scope(runner.sessions) as s:
        model_row = s.get(RegisteredModel, params["model_id"])
        if model_row is None:
            raise JobFailure("the model was deleted")
        model_path, run_id, n_params = model_row.path, params["run_id"], model_row.n_params
        dtype = runner.compute_dtype(model_row)
    try:
        check_fits(n_params, dtype, "importance", runner.device)
    except DoesNotFit as exc:
        raise JobFailure(str(exc)) from None
    ctx.update(0.01, f"loading model ({dtype_name(dtype)})", force=True)
    # A fresh copy, not the shared cache: stage 1 swaps layers in and out while it trains.
    with ctx.stage("load"):
        model, tokenizer = load_causal_lm(model_path, device=runner.device, dtype=dtype)
    ctx.model_loaded(model, dtype, was_cached=False)
    ctx.update(0.03, "tokenising corpus")
    # Same data path as `modelowner-server estimate-importance` (DataError/ValueError name the file).
    with ctx.stage("tokenize"):
        train, val = corpus_blocks(
            tokenizer, params["corpus"], settings.importance_seq_len, max_blocks=settings.importance_max_blocks
        )
    # Jobs queued before these knobs existed carry only steps: fall back to ImportanceConfig's defaults.
    knobs = {
        k: params[k] for k in ("warmup_steps", "rl_interval", "distill_weight", "hidden_weight", "seed") if k in params
    }
    cfg = ImportanceConfig(
        steps=int(params["steps"]), batch_size=settings.importance_batch_size, device=str(runner.device), **knobs
    )

    def progress(p: Any) -> None:
        ctx.update(
            0.05 + 0.9 * p.fraction,
            p.label,
            {
                "step": p.step,
                "total_steps": p.total_steps,
                "phase": p.phase,
                "loss": p.loss,
                "reward_mean": p.reward_mean,
                "scores": [round(x, 5) for x in p.scores],
            },
        )

    ctx.update(
        0.05,
        f"estimating importance on {len(train)} train / {len(val)} val blocks",
        {"train_blocks": len(train), "val_blocks": len(val)},
        force=True,
    )
    with ctx.stage("stage1"), gradient_checkpointing(model, settings.gradient_checkpointing):
        result = estimate_importance(model, train, val, cfg, progress=progress)
    harmonizer_dtype = dtype_name(next(iter(result.harmonizers.values())).down.weight.dtype)

    ctx.update(0.96, "saving", force=True)
    tmp = storage.temp_path()
    try:
        extra = {"model_id": params["model_id"], "corpus": params["corpus"], "compute_dtype": dtype_name(dtype)}
        save_importance(result, tmp, extra=extra)
        final = storage.commit_dir(tmp, storage.importance / run_id)
    finally:
        storage.remove(tmp if tmp.exists() else None)
    scores = [float(x) for x in result.scores.tolist()]
    with session_scope(runner.sessions) as s:
        still_ours(s, ctx)
        run = s.get(ImportanceRun, run_id)
        if run is None:
            raise JobFailure(f"importance run {run_id} was deleted while it ran; nothing was recorded")
        run.status, run.path, run.scores, run.finished_at = "succeeded", storage.rel(final), scores, utcnow()

    final_loss = next((h["loss"] for h in reversed(result.history) if h["phase"] == "dl"), None)
    return {
        "model_id": params["model_id"],
        "importance_run_id": run_id,
        "scores": scores,
        "ranking": result.ranking(),
        "final_loss": final_loss,
        "seconds": round(result.seconds, 2),
        "n_harmonizer_params": result.n_harmonizer_params,
        # The dtype M was loaded and run in, and the one the harmonizers were trained in (stored as float32).
        "compute_dtype": dtype_name(dtype),
        "harmonizer_dtype": harmonizer_dtype,
        # The loss / reward curve for the console; a long run keeps every k-th record (at most 400).
        "history": result.history[:: max(1, -(-len(result.history) // 400))],
    }
