"""The OpenAI-compatible API (/openai/v1) through the real `openai` client, against a real HTTP server: uvicorn
on loopback in a thread, serving the `world` app (tiny LLaMA, alice's evaluated adapter). Checks: models list
and authz, non-streaming and streaming completions and chat, greedy text equal to the in-process model's,
seeded sampling, stop strings, top_p, bad input in OpenAI's error shape, and the full-queue 429."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager

import openai
import pytest
import torch
from server_helpers import engine_full

from model_owner_server.api.routes.openai_compat import get_engine
from model_owner_server.model_cache import load_full_model
from model_owner_server.models import AdapterRow, EmulatorRow, RegisteredModel
from model_owner_server.scaleot.plugin import plug_in_file
from model_owner_server.serving import EngineBusy, GenerationEngine
from tooling.procs import uvicorn_in_thread

PROMPT = "the quick brown fox"
TEMPLATE = (
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@contextmanager
def loopback_server(app) -> Iterator[str]:
    """`app` (already started by its TestClient, so lifespan off) behind a real uvicorn server on loopback;
    yields the OpenAI base URL."""
    with uvicorn_in_thread(app) as port:
        yield f"http://127.0.0.1:{port}/openai/v1"


@pytest.fixture(scope="module")
def base_url(world) -> Iterator[str]:
    """The world's app behind a real uvicorn server."""
    with loopback_server(world.client.app) as url:
        yield url


def client(world, base_url: str, org: str = "alice", key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=key or world.keys[org], max_retries=0, timeout=60)


def complete(c: openai.OpenAI, adapter: str, **kw) -> tuple[str, str]:
    """(text, finish_reason) of a non-streaming completion."""
    r = c.completions.create(model=adapter, prompt=kw.pop("prompt", PROMPT), **kw)
    assert r.model == adapter and len(r.choices) == 1
    return r.choices[0].text, r.choices[0].finish_reason


def stream_text(c: openai.OpenAI, adapter: str, **kw) -> tuple[str, str, list]:
    """(joined text, finish_reason, chunks) of a streamed completion."""
    chunks = list(c.completions.create(model=adapter, prompt=kw.pop("prompt", PROMPT), stream=True, **kw))
    finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    return "".join(ch.choices[0].text for ch in chunks if ch.choices), finish[0], chunks


def in_process_model(world, adapter_id: str | None = None):
    """The plugged-in model as the evaluation made it (a standalone copy of M with the adapter's layers)."""
    with world.sessions() as s:
        adapter = s.get(AdapterRow, adapter_id or world.adapter_id)
        emu = s.get(EmulatorRow, adapter.emulator_id)
        model = load_full_model(s.get(RegisteredModel, world.model_id).path, world.settings.resolved_device())[0]
        return plug_in_file(
            model,
            world.client.app.state.storage.abs(adapter.path),
            emu.adapter_layers,
            emu.adapter_spec,
            emu.build_info,
        )


def in_process_greedy(world, prompt: str, n: int) -> str:
    """The plugged-in model called directly with Hugging Face generate (greedy): the server's resident copy,
    its adapter layers swapped in, must give the same text."""
    plugged = in_process_model(world)
    tokenizer = _tokenizer(world)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = plugged.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def _tokenizer(world):
    with world.sessions() as s:
        path = s.get(RegisteredModel, world.model_id).path
    return load_full_model(path, world.settings.resolved_device(), world.settings.model_cache_size)[1]


def error_of(exc: openai.APIStatusError) -> dict:
    body = exc.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def test_models_lists_the_adapters_this_organization_may_use(world, base_url):
    alice = client(world, base_url)
    ids = [m.id for m in alice.models.list()]
    assert world.adapter_id in ids and all(i.startswith("adp_") for i in ids)
    assert alice.models.retrieve(world.adapter_id).owned_by == world.org_ids["alice"]
    assert list(client(world, base_url, "mallory").models.list()) == []
    assert world.adapter_id not in [m.id for m in client(world, base_url, "bob").models.list()]
    with pytest.raises(openai.NotFoundError) as exc:
        client(world, base_url, "bob").models.retrieve(world.adapter_id)
    assert error_of(exc.value)["code"] == "model_not_found"


