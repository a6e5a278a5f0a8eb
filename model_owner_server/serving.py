"""Text generation from plugged-in models: sampling, the token loop, and a bounded engine that runs it.

Why a dedicated engine: one generation holds the CPU/GPU for seconds. Run on the event loop it would stall
every other request; run on an unbounded thread pool a burst of requests would thrash the device and every
caller would wait longer. The engine runs at most `concurrency` generations at once, lets `queue_size` more
wait for a slot and refuses the rest at once (`EngineBusy`, a 429 at the API), so overload is visible and
latency stays bounded. Every generation path (the OpenAI-compatible routes, POST /v1/adapters/{id}/generate
and the console's form) goes through the app's one engine.

Why no copy of M per adapter: a generation leases a resident plugged copy from model_cache.PluggedPool
(at most SCALEOT_PLUGGED_COPIES, each owning only the adapter layers), so memory stays bounded whatever the
number of adapters, and only adapters whose evaluation succeeded are served (`not_servable`).

Why our own token loop instead of `model.generate`: a seeded request must give the same text whatever else
runs at the same time, so every request samples from its own `torch.Generator` (generate() only knows the
process-global RNG); and streaming and stop strings need the text token by token.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import secrets
import threading
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch

from model_owner_server.model_cache import Plug

log = logging.getLogger("scaleot.serving")
_END = object()  # end-of-stream marker passed from the worker thread to the event loop


@dataclass(frozen=True)
class Sampling:
    """OpenAI's sampling knobs. temperature 0 is greedy; top_p keeps the smallest set of tokens whose
    probability mass reaches top_p; stop strings end the text (and are not part of it)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


def context_limit(model: Any) -> int | None:
    """The model's context length in tokens (None when its config does not say)."""
    cfg = model.config
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)


def not_servable(adapter: Any) -> str | None:
    """Why an adapter may not generate yet, or None: only an adapter whose plug-in evaluation succeeded is
    served (its file passed the checks the evaluation makes, and its owner has seen its scores)."""
    if adapter.status == "evaluated":
        return None
    if adapter.status == "evaluating":
        return (
            f"adapter {adapter.id} is still being evaluated (job {adapter.job_id}); it can generate once its "
            f"status is 'evaluated': wait for the job (GET /v1/adapters/{adapter.id}) and retry"
        )
    return (
        f"adapter {adapter.id} is not served: its evaluation ended '{adapter.status}'"
        + (f" ({adapter.error})" if getattr(adapter, "error", None) else "")
        + "; fix the adapter (or its eval data) and upload it again"
    )


def plug_for(session: Any, adapter: Any, settings: Any, storage: Any) -> tuple[Plug, Any, Any]:
    """(plug, M, tokenizer) for an adapter row: M and its tokenizer from the full-model cache (loaded once per
    (path, device, the model's compute dtype)); `plug` puts the adapter into a resident copy of M when a
    generation leases it, with its tensors from the bounded adapter cache (read and checked against M at first
    use)."""
    from model_owner_server.model_cache import adapter_tensors, load_full_model
    from model_owner_server.models import EmulatorRow, RegisteredModel
    from model_owner_server.scaleot.plugin import check_adapter
    from shared.adapter import spec_from_json
    from shared.lora import issued_lora, load_adapter

    emu = session.get(EmulatorRow, adapter.emulator_id)
    model_row = session.get(RegisteredModel, adapter.model_id)
    from model_owner_server.jobs.resources import resolve_compute_dtype
    from shared.device import resolve_device

    device = str(resolve_device(str(settings.device)).device)
    dtype = resolve_compute_dtype(getattr(model_row, "compute_dtype", None), model_row.path, device)
    model, tokenizer = load_full_model(model_row.path, device, settings.model_cache_size, dtype)
    spec, lora, layers = spec_from_json(emu.adapter_spec), issued_lora(emu.build_info), list(emu.adapter_layers)
    path, key = storage.abs(adapter.path), (adapter.id, adapter.sha256)

    def load() -> dict[str, torch.Tensor]:
        tensors = load_adapter(path, spec, lora)
        check_adapter(model, tensors, layers, spec, lora)
        return tensors

    def tensors() -> dict[str, torch.Tensor]:
        return adapter_tensors(settings.adapter_cache_mb).get_or_load(key, load)

    return Plug(adapter.id, model, tuple(layers), tensors, lora), model, tokenizer


def plugged_lease(plug: Plug, settings: Any) -> Callable[[], AbstractContextManager[Any]]:
    """What a Generation calls (in its worker thread) to get the plugged model for its token loop."""
    from model_owner_server.model_cache import plugged_pool

    return lambda: plugged_pool(settings.plugged_copies).lease(plug)


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for value in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


