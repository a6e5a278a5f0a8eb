"""Generation cannot exhaust the server's memory or bypass its bounds (issue 20, finding 3).

- every generation path (POST /v1/adapters/{id}/generate, the console's form, the OpenAI-compatible API) runs
  on the one bounded engine: when it is full, 429 with Retry-After, in each path's own error shape;
- serving many adapters never copies M per adapter: the resident plugged copies (at most
  SCALEOT_PLUGGED_COPIES) own only the adapter layers and get the next adapter's layers swapped in, and the
  swapped model gives the logits of the model the evaluation plugged (whole layers and LoRA, any order);
- only an adapter whose evaluation succeeded generates (409 otherwise; another organization's is still 404).
"""

from __future__ import annotations

import copy
import html
import io
import json
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from server_helpers import adapter_bytes, auth, engine_full
from transformers import PreTrainedModel

from model_owner_server.api.routes.openai_compat import get_engine
from model_owner_server.model_cache import LRUCache, Plug, PluggedPool, load_full_model, plugged_pool
from model_owner_server.models import AdapterRow, EmulatorRow, RegisteredModel
from model_owner_server.scaleot.plugin import plug_in_file
from model_owner_server.serving import plug_for, plugged_lease
from shared.lora import LoraSpec, file_spec

PROMPT = "the quick brown fox"


def _upload(world, tensors: dict[str, torch.Tensor], config: dict[str, Any] | None = None) -> str:
    data = {"adapter_config": json.dumps(config)} if config is not None else {}
    r = world.client.post(
        f"/v1/emulators/{world.emulator['id']}/adapters",
        headers=auth(world.keys["alice"]),
        files={"adapter": ("adapter.safetensors", io.BytesIO(adapter_bytes(tensors)))},
        data=data,
    )
    assert r.status_code == 202 and r.json()["job"]["status"] == "succeeded", r.text
    return r.json()["adapter"]["id"]


@pytest.fixture(scope="module")
def adapters(world) -> dict[str, str]:
    """alice's evaluated adapters: the world's (whole layers), another whole-layer one and a LoRA."""
    gen = torch.Generator().manual_seed(20)
    other = {k: v + 0.2 * torch.randn(v.shape, generator=gen) for k, v in world.adapter_tensors.items()}
    lora = LoraSpec.from_json(world.emulator["build_info"]["lora"])
    lora_tensors = {k: 0.2 * torch.randn(s.shape, generator=gen) for k, s in file_spec(lora).items()}
    peft = {
        "peft_type": "LORA",
        "r": lora.r,
        "lora_alpha": lora.alpha,
        "target_modules": sorted(lora.modules),
        "bias": "none",
        "use_dora": False,
        "use_rslora": False,
        "task_type": "CAUSAL_LM",
    }
    return {
        "a": world.adapter_id,
        "b": _upload(world, other),
        "lora": _upload(world, lora_tensors, {"method": "lora", "peft": peft}),
    }


def _full_model(world):
    with world.sessions() as s:
        path = s.get(RegisteredModel, world.model_id).path
    return load_full_model(path, world.settings.resolved_device(), world.settings.model_cache_size)


def _reference(world, adapter_id: str):
    """M' as the evaluation job plugs it: a standalone copy of M (plug_in_file)."""
    model = _full_model(world)[0]
    with world.sessions() as s:
        adapter = s.get(AdapterRow, adapter_id)
        emu = s.get(EmulatorRow, adapter.emulator_id)
        path = world.client.app.state.storage.abs(adapter.path)
        return plug_in_file(model, path, emu.adapter_layers, emu.adapter_spec, emu.build_info)


def _plug(world, adapter_id: str) -> Plug:
    with world.sessions() as s:
        adapter = s.get(AdapterRow, adapter_id)
        return plug_for(s, adapter, world.settings, world.client.app.state.storage)[0]


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).logits.float()


def _nbytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def _adapter_layer_bytes(world) -> int:
    from shared.architectures import decoder_layers

    model = _full_model(world)[0]
    return _nbytes(p for i in world.emulator["adapter_layers"] for p in decoder_layers(model)[i].parameters())


def _generate(world, adapter_id: str, org: str = "alice", n: int = 4):
    return world.client.post(
        f"/v1/adapters/{adapter_id}/generate",
        headers=auth(world.keys[org]),
        json={"prompt": PROMPT, "max_new_tokens": n},
    )


# ---------------------------------------------------------------- the swapped model is the evaluated model