def test_greedy_completion_equals_the_in_process_model_streamed_or_not(world, base_url):
    c = client(world, base_url)
    r = c.completions.create(model=world.adapter_id, prompt=PROMPT, max_tokens=12, temperature=0)
    text, finish = r.choices[0].text, r.choices[0].finish_reason
    assert text and text == in_process_greedy(world, PROMPT, 12) and r.object == "text_completion"
    assert r.usage.prompt_tokens == len(PROMPT)  # byte-level tokenizer: one token per byte
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert (finish, r.usage.completion_tokens) == ("length", 12) or finish == "stop"
    streamed, s_finish, chunks = stream_text(
        c, world.adapter_id, max_tokens=12, temperature=0, stream_options={"include_usage": True}
    )
    assert (streamed, s_finish) == (text, finish) and len(chunks) > 2
    assert chunks[-1].choices == [] and chunks[-1].usage == r.usage


def test_seeded_sampling_is_reproducible_and_top_p_near_zero_is_greedy(world, base_url):
    c = client(world, base_url)
    first, _ = complete(c, world.adapter_id, max_tokens=16, temperature=1.0, seed=7)
    assert complete(c, world.adapter_id, max_tokens=16, temperature=1.0, seed=7)[0] == first
    assert stream_text(c, world.adapter_id, max_tokens=16, temperature=1.0, seed=7)[0] == first
    assert complete(c, world.adapter_id, max_tokens=16, temperature=1.0, seed=8)[0] != first
    greedy, _ = complete(c, world.adapter_id, max_tokens=16, temperature=0)
    assert complete(c, world.adapter_id, max_tokens=16, temperature=1.5, top_p=1e-6, seed=3)[0] == greedy


def test_stop_strings_end_the_text_streamed_or_not(world, base_url):
    c = client(world, base_url)
    sampled = {"max_tokens": 24, "temperature": 1.0, "seed": 5}  # random bytes: varied text (greedy repeats)
    full, _ = complete(c, world.adapter_id, **sampled)
    i = next(i for i in range(1, len(full) - 2) if "\ufffd" not in full[i : i + 2] and full.find(full[i : i + 2]) == i)
    stop = full[i : i + 2]
    assert complete(c, world.adapter_id, stop=[stop, "\x00never"], **sampled) == (full[:i], "stop")
    assert stream_text(c, world.adapter_id, stop=stop, **sampled)[:2] == (full[:i], "stop")


@pytest.fixture
def chat_template(world) -> Iterator[None]:
    """Give the tiny model's (cached) tokenizer a chat template for one test; the model folder has none."""
    tokenizer = _tokenizer(world)
    tokenizer.chat_template = TEMPLATE
    yield
    tokenizer.chat_template = None


def test_chat_without_a_chat_template_is_a_clear_error(world, base_url):
    with pytest.raises(openai.BadRequestError) as exc:
        client(world, base_url).chat.completions.create(
            model=world.adapter_id, messages=[{"role": "user", "content": "hi"}]
        )
    err = error_of(exc.value)
    assert err["code"] == "chat_template_missing" and "/openai/v1/completions" in err["message"]


def test_chat_renders_the_tokenizers_template(world, base_url, chat_template):
    c = client(world, base_url)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the quick"}]
    r = c.chat.completions.create(model=world.adapter_id, messages=messages, max_tokens=10, temperature=0)
    rendered = "<system>be brief\n<user>the quick\n<assistant>"
    assert r.choices[0].message.role == "assistant" and r.object == "chat.completion"
    assert (
        r.choices[0].message.content == complete(c, world.adapter_id, prompt=rendered, max_tokens=10, temperature=0)[0]
    )
    assert r.usage.prompt_tokens == len(rendered)
    chunks = list(
        c.chat.completions.create(model=world.adapter_id, messages=messages, max_tokens=10, temperature=0, stream=True)
    )
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == r.choices[0].message.content