@dataclass
class Scores:
    """Per-position log-probabilities (OpenAI's `logprobs`): `logprobs[i]` is the model's log-softmax
    (temperature 1, float32) of token `ids[i]` given the tokens before it (None for a prompt's first token,
    which nothing predicts); `top[i]` the `k` most likely (token id, log-probability) pairs there."""

    ids: list[int] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)

    def add(self, log_probs: torch.Tensor, token: int, k: int) -> None:
        """Record `token` scored by one row of log-probabilities (on any device)."""
        self.ids.append(token)
        self.logprobs.append(float(log_probs[token]))
        values, ids = torch.topk(log_probs, k) if k else (log_probs[:0], log_probs[:0].long())
        self.top.append(list(zip(ids.tolist(), values.tolist(), strict=True)))


SCORE_CHUNK = 256  # prompt positions turned into log-probabilities at once (bounds the float32 vocab rows)


def score_prompt(logits: torch.Tensor, ids: list[int], k: int) -> Scores:
    """The prompt's scores from one forward pass's logits (positions x vocab): position i predicts ids[i+1]."""
    scores = Scores(ids=[ids[0]], logprobs=[None], top=[[]])
    for start in range(0, len(ids) - 1, SCORE_CHUNK):
        rows = torch.log_softmax(logits[start : start + SCORE_CHUNK].float(), dim=-1)
        targets = torch.tensor(ids[start + 1 : start + 1 + len(rows)], device=rows.device)
        scores.ids.extend(targets.tolist())
        scores.logprobs.extend(rows.gather(1, targets[:, None])[:, 0].tolist())
        if k:
            values, top = torch.topk(rows, k, dim=-1)
            scores.top.extend(list(zip(i, v, strict=True)) for i, v in zip(top.tolist(), values.tolist(), strict=True))
        else:
            scores.top.extend([] for _ in range(len(rows)))
    return scores


def token_texts(tokenizer: Any, ids: list[int], skip_special_tokens: bool) -> list[str]:
    """Each token's share of `tokenizer.decode(ids)`: joined they give the decoded text, so character offsets
    add up. Decoded incrementally against the tokens just before (a token's text can depend on them: a
    SentencePiece word's leading space), and a token that ends inside a UTF-8 character gets "" until the
    one that completes it. O(n), unlike decoding every prefix."""
    texts: list[str] = []
    prefix = read = 0
    for i in range(len(ids)):
        before = tokenizer.decode(ids[prefix:read], skip_special_tokens=skip_special_tokens)
        now = tokenizer.decode(ids[prefix : i + 1], skip_special_tokens=skip_special_tokens)
        if len(now) > len(before) and not now.endswith("\ufffd"):
            texts.append(now[len(before) :])
            prefix, read = read, i + 1
        else:
            texts.append("")
    if texts:  # what a trailing incomplete character decodes to (U+FFFD) belongs to the last token
        joined, full = "".join(texts), tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        if len(full) > len(joined) and full.startswith(joined):
            texts[-1] += full[len(joined) :]
    return texts