def test_swapped_copy_gives_the_evaluated_models_logits_whatever_the_order(world, adapters):
    """Whole layers and LoRA alternate in the one resident copy: every time, its logits equal those of the
    model plug_in_file makes for that adapter (so a LoRA merge never accumulates, nothing of the previous
    adapter stays), and M itself is untouched."""
    tokenizer = _full_model(world)[1]
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    m = _full_model(world)[0]
    before = _logits(m, ids)
    expected = {name: _logits(_reference(world, a), ids) for name, a in adapters.items()}
    assert not torch.allclose(expected["a"], expected["b"]) and not torch.allclose(expected["a"], expected["lora"])
    for name in ("a", "lora", "b", "a", "lora", "lora", "b", "lora", "a"):
        with plugged_lease(_plug(world, adapters[name]), world.settings)() as model:
            torch.testing.assert_close(_logits(model, ids), expected[name], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_logits(m, ids), before, rtol=0, atol=0)


# ---------------------------------------------------------------- bounded memory


@pytest.fixture
def deep_copies(monkeypatch) -> list[int]:
    """For each deep copy of a whole model made while the test runs: the bytes of parameters it did not share
    with the original (a full copy of M: all of M's bytes)."""
    made: list[int] = []
    real = copy.deepcopy

    def spy(x, memo=None, _nil=[]):  # noqa: B006 - copy.deepcopy's own signature
        y = real(x, memo)
        if isinstance(x, PreTrainedModel):
            shared = {p.data_ptr() for p in x.parameters()}
            made.append(_nbytes(p for p in y.parameters() if p.data_ptr() not in shared))
        return y

    monkeypatch.setattr(copy, "deepcopy", spy)
    return made


def test_alternating_adapters_never_copies_the_full_model(world, adapters, deep_copies):
    """A, B, LoRA, A, B ... through the API: no full copy of M (at most one copy of the adapter layers, the
    first time a resident copy is made), and at most SCALEOT_PLUGGED_COPIES resident plugged models, each
    sharing every tensor of M but the adapter layers'."""
    m = _full_model(world)[0]
    full, layers = _nbytes(m.parameters()), _adapter_layer_bytes(world)
    for name in ("a", "b", "lora", "a", "b", "lora", "a", "b"):
        r = _generate(world, adapters[name])
        assert r.status_code == 200, r.text
    assert sum(deep_copies) <= layers * world.settings.plugged_copies < full, deep_copies
    resident = plugged_pool().models()
    assert 1 <= len(resident) <= world.settings.plugged_copies
    ms = {p.data_ptr() for p in m.parameters()}
    for model in resident:
        assert _nbytes(p for p in model.parameters() if p.data_ptr() not in ms) <= layers
    # copies=1: each request after the first swapped the other adapter's layers into the one copy
    assert plugged_pool().stats.history[-7:] == [adapters[n] for n in ("b", "lora", "a", "b", "lora", "a", "b")]


def test_the_pool_holds_at_most_its_copies_and_an_adapter_waits_for_a_free_one(world, adapters):
    """copies=1: a lease of another adapter waits until the copy is free (then swaps); leases of the adapter
    the copy holds share it; a lease that waits is not overtaken by later ones."""
    pool = PluggedPool(1)
    a, b = _plug(world, adapters["a"]), _plug(world, adapters["b"])
    order: list[str] = []

    def lease(plug: Plug, name: str) -> None:
        with pool.lease(plug):
            order.append(name)

    with pool.lease(a) as first:
        with pool.lease(a) as again:  # the same adapter shares the copy
            assert again is first
        waiter = threading.Thread(target=lease, args=(b, "b"))
        waiter.start()
        deadline = time.monotonic() + 10
        while not pool._line:  # b is in line
            assert time.monotonic() < deadline
            time.sleep(0.005)
        late = threading.Thread(target=lease, args=(a, "late a"))  # would share the busy copy, but b came first
        late.start()
        while len(pool._line) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        assert order == [] and len(pool.models()) == 1
    waiter.join(10)
    late.join(10)
    assert order == ["b", "late a"] and len(pool.models()) == 1
    assert pool.stats.copies_made == 1 and pool.stats.swaps == 3


def test_adapter_tensors_cache_is_bounded_in_bytes():
    cache: LRUCache[dict[str, torch.Tensor]] = LRUCache(
        100, max_bytes=1000, size_of=lambda d: sum(t.numel() * t.element_size() for t in d.values())
    )
    for i in range(5):
        cache.get_or_load(i, lambda: {"w": torch.zeros(100)})  # 400 bytes each: two fit
    assert len(cache) == 2 and [k for k in cache._items] == [3, 4]
    big = cache.get_or_load("big", lambda: {"w": torch.zeros(1000)})  # larger than the budget: not kept
    assert big["w"].numel() == 1000 and len(cache) == 2 and "big" not in cache._items