@pytest.mark.parametrize(
    "kwargs,error,code,param",
    [
        ({"prompt": "x" * 300}, openai.BadRequestError, "context_length_exceeded", "prompt"),
        ({"prompt": "x" * 250, "max_tokens": 10}, openai.BadRequestError, "context_length_exceeded", "prompt"),
        ({"model": "adp_doesnotexist"}, openai.NotFoundError, "model_not_found", "model"),
        ({"temperature": -0.5}, openai.BadRequestError, "invalid_value", "temperature"),
        ({"top_p": 1.5}, openai.BadRequestError, "invalid_value", "top_p"),
        ({"n": 2}, openai.BadRequestError, "invalid_value", "n"),
        ({"max_tokens": 10_000}, openai.BadRequestError, "invalid_value", "max_tokens"),
        ({"stop": ["a", "b", "c", "d", "e"]}, openai.BadRequestError, "invalid_value", "stop"),
        ({"extra_body": {"tools": [{"type": "function"}]}}, openai.BadRequestError, "unsupported_parameter", "tools"),
    ],
)
def test_bad_input_is_an_openai_error(world, base_url, kwargs, error, code, param):
    args = {"model": world.adapter_id, "prompt": PROMPT, "max_tokens": 4, **kwargs}
    with pytest.raises(error) as exc:
        client(world, base_url).completions.create(**args)
    err = error_of(exc.value)
    assert (err["code"], err["param"], err["type"]) == (code, param, "invalid_request_error"), err
    assert err["message"]


def test_keys_and_other_organizations_adapters(world, base_url):
    with pytest.raises(openai.AuthenticationError) as exc:
        client(world, base_url, key="not-a-key").models.list()
    assert error_of(exc.value)["type"] == "authentication_error"
    assert exc.value.response.headers["www-authenticate"] == "Bearer"
    for org in ("bob", "mallory"):  # bob is granted the same model, mallory is not: neither sees alice's adapter
        with pytest.raises(openai.NotFoundError) as exc:
            complete(client(world, base_url, org), world.adapter_id, max_tokens=2)
        assert error_of(exc.value)["code"] == "model_not_found"


def test_a_full_queue_is_a_429_and_other_requests_are_still_served(world, base_url):
    with engine_full(get_engine(world.client)):  # anything with .app: the engine of the app uvicorn serves
        c = client(world, base_url)
        for stream in (False, True):
            with pytest.raises(openai.RateLimitError) as exc:
                c.completions.create(model=world.adapter_id, prompt=PROMPT, max_tokens=2, stream=stream)
            assert error_of(exc.value)["code"] == "queue_full" and exc.value.response.headers["retry-after"]
        assert world.adapter_id in [m.id for m in c.models.list()]  # the event loop is not blocked
    deadline = time.monotonic() + 30
    while True:  # the slots come back once the blocked generations end
        try:
            assert complete(client(world, base_url), world.adapter_id, max_tokens=2, temperature=0)[0] is not None
            break
        except openai.RateLimitError:
            assert time.monotonic() < deadline, "generation slots were not released"
            time.sleep(0.05)


def test_a_stream_whose_reader_leaves_frees_its_slot():
    """A client that disconnects mid-stream (the response's iterator is closed) stops its generation at the next
    token, so its slot is free again: the engine never keeps generating for nobody."""
    engine = GenerationEngine(concurrency=1, queue_size=0)
    produced: list[int] = []

    def endless() -> Iterator[str]:
        while True:
            produced.append(1)
            time.sleep(0.002)
            yield "x"

    async def leave_then_reuse() -> str:
        reader = engine.open(endless()).__aiter__()
        assert await reader.__anext__() == "x"
        with pytest.raises(EngineBusy):
            engine.open(iter(["never"]))
        await reader.aclose()  # what Starlette does to the body iterator when the client goes away
        deadline = time.monotonic() + 10
        while True:
            try:
                return await engine.open(iter(["again"])).text()
            except EngineBusy:
                assert time.monotonic() < deadline, "the slot was not released"
                await asyncio.sleep(0.01)

    assert asyncio.run(leave_then_reuse()) == "again"
    stopped_at = len(produced)
    time.sleep(0.05)
    assert len(produced) == stopped_at  # the endless generation really stopped
    engine.shutdown()


