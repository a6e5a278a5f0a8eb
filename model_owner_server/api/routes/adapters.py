from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel as Schema
from pydantic import ConfigDict, Field, field_validator

from model_owner_server import crud
from model_owner_server.api import quotas
from model_owner_server.api.deps import AdminDep, OrgDep, QueueDep, SessionDep, SettingsDep, StorageDep
from model_owner_server.api.errors import ApiError
from model_owner_server.api.json_bounds import JsonBounds
from model_owner_server.api.serialize import adapter_out, job_out
from model_owner_server.api.upload import (
    MULTIPART_OVERHEAD,
    PartSpec,
    ReceivedPart,
    check_content_length,
    discard,
    json_object_part,
    receive_parts,
)
from model_owner_server.jobs.queue import QueueUnavailable
from model_owner_server.models import AdapterRow, EmulatorRow, Organization, new_id
from shared import schemas

router = APIRouter(tags=["adapters"])
ERR: dict[int | str, dict[str, Any]] = {
    s: {"model": schemas.ErrorBody} for s in (400, 401, 403, 404, 409, 413, 415, 422, 503)
}
EVAL_SUFFIXES = (".txt", ".jsonl", ".json")


class UploadInfo(Schema):
    """What an adapter upload to one emulator needs; a client asks before it trains, so that a missing
    evaluation file is found in a second, not after training. (A candidate for shared/schemas.py.)"""

    model_config = ConfigDict(extra="ignore")
    emulator_id: str
    default_eval_data: bool = Field(
        description="the server has a default evaluation file, so the 'eval_data' part is optional"
    )
    eval_data_required: bool = Field(description="an upload without the 'eval_data' part is refused (422 no_eval_data)")
    eval_data_suffixes: list[str] = Field(description="file types accepted for the 'eval_data' part")
    max_adapter_bytes: int | None = Field(default=None, description="size cap of the 'adapter' part")
    max_eval_bytes: int = Field(description="size cap of the 'eval_data' part")
    eval_settings: dict[str, int] | None = Field(
        default=None,
        description="how the server scores an upload's evaluation: seq_len and max_examples (its defaults, used "
        "when the 'metrics' part carries no eval_settings) and their caps max_seq_len and max_examples_cap. A "
        "client that scores the emulator within the caps and sends its settings gets one measurement",
    )


def _has_default_eval(settings) -> bool:
    return settings.default_eval is not None


def _has_chat_template(emulator_file: Path | None) -> bool:
    """Whether the emulator's tokenizer (M's, as issued) has a chat template; read from the file's header only."""
    import json

    from safetensors import safe_open

    if emulator_file is None:
        return True  # nothing to check against; the evaluation job reports it if the model has none
    try:
        with safe_open(str(emulator_file), "pt") as f:
            extra = json.loads((f.metadata() or {}).get("tokenizer_extra") or "{}")
    except Exception:  # an unreadable emulator file is a server fault, for the evaluation job to report
        return True
    return bool(extra.get("chat_template"))


def _validate_files(
    parts: dict[str, ReceivedPart],
    emu: EmulatorRow,
    has_default_eval: bool,
    config: dict[str, Any] | None,
    emulator_file: Path | None = None,
) -> str:
    """Heavy checks, run in a worker thread before anything is stored; returns the adapter's kind."""
    from shared.adapter import AdapterValidationError, spec_from_json
    from shared.data import NO_CHAT_TEMPLATE, DataError, load_dataset
    from shared.lora import issued_lora, validate_upload

    try:
        # Streaming check: the tensors are loaded later by the evaluation job, not held by the request.
        assert emu.adapter_spec is not None, "a ready emulator has its adapter_spec (the build job sets both)"
        kind = validate_upload(
            parts["adapter"].file,
            spec_from_json(emu.adapter_spec),
            issued_lora(emu.build_info),
            config,
            emu.max_adapter_bytes,
        )
    except AdapterValidationError as exc:
        raise ApiError(422, "invalid_adapter", str(exc)) from None
    except Exception as exc:
        raise ApiError(422, "invalid_adapter", f"the adapter is not a readable safetensors file ({exc})") from None
    if "eval_data" in parts:
        name = parts["eval_data"].filename or "eval_data"
        try:
            dataset = load_dataset(parts["eval_data"].file)
        except DataError as exc:
            raise ApiError(422, "invalid_eval_data", str(exc).replace(str(parts["eval_data"].file), name)) from None
        except Exception as exc:
            raise ApiError(422, "invalid_eval_data", f"the eval file could not be read ({exc})") from None
        if dataset.kind == "chat" and not _has_chat_template(emulator_file):  # refused now, not by the job
            raise ApiError(422, "invalid_eval_data", f"{name}: {NO_CHAT_TEMPLATE}")
    elif not has_default_eval:
        raise ApiError(
            422,
            "no_eval_data",
            "this server has no default evaluation file; attach your eval file as "
            "the 'eval_data' part (.txt or .jsonl)",
        )
    return kind