# ---------------------------------------------------------------- every path behind the engine


@pytest.fixture
def full_engine(world) -> Iterator[None]:
    """Every generation slot and queue place taken until the test ends; then wait until they are free."""
    with engine_full(get_engine(world.client)):
        yield
    deadline = time.monotonic() + 30
    while _generate(world, world.adapter_id, n=1).status_code == 429:
        assert time.monotonic() < deadline, "generation slots were not released"
        time.sleep(0.02)


def _console(world, key: str) -> tuple[TestClient, str]:
    client = TestClient(world.client.app)
    page = client.get("/console/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    r = client.post("/console/login", data={"api_key": key, "csrf_token": token}, follow_redirects=False)
    assert r.status_code == 303, r.text
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/console/keys").text).group(1)
    return client, csrf


def test_every_generation_path_gets_429_with_retry_after_when_the_engine_is_full(world, adapters, full_engine):
    r = _generate(world, adapters["a"])
    assert r.status_code == 429 and r.headers["retry-after"], r.text
    assert (
        r.json()["error"]["code"] == "queue_full" and "SCALEOT_GENERATION_CONCURRENCY" in r.json()["error"]["message"]
    )
    client, csrf = _console(world, world.keys["alice"])
    page = client.post(
        f"/console/adapters/{adapters['a']}/generate",
        data={"prompt": PROMPT, "max_new_tokens": "3", "csrf_token": csrf},
    )
    assert page.status_code == 429 and page.headers["retry-after"] and "the server is busy" in page.text
    r = world.client.post(
        "/openai/v1/completions",
        headers=auth(world.keys["alice"]),
        json={"model": adapters["a"], "prompt": PROMPT, "max_tokens": 2},
    )
    assert r.status_code == 429 and r.headers["retry-after"] and r.json()["error"]["code"] == "queue_full"


def test_console_generation_runs_and_shows_the_same_text_as_the_api(world, adapters):
    client, csrf = _console(world, world.keys["alice"])
    page = client.post(
        f"/console/adapters/{adapters['lora']}/generate",
        data={"prompt": PROMPT, "max_new_tokens": "5", "csrf_token": csrf},
    )
    api = _generate(world, adapters["lora"], n=5)
    assert page.status_code == 200 and api.status_code == 200, page.text
    shown = re.search(r'<pre id="completion"><span class="prompt">.*?</span>(.*?)</pre>', page.text, re.S)
    assert shown and html.unescape(shown.group(1)) == api.json()["completion"]


# ---------------------------------------------------------------- only evaluated adapters


@pytest.fixture
def unfinished(world) -> Iterator[dict[str, str]]:
    """Two more of alice's adapters: one still being evaluated, one whose evaluation failed."""
    ids = {"evaluating": _upload(world, world.adapter_tensors), "failed": _upload(world, world.adapter_tensors)}
    with world.sessions() as s:
        s.get(AdapterRow, ids["evaluating"]).status = "evaluating"
        failed = s.get(AdapterRow, ids["failed"])
        failed.status, failed.error = "failed", "plug-in evaluation failed"
        s.commit()
    yield ids


def test_only_adapters_whose_evaluation_succeeded_generate(world, unfinished):
    client, csrf = _console(world, world.keys["alice"])
    for status, adapter_id in unfinished.items():
        r = _generate(world, adapter_id)
        assert r.status_code == 409 and r.json()["error"]["code"] == "not_ready", r.text
        message = r.json()["error"]["message"]
        assert ("wait for the job" in message) if status == "evaluating" else ("upload it again" in message)
        o = world.client.post(
            "/openai/v1/completions",
            headers=auth(world.keys["alice"]),
            json={"model": adapter_id, "prompt": PROMPT, "max_tokens": 2},
        )
        assert o.status_code == 409 and o.json()["error"]["code"] == "model_not_ready", o.text
        assert set(o.json()["error"]) == {"message", "type", "param", "code"}
        page = client.post(
            f"/console/adapters/{adapter_id}/generate",
            data={"prompt": PROMPT, "max_new_tokens": "3", "csrf_token": csrf},
        )
        assert page.status_code == 409 and "evaluat" in page.text
        assert _generate(world, adapter_id, org="bob").status_code == 404  # another org's: still not found
        assert plugged_pool().resident(adapter_id) is None