# ---------------------------------------------------------------- log-probabilities (logprobs, echo)

TOL = 1e-5  # float32 log-softmax of the same weights; only the summation order of the two passes differs


def forward_logprobs(world, ids: list[int]) -> torch.Tensor:
    """log-softmax of the in-process plugged model's logits over `ids` (positions x vocab), float32."""
    with torch.no_grad():
        logits = in_process_model(world)(input_ids=torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def charged(world) -> int:
    from sqlalchemy import func, select

    from model_owner_server.models import TokenCharge

    with world.sessions() as s:
        return s.execute(
            select(func.coalesce(func.sum(TokenCharge.tokens), 0)).where(TokenCharge.org_id == world.org_ids["alice"])
        ).scalar_one()


def test_echo_scores_the_prompt_as_the_in_process_forward_pass(world, base_url):
    """echo + max_tokens 0: every prompt token's log-probability equals the plugged model's log-softmax at the
    position before it (the first token's is null), the top-k are the k largest there, tokens join to the
    text and text_offset points into it. The scored tokens are charged to the token quota."""
    ids = _tokenizer(world)(PROMPT).input_ids
    expected = forward_logprobs(world, ids)
    before = charged(world)
    r = client(world, base_url).completions.create(
        model=world.adapter_id, prompt=PROMPT, max_tokens=0, echo=True, logprobs=3
    )
    choice = r.choices[0]
    lp = choice.logprobs
    assert choice.text == PROMPT and "".join(lp.tokens) == PROMPT and len(lp.tokens) == len(ids)
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(ids))]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(float(expected[i - 1, ids[i]]), abs=TOL)
        top = torch.topk(expected[i - 1], 3).values.tolist()
        assert sorted(lp.top_logprobs[i].values(), reverse=True)[:3] == pytest.approx(top, abs=TOL)
        assert lp.tokens[i] in lp.top_logprobs[i]  # the prompt's own token is always listed
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 0)
    assert charged(world) - before == len(ids)


def test_echo_of_multibyte_text_keeps_offsets_and_distinct_byte_tokens(world, base_url):
    """A byte-level tokenizer splits "ü" and "☾" into several tokens: the tokens still join to the text (a
    character's text sits on the token that completes it), and partial-character candidates are spelled
    `bytes:\\xNN` so that no two share a top_logprobs key."""
    prompt = "über ☾ moon"
    r = client(world, base_url).completions.create(
        model=world.adapter_id, prompt=prompt, max_tokens=0, echo=True, logprobs=5
    )
    lp = r.choices[0].logprobs
    assert r.choices[0].text == prompt == "".join(lp.tokens) and len(lp.tokens) == len(prompt.encode())
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(lp.tokens))]
    assert lp.tokens[:2] == ["", "ü"]  # ü is two bytes
    for top, logprob in zip(lp.top_logprobs[1:], lp.token_logprobs[1:], strict=True):
        assert len(top) in (5, 6) and logprob in top.values()
        assert not any("\ufffd" in k for k in top)  # 5 distinct keys (6 with the token): no collisions
    assert any(k.startswith("bytes:\\x") for top in lp.top_logprobs[1:] for k in top)


def test_token_id_prompts_in_a_batch_score_like_lm_eval_asks(world, base_url):
    """What lm-eval's local-completions sends for a log-likelihood: token-id prompts in a batch, echo,
    max_tokens 1, logprobs 1. Each choice scores its own prompt plus the greedy next token (its logprob and the
    top-1 equal the forward pass), in prompt order."""
    ids = _tokenizer(world)(PROMPT).input_ids
    prompts = [ids, ids[:7]]
    r = client(world, base_url).completions.create(
        model=world.adapter_id, prompt=prompts, max_tokens=1, echo=True, logprobs=1, temperature=0
    )
    assert [c.index for c in r.choices] == [0, 1]
    for prompt, choice in zip(prompts, r.choices, strict=True):
        lp = choice.logprobs
        expected = forward_logprobs(world, prompt)
        assert len(lp.token_logprobs) == len(prompt) + 1  # the generated (or end-of-text) token is last
        got = lp.token_logprobs[1:]
        want = [float(expected[i - 1, prompt[i]]) for i in range(1, len(prompt))] + [float(expected[-1].max())]
        assert got == pytest.approx(want, abs=TOL)
        for i, (top, t) in enumerate(zip(lp.top_logprobs[1:], got, strict=True)):
            assert max(top.values()) == pytest.approx(float(expected[i].max()), abs=TOL)
            assert t in top.values() and len(top) == (1 if t == max(top.values()) else 2)  # top-1 + the token
        assert lp.token_logprobs[-1] == max(lp.top_logprobs[-1].values())  # greedy: what lm-eval's is_greedy reads
    assert r.usage.prompt_tokens == sum(map(len, prompts))


