"""The `evaluation` job: plug an uploaded adapter into the full model and score it against zero-shot.

Validates the upload against the adapter spec the emulator issued, evaluates the full model zero-shot and
with the adapter plugged in on the uploaded (or the server's default) evaluation data, and stores both.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from model_owner_server.core.db import session_scope
from model_owner_server.jobs.context import JobContext, JobFailure, still_ours
from model_owner_server.jobs.runner import JobRunner
from model_owner_server.models import AdapterRow, EmulatorRow, Evaluation, RegisteredModel
from model_owner_server.scaleot.plugin import check_adapter, layer_copy, write_adapter
from shared.adapter import spec_from_json
from shared.data import DataError, load_dataset
from shared.eval_settings import EVAL_SETTINGS_KEY, EvalSettings, parse_eval_settings, resolve_eval_settings
from shared.evaluation import evaluate
from shared.lora import issued_lora, load_adapter


def evaluation_job(runner: JobRunner, ctx: JobContext, params: dict[str, Any]) -> dict[str, Any]:
    """Evaluate adapter `params["adapter_id"]`: validate the upload against what its emulator issued, score the
    full model zero-shot and with the adapter plugged in, store both and mark the adapter evaluated."""
    settings, storage = runner.settings, runner.storage
    with session_scope(runner.sessions) as s:
        adapter = s.get(AdapterRow, params["adapter_id"])
        if adapter is None:
            raise JobFailure(f"adapter {params['adapter_id']} was deleted before it was evaluated")
        emu = s.get(EmulatorRow, adapter.emulator_id)
        model_row = s.get(RegisteredModel, adapter.model_id)
        if emu is None or model_row is None or emu.adapter_spec is None or emu.adapter_layers is None:
            raise JobFailure(f"the emulator or the model of adapter {adapter.id} was deleted; nothing to evaluate")
        spec, layers = spec_from_json(emu.adapter_spec), list(emu.adapter_layers)
        lora = issued_lora(emu.build_info)
        adapter_path = storage.abs(adapter.path)
        eval_path = storage.abs(adapter.eval_path) if adapter.eval_path else settings.default_eval
        eval_source = "upload" if adapter.eval_path else f"server default ({Path(str(eval_path)).name})"
        adapter_id = adapter.id
        used, used_from, notes = _eval_settings(settings, adapter.client_metrics)  # one measurement with the client
    if eval_path is None:
        raise JobFailure("no evaluation data: upload eval_data with the adapter or set SCALEOT_DEFAULT_EVAL")
    ctx.update(0.02, "validating adapter", force=True)
    tensors = load_adapter(adapter_path, spec, lora)  # whole layers or a PEFT LoRA, as issued
    try:
        dataset = load_dataset(eval_path)
    except DataError as exc:
        raise _data_failure(exc, eval_path) from None
    ctx.update(0.05, "loading full model", force=True)
    model, tokenizer = runner.full_model(model_row, ctx, "evaluation")
    kw = dict(
        seq_len=used.seq_len,
        batch_size=settings.eval_batch_size,
        device=next(model.parameters()).device,
        max_examples=used.max_examples,
    )

    def prog(lo: float, hi: float, label: str) -> Callable[[int, int], None]:
        return lambda done, total: ctx.update(lo + (hi - lo) * done / max(1, total), f"{label} {done}/{total}")

    ctx.update(0.1, "evaluating the full model zero-shot", force=True)
    try:  # chat data is rendered here, with M's chat template (a model without one is refused)
        with ctx.stage("zero_shot"):
            zero = evaluate(model, tokenizer, dataset, progress=prog(0.1, 0.5, "zero-shot"), **kw)
    except DataError as exc:
        raise _data_failure(exc, eval_path) from None
    ctx.update(0.5, "plugging the adapter into the full model", {"zero_shot": zero}, force=True)
    with ctx.stage("plug_in"):
        # M' = [A', E] sharing every tensor with M but the adapter layers (not a second copy of M): the same
        # model plug_in would make (plugin.py), in M + adapter layers of memory.
        check_adapter(model, tensors, layers, spec, lora)
        plugged = layer_copy(model, layers)
        write_adapter(plugged, model, tensors, layers, lora)
        plug = evaluate(plugged, tokenizer, dataset, progress=prog(0.55, 0.98, "plug-in"), **kw)
    del plugged

    with session_scope(runner.sessions) as s:
        still_ours(s, ctx)
        record = {**used.to_json(), "source": used_from, **({"notes": notes} if notes else {})}
        for kind, figures in (("zero_shot", zero), ("plug_in", plug)):
            metrics: dict[str, Any] = {**figures, "settings": record}  # adapter_out shows it as evaluation.settings
            s.add(Evaluation(adapter_id=adapter_id, kind=kind, eval_source=eval_source, metrics=metrics))
        adapter = s.get(AdapterRow, adapter_id)
        if adapter is None:
            raise JobFailure(f"adapter {adapter_id} was deleted while it was evaluated; nothing was stored")
        adapter.status, adapter.error = "evaluated", None
    compute = str(next(model.parameters()).dtype).removeprefix("torch.")
    return {
        "adapter_id": adapter_id,
        "zero_shot": zero,
        "plug_in": plug,
        "eval_source": eval_source,
        "compute_dtype": compute,
    }


def _eval_settings(settings: Any, client_metrics: dict[str, Any] | None) -> tuple[EvalSettings, str, list[str]]:
    """The upload's own evaluation settings within the server's caps, else the server's defaults (an older client,
    or a row stored before uploads were checked: its unreadable settings are named in a note)."""
    default = EvalSettings(settings.eval_seq_len, settings.eval_max_examples)
    caps = {"max_seq_len": settings.eval_max_seq_len, "max_examples": settings.eval_max_examples}
    raw = (client_metrics or {}).get(EVAL_SETTINGS_KEY)
    if raw is None:
        return resolve_eval_settings(None, default=default, **caps)
    try:
        requested = parse_eval_settings(raw)
    except ValueError as exc:
        used, _, _ = resolve_eval_settings(None, default=default, **caps)
        return used, "server default", [f"the upload's settings were not used: {exc}"]
    return resolve_eval_settings(requested, default=default, **caps)


def _data_failure(exc: DataError, eval_path: Path | str) -> JobFailure:
    """The data file's problem, for the data owner as-is (it names the line and the fix), without the server's path."""
    return JobFailure(f"the evaluation data cannot be scored: {str(exc).replace(str(eval_path), Path(eval_path).name)}")