def pick_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """One token from a 1-D row of logits (on the CPU, in float32: the same seed gives the same token)."""
    if sampling.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        # Keep a token while the mass before it is below top_p: the most likely token always stays.
        sorted_p = torch.where(torch.cumsum(sorted_p, 0) - sorted_p < sampling.top_p, sorted_p, 0.0)
        return int(order[torch.multinomial(sorted_p, 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters must wait: the start of a stop string, or an incomplete UTF-8
    character (byte-level tokenizers decode half a character as U+FFFD)."""
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:k]):
                hold = k
                break
    while hold < len(text) and text[len(text) - hold - 1] == "\ufffd":
        hold += 1
    return hold


@dataclass
class Generation:
    """One prompt's continuation as text deltas (iterate `deltas()`); afterwards `finish_reason`
    ("stop": end of text or a stop string, "length": max_tokens) and `completion_tokens` are set.

    With `lease`, the token loop runs on the model the lease yields (a resident plugged copy, taken in the
    worker thread when the generation starts and given back when it ends); `model` is then M, whose config
    and generation config the plugged copy shares.

    With `logprobs` (k, 0 included), every generated token is scored into `scores`, and the end-of-text
    token too when it ends the text (lm-eval reads one token past the prompt); with `echo` as well, the prompt
    is scored into `prompt_scores` from the same forward pass that starts the generation. `max_tokens` 0
    (only with echo) scores the prompt and generates nothing."""

    model: Any
    tokenizer: Any
    prompt_ids: list[int]
    sampling: Sampling
    lease: Callable[[], AbstractContextManager[Any]] | None = None
    logprobs: int | None = None
    echo: bool = False
    finish_reason: str = "length"
    scores: Scores = field(default_factory=Scores)
    prompt_scores: Scores | None = None
    _generated: list[int] = field(default_factory=list, repr=False)

    @property
    def completion_tokens(self) -> int:
        return len(self._generated)

    def deltas(self) -> Generator[str, None, None]:
        if self.lease is None:
            yield from self._deltas(self.model)
            return
        with self.lease() as model:
            yield from self._deltas(model)

    def _deltas(self, model: Any) -> Iterator[str]:
        s = self.sampling
        generator = torch.Generator().manual_seed(s.seed if s.seed is not None else secrets.randbits(63))
        eos = _eos_ids(model, self.tokenizer)
        device = next(model.parameters()).device
        params = inspect.signature(model.forward).parameters
        keep_last = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        cache_arg = "cache" if "cache" in params else "past_key_values"  # transformers 5 renamed it
        ids = torch.tensor([self.prompt_ids], device=device)
        past, sent = None, 0
        score_prompt_now = self.echo and self.logprobs is not None
        with torch.inference_mode():
            if s.max_tokens == 0:
                if score_prompt_now:
                    logits = model(input_ids=ids, use_cache=False).logits[0]
                    self.prompt_scores = score_prompt(logits, self.prompt_ids, self.logprobs or 0)
                return
            for _ in range(s.max_tokens):
                extra = {} if score_prompt_now else keep_last  # the prompt's scores need every position
                out = model(input_ids=ids, use_cache=True, **{cache_arg: past}, **extra)
                past = out.get(cache_arg)
                if score_prompt_now:
                    self.prompt_scores = score_prompt(out.logits[0], self.prompt_ids, self.logprobs or 0)
                    score_prompt_now = False
                row = out.logits[0, -1].float()
                token = pick_token(row.cpu(), s, generator)
                if self.logprobs is not None:
                    self.scores.add(torch.log_softmax(row, dim=-1), token, self.logprobs)
                if token in eos:
                    self.finish_reason = "stop"
                    break
                self._generated.append(token)
                text = self.tokenizer.decode(self._generated, skip_special_tokens=True)
                hits = [i for i in (text.find(stop, max(0, sent - len(stop))) for stop in s.stop) if i >= 0]
                if hits:
                    self.finish_reason = "stop"
                    end = min(hits)
                    if end > sent:
                        yield text[sent:end]
                    return
                safe = len(text) - _held_back(text, s.stop)
                if safe > sent:
                    yield text[sent:safe]
                    sent = safe
                ids = torch.tensor([[token]], device=device)
        text = self.tokenizer.decode(self._generated, skip_special_tokens=True)
        if len(text) > sent:
            yield text[sent:]  # what was held back for a stop string that never came


class EngineBusy(Exception):
    """Every generation slot is taken and the waiting queue is full."""


class TextStream:
    """Text deltas produced in a worker thread, consumed on the event loop that opened the stream."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self.cancelled = threading.Event()  # set by the consumer; the worker stops at its next token

    def put(self, item: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop is gone (server shutting down): nobody is listening any more
            self.cancelled.set()

    async def __aiter__(self) -> AsyncIterator[str]:
        try:
            while True:
                item = await self._queue.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.cancelled.set()  # a client that went away frees its slot at the next token

    async def text(self) -> str:
        return "".join([delta async for delta in self])


class GenerationEngine:
    """At most `concurrency` generations at once on a dedicated thread pool, `queue_size` more waiting."""

    def __init__(self, concurrency: int, queue_size: int):
        self.concurrency, self.queue_size = concurrency, queue_size
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="scaleot-generate")
        self._slots = threading.BoundedSemaphore(concurrency + queue_size)  # running + waiting

    def open(self, deltas: Iterator[str]) -> TextStream:
        """Admit a generation (raises EngineBusy when full) and start it; call this on the event loop."""
        if not self._slots.acquire(blocking=False):
            raise EngineBusy(
                f"the server is busy: {self.concurrency} generation(s) running and {self.queue_size} "
                "waiting; retry in a moment (the model owner can raise SCALEOT_GENERATION_CONCURRENCY "
                "/ SCALEOT_GENERATION_QUEUE)"
            )
        stream = TextStream(asyncio.get_running_loop())
        try:
            self._pool.submit(self._drive, deltas, stream)
        except BaseException:
            self._slots.release()
            raise
        return stream

    def _drive(self, deltas: Iterator[str], stream: TextStream) -> None:
        try:
            if not stream.cancelled.is_set():  # its client left while it waited in the queue
                for delta in deltas:
                    stream.put(delta)
                    if stream.cancelled.is_set():
                        break
            stream.put(_END)
        except BaseException as exc:
            stream.put(exc)
        finally:
            try:
                close = getattr(deltas, "close", None)
                if close is not None:
                    close()  # a stopped generator gives back what it holds (its plugged copy) now, not at GC
            except Exception:
                log.exception("closing a generation failed")
            finally:
                self._slots.release()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
