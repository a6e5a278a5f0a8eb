"""OpenAI-compatible use of plugged-in adapters under /openai/v1 (so /v1/models stays ours).

The model id is the adapter id; the bearer token is the organization's API key (the same dependency as every
/v1 route); errors on these routes have OpenAI's shape `{"error": {"message", "type", "param", "code"}}` so
OpenAI clients show them. Generation runs on the bounded engine (model_owner_server/serving.py), never on
the event loop, on a resident plugged copy of M (model_cache.PluggedPool); a full queue is a 429 at once, an
adapter whose evaluation has not succeeded a 409 (`model_not_ready`).
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse

from model_owner_server import crud
from model_owner_server.api import quotas
from model_owner_server.api.deps import OrgDep, SessionDep, SettingsDep, StorageDep
from model_owner_server.api.openai_wire import (
    ChatMessage,
    ChatRequest,
    CompletionRequest,
    OpenAIError,
    OpenAIRoute,
)
from model_owner_server.serving import (
    EngineBusy,
    Generation,
    GenerationEngine,
    Sampling,
    context_limit,
    not_servable,
    plug_for,
    plugged_lease,
)

log = logging.getLogger("scaleot.openai")

router = APIRouter(prefix="/openai/v1", tags=["openai"], route_class=OpenAIRoute)
ERR = {
    s: {"description": "OpenAI error shape: {error: {message, type, param, code}}"} for s in (400, 401, 404, 409, 429)
}
_engine_lock = threading.Lock()


def get_engine(request: Request) -> GenerationEngine:
    """The app's one generation engine, made on first use from the settings."""
    state = request.app.state
    with _engine_lock:
        if getattr(state, "generation_engine", None) is None:
            s = state.settings
            state.generation_engine = GenerationEngine(s.generation_concurrency, s.generation_queue)
        return state.generation_engine


EngineDep = Annotated[GenerationEngine, Depends(get_engine)]


# ---------------------------------------------------------------- preparing a generation (worker thread)


@dataclass
class _Job:
    adapter_id: str
    generation: Generation

    def usage(self) -> dict[str, int]:
        p, c = len(self.generation.prompt_ids), self.generation.completion_tokens
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _chat_prompt(tokenizer: Any, messages: list[ChatMessage]) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise OpenAIError(
            400,
            "this adapter's base model has no chat template in its tokenizer, so messages cannot "
            "be turned into a prompt; use POST /openai/v1/completions with a prompt in the model's own "
            "format (or the model owner adds a chat_template to the model folder's tokenizer)",
            param="messages",
            code="chat_template_missing",
        )
    try:
        return tokenizer.apply_chat_template(
            [m.as_template_input() for m in messages], add_generation_prompt=True, tokenize=False
        )
    except Exception as exc:
        raise OpenAIError(
            400, f"the model's chat template refused these messages: {exc}", param="messages", code="invalid_messages"
        ) from None


def _max_tokens(requested: int | None, prompt_len: int, limit: int | None, cap: int, param: str) -> int:
    if requested is not None and requested > cap:
        raise OpenAIError(
            400, f"max_tokens must be at most {cap} on this server", param="max_tokens", code="invalid_value"
        )
    room = None if limit is None else limit - prompt_len
    if room is not None and room < (requested or 1):
        raise OpenAIError(
            400,
            f"this model's maximum context length is {limit} tokens; the prompt has {prompt_len} "
            f"tokens and {requested or 1} more were asked for; shorten the prompt or lower max_tokens",
            param=param,
            code="context_length_exceeded",
        )
    return requested or (cap if room is None else min(cap, room))


def _prepare(session: Any, org: Any, settings: Any, storage: Any, body: ChatRequest | CompletionRequest) -> _Job:
    """Everything that can fail with a 4xx, before the request takes a generation slot."""
    if (problem := body.unsupported()) is not None:
        raise problem
    adapter = crud.get_visible_adapter(session, org, body.model)
    quotas.check_tokens(session, org, settings)  # hourly token quota (api/quotas.py)
    if (problem := not_servable(adapter)) is not None:
        raise OpenAIError(409, problem, param="model", code="model_not_ready")
    plug, model, tokenizer = plug_for(session, adapter, settings, storage)
    if isinstance(body, ChatRequest):
        param, requested = "messages", body.max_completion_tokens or body.max_tokens
        ids = tokenizer(_chat_prompt(tokenizer, body.messages), add_special_tokens=False).input_ids
    else:
        param, requested = "prompt", body.max_tokens
        ids = tokenizer(body.prompt).input_ids
    if not ids:
        raise OpenAIError(400, "the prompt is empty", param=param, code="invalid_value")
    sampling = Sampling(
        max_tokens=_max_tokens(requested, len(ids), context_limit(model), settings.max_new_tokens, param),
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        stop=tuple(body.stop or ()),
        seed=body.seed,
    )
    return _Job(adapter.id, Generation(model, tokenizer, list(ids), sampling, plugged_lease(plug, settings)))