@router.post(
    "/v1/emulators/{emulator_id}/adapters",
    status_code=202,
    response_model=schemas.AdapterCreated,
    responses=ERR,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["adapter"],
                        "properties": {
                            "adapter": {
                                "type": "string",
                                "format": "binary",
                                "description": "safetensors: exactly the emulator's adapter_spec tensors (whole "
                                "layers), or PEFT's adapter_model.safetensors for its issued LoRA "
                                "(build_info.lora)",
                            },
                            "eval_data": {
                                "type": "string",
                                "format": "binary",
                                "description": ".txt or .jsonl eval file",
                            },
                            "metrics": {
                                "type": "string",
                                "description": "JSON object: the client's emulator-side metrics",
                            },
                            "adapter_config": {
                                "type": "string",
                                "description": "JSON object: training/PEFT settings; "
                                "its 'method' field (default 'full') is shown as the adapter's method. "
                                "Required for a LoRA: PEFT's adapter_config.json, as is or under 'peft'",
                            },
                        },
                    }
                }
            },
        }
    },
)
async def upload_adapter(
    emulator_id: str, request: Request, session: SessionDep, org: OrgDep, settings: SettingsDep, storage: StorageDep
) -> JSONResponse:
    """Upload a fine-tuned adapter (multipart/form-data) and start its plug-in evaluation job.

    Parts: `adapter` (required safetensors file), `eval_data` (optional .txt/.jsonl file; default: the
    server's eval file), `metrics` and `adapter_config` (optional JSON text). The body is streamed under a
    cap derived from the emulator's adapter layers; everything is validated before anything is stored.
    """
    emu = await run_in_threadpool(crud.get_visible_emulator, session, org, emulator_id)
    await run_in_threadpool(quotas.check_adapter_upload, session, org, settings)  # 429 before the body is read
    if emu.status != "ready":
        raise ApiError(409, "not_ready", f"emulator {emu.id} is not ready ({emu.status}); wait for its build job")
    specs = {
        "adapter": PartSpec(emu.max_adapter_bytes or 0, True),
        "eval_data": PartSpec(settings.max_eval_bytes, True, EVAL_SUFFIXES),
        "metrics": PartSpec(settings.max_json_part_bytes, False),
        "adapter_config": PartSpec(settings.max_json_part_bytes, False),
    }
    total_cap = sum(s.cap for s in specs.values()) + MULTIPART_OVERHEAD
    check_content_length(request, total_cap)
    parts = await receive_parts(request, specs, total_cap, storage.temp_path)
    try:
        if "adapter" not in parts or parts["adapter"].path is None:
            raise ApiError(422, "missing_part", "the 'adapter' file part (safetensors) is required")
        bounds = JsonBounds.from_settings(settings)  # depth, size, items, string length: refused before storing
        metrics = json_object_part(parts.get("metrics"), bounds)
        config = json_object_part(parts.get("adapter_config"), bounds)
        _check_eval_settings(metrics)
        emulator_file = storage.abs(emu.path) if emu.path else None
        kind = await run_in_threadpool(_validate_files, parts, emu, _has_default_eval(settings), config, emulator_file)
        if kind == "lora":  # the file is what counts, whatever a hand-written config says
            config = {**(config or {}), "method": "lora"}
        adapter, job = await run_in_threadpool(_store, session, storage, org, emu, parts, metrics, config)
    finally:
        discard(parts)  # temp files that were not moved into place
    try:
        await run_in_threadpool(request.app.state.queue.submit, request.app.state.sessions, job.id)
    except QueueUnavailable:
        raise ApiError(
            503,
            "unavailable",
            "adapter stored but the job queue is unreachable; its evaluation job failed, upload again later",
        ) from None
    body = await run_in_threadpool(_created, session, adapter.id, job.id)
    return JSONResponse(body.model_dump(mode="json"), status_code=202)


