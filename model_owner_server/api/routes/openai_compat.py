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
import re
import secrets
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import closing
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
    token_texts,
)

log = logging.getLogger("scaleot.openai")

router = APIRouter(prefix="/openai/v1", tags=["openai"], route_class=OpenAIRoute)
ERR: dict[int | str, dict[str, Any]] = {
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
    """One request's generations (one per prompt, run in turn in one engine slot) and how to answer."""

    adapter_id: str
    generations: list[Generation]
    tokenizer: Any
    echo_texts: list[str]  # per prompt: the prompt as its tokens decode with echo, else ""

    @property
    def generation(self) -> Generation:
        return self.generations[0]

    def completion_tokens(self) -> int:
        return sum(g.completion_tokens for g in self.generations)

    def charged_tokens(self) -> int:
        """Generated tokens, plus the prompt tokens a scoring pass (echo with logprobs) computed."""
        scored = sum(len(g.prompt_scores.ids) for g in self.generations if g.prompt_scores is not None)
        return self.completion_tokens() + scored

    def usage(self) -> dict[str, int]:
        p, c = sum(len(g.prompt_ids) for g in self.generations), self.completion_tokens()
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
    want = 1 if requested is None else requested
    room = None if limit is None else limit - prompt_len
    if room is not None and room < want:
        raise OpenAIError(
            400,
            f"this model's maximum context length is {limit} tokens; the prompt has {prompt_len} "
            f"tokens and {want} more were asked for; shorten the prompt or lower max_tokens",
            param=param,
            code="context_length_exceeded",
        )
    return requested if requested is not None else (cap if room is None else min(cap, room))


def _prompt_ids(tokenizer: Any, model: Any, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        return list(tokenizer(prompt).input_ids)
    vocab = model.get_input_embeddings().num_embeddings
    if max(prompt) >= vocab:
        raise OpenAIError(
            400,
            f"token id {max(prompt)} is not in this model's vocabulary (0 to {vocab - 1}); tokenize the prompt "
            "with the base model's tokenizer",
            param="prompt",
            code="invalid_value",
        )
    return list(prompt)


def _prepare(session: Any, org: Any, settings: Any, storage: Any, body: ChatRequest | CompletionRequest) -> _Job:
    """Everything that can fail with a 4xx, before the request takes a generation slot."""
    if (problem := body.unsupported()) is not None:
        raise problem
    k, echo = (body.logprobs_k(), False) if isinstance(body, ChatRequest) else (body.logprobs, body.echo)
    if body.stream and (k is not None or echo):
        raise OpenAIError(
            400,
            "logprobs and echo are answered without streaming here; leave out stream",
            param="stream",
            code="unsupported_parameter",
        )
    if body.max_tokens == 0 and not echo:
        raise OpenAIError(
            400,
            "max_tokens 0 only makes sense with echo: true (the prompt's log-probabilities)",
            param="max_tokens",
            code="invalid_value",
        )
    prompts = body.prompts() if isinstance(body, CompletionRequest) else []
    if body.stream and len(prompts) > 1:
        raise OpenAIError(
            400, "stream takes one prompt; send one request per prompt", param="prompt", code="invalid_value"
        )
    adapter = crud.get_visible_adapter(session, org, body.model)
    quotas.check_tokens(session, org, settings)  # hourly token quota (api/quotas.py)
    if (reason := not_servable(adapter)) is not None:
        raise OpenAIError(409, reason, param="model", code="model_not_ready")
    plug, model, tokenizer = plug_for(session, adapter, settings, storage)
    if isinstance(body, ChatRequest):
        param, requested = "messages", body.max_completion_tokens or body.max_tokens
        all_ids = [tokenizer(_chat_prompt(tokenizer, body.messages), add_special_tokens=False).input_ids]
    else:
        param, requested = "prompt", body.max_tokens
        all_ids = [_prompt_ids(tokenizer, model, p) for p in prompts]
    generations = []
    for ids in all_ids:
        if not ids:
            raise OpenAIError(400, "the prompt is empty", param=param, code="invalid_value")
        sampling = Sampling(
            max_tokens=_max_tokens(requested, len(ids), context_limit(model), settings.max_new_tokens, param),
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            stop=tuple(body.stop or ()),
            seed=body.seed,
        )
        lease = plugged_lease(plug, settings)
        generations.append(Generation(model, tokenizer, list(ids), sampling, lease, logprobs=k, echo=echo))
    echo_texts = [
        "".join(token_texts(tokenizer, g.prompt_ids, skip_special_tokens=False)) if echo else "" for g in generations
    ]
    return _Job(adapter.id, generations, tokenizer, echo_texts)


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
        prompts=len(job.generations),
        logprobs=job.generation.logprobs,
        echo=job.generation.echo,
    )
    session.commit()


def _run_all(job: _Job, texts: list[list[str]]) -> Iterator[str]:
    """A non-streamed request's generations in turn, in its one engine slot; each one's text goes to `texts`.
    Yields "" at every token so the engine can stop it when the client leaves."""
    for generation, out in zip(job.generations, texts, strict=True):
        # deltas() is a generator (serving.py annotates it as an Iterator): closing it stops the generation
        with closing(generation.deltas()) as deltas:
            for delta in deltas:
                out.append(delta)
                yield ""
        yield ""


# ---------------------------------------------------------------- log-probabilities


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet (printable stand-ins for the 256 bytes), character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in chars:
            chars[b], extra = chr(256 + extra), extra + 1
    return {c: b for b, c in chars.items()}


_BYTE_LEVEL = _byte_level_alphabet()
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte-fallback tokens


def token_bytes(tokenizer: Any, token: int) -> bytes | None:
    """A token's raw bytes when its vocabulary entry says (byte-level BPE, SentencePiece byte fallback)."""
    piece = tokenizer.convert_ids_to_tokens(token)
    if not isinstance(piece, str) or not piece:
        return None
    if m := _BYTE_FALLBACK.fullmatch(piece):
        return bytes.fromhex(m.group(1))
    if all(c in _BYTE_LEVEL for c in piece):
        return bytes(_BYTE_LEVEL[c] for c in piece)
    return None


class _Spelling:
    """A candidate token's text where it stands: decoded after the token before it, since a token's text can
    depend on it (a SentencePiece word's leading space). A token that is part of a UTF-8 character is
    spelled `bytes:\\xe2\\x80` as OpenAI does, so distinct tokens stay distinct keys of top_logprobs."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def __call__(self, before: int | None, token: int) -> str:
        decode = self.tokenizer.decode
        text = decode([token], skip_special_tokens=False)
        if before is not None:
            anchor, joined = (
                decode([before], skip_special_tokens=False),
                decode([before, token], skip_special_tokens=False),
            )
            if joined.startswith(anchor) and not anchor.endswith("\ufffd"):
                text = joined[len(anchor) :]
        if "\ufffd" in text and (raw := token_bytes(self.tokenizer, token)) is not None:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
        return text


def _scored_tokens(job: _Job, g: Generation, echo: bool) -> list[tuple[str, float | None, int | None, Any]]:
    """(text, logprob, token before it, (scores, position)) for every scored token, in order: the prompt's
    (with echo), then the generated ones (and the end-of-text token when it ended the text)."""
    out: list[tuple[str, float | None, int | None, Any]] = []
    tok = job.tokenizer
    if echo and g.prompt_scores is not None:
        ps = g.prompt_scores
        for i, text in enumerate(token_texts(tok, ps.ids, skip_special_tokens=False)):
            out.append((text, ps.logprobs[i], ps.ids[i - 1] if i else None, (ps, i)))
    generated = g.scores.ids[: g.completion_tokens]
    texts = token_texts(tok, generated, skip_special_tokens=True)
    texts += [tok.decode([t], skip_special_tokens=False) for t in g.scores.ids[g.completion_tokens :]]
    sequence = g.prompt_ids + g.scores.ids
    for j, text in enumerate(texts):
        out.append((text, g.scores.logprobs[j], sequence[len(g.prompt_ids) + j - 1], (g.scores, j)))
    return out


def _completion_logprobs(job: _Job, g: Generation, echo: bool, text: str) -> dict[str, Any]:
    """OpenAI's legacy `logprobs`: tokens, token_logprobs, top_logprobs (dicts text -> logprob, with the
    chosen token always among them; null where nothing predicts the token) and text_offset (character
    offsets into the returned text, capped at its length: the end-of-text token and those cut by a stop
    string sit at its end)."""
    spell = _Spelling(job.tokenizer)
    doc: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = 0
    for token_text, logprob, before, (scores, i) in _scored_tokens(job, g, echo):
        doc["tokens"].append(token_text)
        doc["token_logprobs"].append(logprob)
        doc["text_offset"].append(min(offset, len(text)))
        offset += len(token_text)
        if logprob is None:
            doc["top_logprobs"].append(None)
            continue
        top: dict[str, float] = {}
        for cand, lp in scores.top[i]:
            top.setdefault(spell(before, cand), lp)
        top.setdefault(spell(before, scores.ids[i]), logprob)
        doc["top_logprobs"].append(top)
    return doc


def _chat_logprobs(job: _Job, g: Generation) -> dict[str, Any]:
    """Chat's `logprobs`: {content: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]} for the
    generated tokens (the end-of-text token is not part of the message)."""
    spell = _Spelling(job.tokenizer)

    def entry(text: str, logprob: float, token: int) -> dict[str, Any]:
        raw = token_bytes(job.tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": list(raw if raw is not None else text.encode("utf-8"))}

    content = []
    for text, logprob, before, (scores, i) in _scored_tokens(job, g, echo=False)[: g.completion_tokens]:
        tops = [entry(spell(before, cand), lp, cand) for cand, lp in scores.top[i]]
        content.append({**entry(text, float(logprob or 0.0), scores.ids[i]), "top_logprobs": tops})
    return {"content": content, "refusal": None}


def _choices(job: _Job, texts: list[list[str]], chat: bool) -> list[dict[str, Any]]:
    """The answer's choices, one per prompt (a worker thread: turning scores into text takes a moment)."""
    choices = []
    for index, (g, parts, echoed) in enumerate(zip(job.generations, texts, job.echo_texts, strict=True)):
        text, finish = echoed + "".join(parts), g.finish_reason
        if chat:
            logprobs = _chat_logprobs(job, g) if g.logprobs is not None else None
            message = {"role": "assistant", "content": text}
            choices.append({"index": index, "message": message, "finish_reason": finish, "logprobs": logprobs})
        else:
            logprobs = _completion_logprobs(job, g, g.echo, text) if g.logprobs is not None else None
            choices.append({"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs})
    return choices


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
    texts: list[list[str]] = [[] for _ in job.generations]
    try:
        stream = engine.open(job.generation.deltas() if body.stream else _run_all(job, texts))
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
            quotas.charged_stream(_sse(stream, job, meta, chat, usage), session, org, job.charged_tokens),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    await stream.text()  # runs every generation; their text is in `texts`
    await run_in_threadpool(quotas.charge_tokens, session, org, job.charged_tokens())
    choices = await run_in_threadpool(_choices, job, texts, chat)
    return JSONResponse(
        {**meta, "object": "chat.completion" if chat else "text_completion", "choices": choices, "usage": job.usage()}
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