def _audit(session: Any, org: Any, job: _Job, endpoint: str, stream: bool) -> None:
    crud.audit(
        session,
        org,
        "generate",
        "adapter",
        job.adapter_id,
        api=f"openai {endpoint}",
        max_tokens=job.generation.sampling.max_tokens,
        stream=stream,
    )
    session.commit()


# ---------------------------------------------------------------- responses


def _chunk(meta: dict[str, Any], chat: bool, text: str | None, finish: str | None, first: bool = False) -> str:
    if chat:
        delta = {"role": "assistant", "content": text} if first else ({} if text is None else {"content": text})
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
    return _event({**meta, "object": "chat.completion.chunk" if chat else "text_completion", "choices": [choice]})


def _event(doc: dict[str, Any]) -> str:
    return f"data: {json.dumps(doc)}\n\n"


async def _sse(stream: Any, job: _Job, meta: dict[str, Any], chat: bool, usage: bool) -> AsyncIterator[str]:
    """OpenAI's stream: a role chunk (chat), one chunk per text delta, a chunk with finish_reason, the usage
    chunk if asked for, then `data: [DONE]`. A failure mid-stream is an error event (the status is sent)."""
    try:
        if chat:
            yield _chunk(meta, chat, "", None, first=True)
        async for delta in stream:
            yield _chunk(meta, chat, delta, None)
        yield _chunk(meta, chat, None, job.generation.finish_reason)
        if usage:
            yield _event(
                {
                    **meta,
                    "object": "chat.completion.chunk" if chat else "text_completion",
                    "choices": [],
                    "usage": job.usage(),
                }
            )
    except Exception:
        log.exception("generation failed mid-stream")
        yield _event(OpenAIError(500, "generation failed; the server log has details", code="internal_error").body())
    finally:
        stream.cancelled.set()
    yield "data: [DONE]\n\n"


async def _serve(
    body: ChatRequest | CompletionRequest, session: Any, org: Any, settings: Any, storage: Any, engine: GenerationEngine
) -> Response:
    chat = isinstance(body, ChatRequest)
    job = await run_in_threadpool(_prepare, session, org, settings, storage, body)
    try:
        stream = engine.open(job.generation.deltas())
    except EngineBusy as exc:
        raise OpenAIError(429, str(exc), code="queue_full", headers={"Retry-After": "1"}) from None
    try:
        await run_in_threadpool(_audit, session, org, job, "chat.completions" if chat else "completions", body.stream)
    except BaseException:
        stream.cancelled.set()
        raise
    meta = {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}",
        "created": int(time.time()),
        "model": job.adapter_id,
        "system_fingerprint": None,
    }
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            quotas.charged_stream(
                _sse(stream, job, meta, chat, usage), session, org, lambda: job.generation.completion_tokens
            ),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    text = await stream.text()
    await run_in_threadpool(quotas.charge_tokens, session, org, job.generation.completion_tokens)
    finish = job.generation.finish_reason
    choice = (
        {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish, "logprobs": None}
        if chat
        else {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
    )
    return JSONResponse(
        {**meta, "object": "chat.completion" if chat else "text_completion", "choices": [choice], "usage": job.usage()}
    )


@router.post("/chat/completions", responses=ERR)
async def chat_completions(
    body: ChatRequest, session: SessionDep, org: OrgDep, settings: SettingsDep, storage: StorageDep, engine: EngineDep
) -> Response:
    """OpenAI chat completion from the plugged-in model M' = [A', E]; the prompt is built with the chat
    template of the base model's tokenizer. `stream: true` answers with server-sent events."""
    return await _serve(body, session, org, settings, storage, engine)


@router.post("/completions", responses=ERR)
async def completions(
    body: CompletionRequest,
    session: SessionDep,
    org: OrgDep,
    settings: SettingsDep,
    storage: StorageDep,
    engine: EngineDep,
) -> Response:
    """OpenAI text completion of one prompt from the plugged-in model M' = [A', E]."""
    return await _serve(body, session, org, settings, storage, engine)


def _model_entry(adapter: Any) -> dict[str, Any]:
    created = adapter.created_at if adapter.created_at.tzinfo else adapter.created_at.replace(tzinfo=UTC)
    return {
        "id": adapter.id,
        "object": "model",
        "created": int(created.timestamp()),
        "owned_by": adapter.org_id,
        "base_model_id": adapter.model_id,
        "emulator_id": adapter.emulator_id,
        "status": adapter.status,
    }


@router.get("/models", responses=ERR)
def list_models(session: SessionDep, org: OrgDep) -> dict[str, Any]:
    """The adapters this organization may use; `id` is what `model` takes in the other calls."""
    return {"object": "list", "data": [_model_entry(a) for a in session.execute(crud.visible_adapters(org)).scalars()]}


@router.get("/models/{model}", responses=ERR)
def get_model(model: str, session: SessionDep, org: OrgDep) -> dict[str, Any]:
    """One adapter as an OpenAI model object."""
    return _model_entry(crud.get_visible_adapter(session, org, model))