@router.get("/v1/emulators/{emulator_id}/upload-info", response_model=UploadInfo, responses=ERR)
def upload_info(emulator_id: str, session: SessionDep, org: OrgDep, settings: SettingsDep) -> UploadInfo:
    """What an adapter upload to this emulator needs: whether the 'eval_data' part is required (this server
    has no default evaluation file), the accepted eval file types and the size caps. Ask before training."""
    emu = crud.get_visible_emulator(session, org, emulator_id)
    has_default = _has_default_eval(settings)
    return UploadInfo(
        emulator_id=emu.id,
        default_eval_data=has_default,
        eval_data_required=not has_default,
        eval_data_suffixes=list(EVAL_SUFFIXES),
        max_adapter_bytes=emu.max_adapter_bytes,
        max_eval_bytes=settings.max_eval_bytes,
        eval_settings={
            "seq_len": settings.eval_seq_len,
            "max_examples": settings.eval_max_examples,
            "max_seq_len": settings.eval_max_seq_len,
            "max_examples_cap": settings.eval_max_examples,
        },
    )


def _store(
    session,
    storage,
    org: Organization,
    emu: EmulatorRow,
    parts: dict[str, ReceivedPart],
    metrics: dict | None,
    config: dict | None,
) -> tuple[AdapterRow, Any]:
    """Move the validated files into place and record adapter + job in one transaction."""
    adapter_id = new_id("adp")
    final_dir = storage.adapters / adapter_id
    try:
        storage.commit_file(parts["adapter"].file, final_dir / "adapter.safetensors")
        eval_rel = None
        if "eval_data" in parts:
            suffix = parts["eval_data"].file.suffix
            eval_rel = storage.rel(storage.commit_file(parts["eval_data"].file, final_dir / f"eval{suffix}"))
        method = str((config or {}).get("method") or "full")[:50]
        job = crud.create_job(session, "evaluation", org, {"adapter_id": adapter_id})
        adapter = AdapterRow(
            id=adapter_id,
            emulator_id=emu.id,
            model_id=emu.model_id,
            org_id=org.id,
            status="evaluating",
            path=storage.rel(final_dir / "adapter.safetensors"),
            sha256=parts["adapter"].sha256,
            size_bytes=parts["adapter"].size,
            method=method,
            adapter_config=config,
            client_metrics=metrics,
            eval_path=eval_rel,
            job_id=job.id,
        )
        session.add(adapter)
        crud.audit(
            session,
            org,
            "upload_adapter",
            "adapter",
            adapter_id,
            emulator_id=emu.id,
            sha256=adapter.sha256,
            size_bytes=adapter.size_bytes,
        )
        session.commit()
    except BaseException:
        session.rollback()
        storage.remove(final_dir)
        raise
    return adapter, job


def _created(session, adapter_id: str, job_id: str) -> schemas.AdapterCreated:
    session.expire_all()
    adapter = session.get(AdapterRow, adapter_id)
    from model_owner_server.models import JobRow

    return schemas.AdapterCreated(adapter=adapter_out(session, adapter), job=job_out(session.get(JobRow, job_id)))