def test_logprobs_of_generated_tokens_completions_and_chat(world, base_url, chat_template):
    """Without echo, logprobs cover the generated tokens only: each equals the forward pass over prompt +
    what came before it, text_offset starts at 0 in the returned text; chat's logprobs.content likewise."""
    tokenizer = _tokenizer(world)
    ids = tokenizer(PROMPT).input_ids
    c = client(world, base_url)
    r = c.completions.create(model=world.adapter_id, prompt=PROMPT, max_tokens=6, logprobs=2, temperature=0)
    text, lp = r.choices[0].text, r.choices[0].logprobs
    generated = tokenizer(text).input_ids
    assert "".join(lp.tokens[: len(generated)]) == text and lp.text_offset[0] == 0
    expected = forward_logprobs(world, ids + generated)
    for j, token in enumerate(generated):
        assert lp.token_logprobs[j] == pytest.approx(float(expected[len(ids) + j - 1, token]), abs=TOL)
        assert len(lp.top_logprobs[j]) in (2, 3)
    messages = [{"role": "user", "content": "the quick"}]
    chat = c.chat.completions.create(
        model=world.adapter_id, messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2
    )
    content = chat.choices[0].logprobs.content
    rendered = tokenizer("<user>the quick\n<assistant>").input_ids
    reply = tokenizer(chat.choices[0].message.content).input_ids
    expected = forward_logprobs(world, rendered + reply)
    assert "".join(e.token for e in content) == chat.choices[0].message.content and len(content) == len(reply)
    for j, entry in enumerate(content):
        assert entry.logprob == pytest.approx(float(expected[len(rendered) + j - 1, reply[j]]), abs=TOL)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(
            torch.topk(expected[len(rendered) + j - 1], 2).values.tolist(), abs=TOL
        )
        assert entry.bytes == list(entry.token.encode())


@pytest.mark.parametrize(
    "kwargs,code,param",
    [
        ({"logprobs": 6}, "invalid_value", "logprobs"),
        ({"max_tokens": 0}, "invalid_value", "max_tokens"),
        ({"echo": True, "logprobs": 1, "stream": True}, "unsupported_parameter", "stream"),
        ({"prompt": [[1, 2], [3]], "stream": True}, "invalid_value", "prompt"),
        ({"prompt": [5, 100_000]}, "invalid_value", "prompt"),
        ({"prompt": [[1]] * 65}, "invalid_value", "prompt"),
        ({"prompt": [[]]}, "invalid_value", "prompt"),
        ({"prompt": [-1]}, "invalid_value", "prompt"),
    ],
)
def test_bad_logprobs_input_is_an_openai_error(world, base_url, kwargs, code, param):
    args = {"model": world.adapter_id, "prompt": PROMPT, "max_tokens": 2, **kwargs}
    with pytest.raises(openai.BadRequestError) as exc:
        client(world, base_url).completions.create(**args)
    err = error_of(exc.value)
    assert (err["code"], err["param"]) == (code, param), err


def test_chat_top_logprobs_needs_logprobs(world, base_url, chat_template):
    with pytest.raises(openai.BadRequestError) as exc:
        client(world, base_url).chat.completions.create(
            model=world.adapter_id, messages=[{"role": "user", "content": "hi"}], top_logprobs=2
        )
    assert (error_of(exc.value)["code"], error_of(exc.value)["param"]) == ("invalid_value", "top_logprobs")