@router.get("/v1/adapters", response_model=schemas.AdapterList, responses=ERR)
def list_adapters(
    session: SessionDep,
    org: OrgDep,
    limit: quotas.PageLimit = quotas.DEFAULT_PAGE,
    cursor: quotas.PageCursor = None,
) -> schemas.AdapterList:
    """Your organization's adapters, newest first, a page at a time."""
    rows, next_cursor = quotas.paginate(session, crud.visible_adapters(org), AdapterRow, limit, cursor)
    return schemas.AdapterList(
        adapters=[adapter_out(session, a, org) for a in rows], next_cursor=next_cursor, limit=limit
    )


@router.get("/v1/adapters/{adapter_id}", response_model=schemas.Adapter, responses=ERR)
def get_adapter(adapter_id: str, session: SessionDep, org: OrgDep) -> schemas.Adapter:
    """Status and evaluation side by side: zero-shot full model, plug-in M' and your reported emulator metrics."""
    return adapter_out(session, crud.get_visible_adapter(session, org, adapter_id), org)


def _prepare_generation(
    session, org: Organization, settings, storage, adapter_id: str, body: schemas.GenerateRequest
) -> Any:
    """Every 4xx of /generate, before the request takes a generation slot (runs in a worker thread)."""
    from model_owner_server.serving import Generation, Sampling, context_limit, not_servable, plug_for, plugged_lease

    adapter = crud.get_visible_adapter(session, org, adapter_id)
    quotas.check_tokens(session, org, settings)  # hourly token quota (api/quotas.py)
    if (problem := not_servable(adapter)) is not None:
        raise ApiError(409, "not_ready", problem)
    if body.max_new_tokens > settings.max_new_tokens:
        raise ApiError(422, "validation_error", f"max_new_tokens must be at most {settings.max_new_tokens} here")
    plug, model, tokenizer = plug_for(session, adapter, settings, storage)
    ids = list(tokenizer(body.prompt).input_ids)
    if not ids:
        raise ApiError(422, "validation_error", "the prompt is empty once tokenized; send some text")
    limit = context_limit(model)
    if limit and len(ids) + body.max_new_tokens > limit:
        raise ApiError(
            422,
            "validation_error",
            f"prompt ({len(ids)} tokens) + max_new_tokens exceeds the model's context of {limit} tokens; "
            "shorten the prompt",
        )
    sampling = Sampling(max_tokens=body.max_new_tokens, temperature=0)  # greedy, as this route always was
    return Generation(model, tokenizer, ids, sampling, plugged_lease(plug, settings))


def _audit_generation(session, org: Organization, adapter_id: str, max_new_tokens: int) -> None:
    crud.audit(session, org, "generate", "adapter", adapter_id, max_new_tokens=max_new_tokens)
    session.commit()


@router.post(
    "/v1/adapters/{adapter_id}/generate",
    response_model=schemas.GenerateResponse,
    responses={**ERR, 429: {"model": schemas.ErrorBody}},
)
async def generate(
    adapter_id: str,
    body: schemas.GenerateRequest,
    request: Request,
    session: SessionDep,
    org: OrgDep,
    settings: SettingsDep,
    storage: StorageDep,
) -> schemas.GenerateResponse:
    """Greedy text from the plugged-in full model M' = [A', E]; only text leaves the server. Only an adapter
    whose evaluation succeeded generates (409 otherwise). Runs on the server's bounded generation engine, like
    the OpenAI-compatible API: when every slot and queue place is taken, 429 with Retry-After."""
    from model_owner_server.api.routes.openai_compat import get_engine
    from model_owner_server.serving import EngineBusy

    generation = await run_in_threadpool(_prepare_generation, session, org, settings, storage, adapter_id, body)
    try:
        stream = get_engine(request).open(generation.deltas())
    except EngineBusy as exc:
        raise ApiError(429, "queue_full", str(exc), headers={"Retry-After": "1"}) from None
    text = await stream.text()
    await run_in_threadpool(quotas.charge_tokens, session, org, generation.completion_tokens)
    await run_in_threadpool(_audit_generation, session, org, adapter_id, body.max_new_tokens)
    return schemas.GenerateResponse(
        adapter_id=adapter_id, prompt=body.prompt, completion=text, max_new_tokens=body.max_new_tokens
    )


# ---------------------------------------------------------------- one measurement; benchmark evaluation


def _check_eval_settings(metrics: dict[str, Any] | None) -> None:
    """The client's evaluation settings (metrics.eval_settings, shared/eval_settings.py), refused before anything
    is stored when malformed: the evaluation job scores with them."""
    from shared.eval_settings import EVAL_SETTINGS_KEY, parse_eval_settings

    if metrics is not None and metrics.get(EVAL_SETTINGS_KEY) is not None:
        try:
            parse_eval_settings(metrics[EVAL_SETTINGS_KEY])
        except ValueError as exc:
            raise ApiError(
                422, "validation_error", f"part 'metrics': {exc}; or leave it out to use the server's settings"
            ) from None


TASK_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,100}")


class BenchmarkRequest(Schema):
    """lm-evaluation-harness tasks to run on M zero-shot and on the adapter's plug-in."""

    model_config = ConfigDict(extra="forbid")
    tasks: list[str] = Field(
        min_length=1,
        max_length=20,
        description="lm-eval task (or group) names: the server's own (scaleot_shakespeare, scaleot_wikipedia, "
        "scaleot_analogy), those in SCALEOT_BENCHMARK_TASKS_DIR, or built-in ones whose data is on the server",
    )
    limit: int | None = Field(
        default=None, ge=1, description="examples per task (default: all; at most SCALEOT_BENCHMARK_MAX_LIMIT)"
    )
    num_fewshot: int | None = Field(default=None, ge=0, le=25, description="default: each task's own")

    @field_validator("tasks")
    @classmethod
    def _names(cls, tasks: list[str]) -> list[str]:
        for t in tasks:
            if not TASK_NAME.fullmatch(t):
                raise ValueError(f"{t[:60]!r} is not a task name (letters, digits, _ . - only, at most 100)")
        if len(set(tasks)) != len(tasks):
            raise ValueError("a task is named twice")
        return tasks


@router.post(
    "/v1/adapters/{adapter_id}/benchmarks",
    status_code=202,
    response_model=schemas.Job,
    responses={**ERR, 429: {"model": schemas.ErrorBody}},
)
def start_benchmarks(
    adapter_id: str,
    body: BenchmarkRequest,
    request: Request,
    session: SessionDep,
    admin: AdminDep,
    settings: SettingsDep,
    queue: QueueDep,
) -> schemas.Job:
    """Run lm-evaluation-harness tasks on M zero-shot and on this adapter's plug-in, as a job (admins).

    The table lands in the adapter's `evaluation.benchmarks` (GET /v1/adapters/{id}: its owner and admins), replacing
    an earlier one. Tasks are checked by the job before the model loads: an unknown task, or one whose data is not
    on the server (no downloads), fails it with the task's name. Poll GET /v1/jobs/{id}.
    """
    adapter = crud.get_visible_adapter(session, admin, adapter_id)
    if adapter.status != "evaluated":
        raise ApiError(
            409, "not_ready", f"adapter {adapter.id} is {adapter.status}; benchmark it once its evaluation succeeded"
        )
    if body.limit is not None and body.limit > settings.benchmark_max_limit:
        raise ApiError(
            422,
            "validation_error",
            f"limit must be at most {settings.benchmark_max_limit} on this server (SCALEOT_BENCHMARK_MAX_LIMIT); "
            "for a longer run use `modelowner-server eval-adapter` there",
        )
    params = {"adapter_id": adapter.id, "tasks": body.tasks, "limit": body.limit, "num_fewshot": body.num_fewshot}
    job = crud.create_job(session, "benchmark_eval", admin, params)
    crud.audit(session, admin, "benchmark_adapter", "adapter", adapter.id, tasks=body.tasks, limit=body.limit)
    session.commit()
    try:
        queue.submit(request.app.state.sessions, job.id)
    except QueueUnavailable:
        raise ApiError(503, "unavailable", "the job queue is unreachable; try again later") from None
    session.refresh(job)
    return job_out(job)
