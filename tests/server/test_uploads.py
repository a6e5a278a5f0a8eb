"""Bad adapter uploads: each gets its 4xx and leaves the database and the data dir exactly as they were."""

from __future__ import annotations

import io
import json

import anyio
import pytest
import torch
from server_helpers import adapter_bytes, auth, data_dir_listing

from model_owner_server import crud


def _snapshot(world):
    with world.sessions() as s:
        counts = crud.row_counts(s)
    return counts, data_dir_listing(world.settings.resolved_data_dir)


def _variant(world, kind: str) -> bytes:
    good = {k: v.clone() for k, v in world.adapter_tensors.items()}
    name = sorted(good)[0]
    if kind == "missing":
        good.pop(name)
    elif kind == "extra":
        other = next(i for i in range(4) if i not in world.emulator["adapter_layers"])
        good[f"model.layers.{other}.self_attn.q_proj.weight"] = torch.zeros(32, 32)
    elif kind == "misshaped":
        good[name] = torch.zeros(*[d + 1 for d in good[name].shape])
    elif kind == "wrong_dtype":
        good[name] = good[name].to(torch.float16)
    elif kind == "nan":
        good[name].view(-1)[0] = float("nan")
    elif kind == "inf":
        good[name].view(-1)[-1] = float("inf")
    return adapter_bytes(good)


def _valid(world) -> bytes:
    return adapter_bytes(world.adapter_tensors)


BAD_UPLOADS = {
    "not safetensors": (
        lambda w: {"files": {"adapter": ("a.safetensors", b"hello, this is not a tensor file" * 10)}},
        422,
        "invalid_adapter",
    ),
    "empty adapter": (lambda w: {"files": {"adapter": ("a.safetensors", b"")}}, 422, "invalid_adapter"),
    "truncated": (lambda w: {"files": {"adapter": ("a.safetensors", _valid(w)[:-17])}}, 422, "invalid_adapter"),
    "padded": (lambda w: {"files": {"adapter": ("a.safetensors", _valid(w) + b"\0" * 16)}}, 422, "invalid_adapter"),
    "oversized": (
        lambda w: {"files": {"adapter": ("a.safetensors", _valid(w) + b"\0" * w.emulator["max_adapter_bytes"])}},
        413,
        "payload_too_large",
    ),
    "missing tensor": (
        lambda w: {"files": {"adapter": ("a.safetensors", _variant(w, "missing"))}},
        422,
        "invalid_adapter",
    ),
    "extra tensor": (lambda w: {"files": {"adapter": ("a.safetensors", _variant(w, "extra"))}}, 422, "invalid_adapter"),
    "misshaped tensor": (
        lambda w: {"files": {"adapter": ("a.safetensors", _variant(w, "misshaped"))}},
        422,
        "invalid_adapter",
    ),
    "wrong dtype": (
        lambda w: {"files": {"adapter": ("a.safetensors", _variant(w, "wrong_dtype"))}},
        422,
        "invalid_adapter",
    ),
    "NaN": (lambda w: {"files": {"adapter": ("a.safetensors", _variant(w, "nan"))}}, 422, "invalid_adapter"),
    "Inf": (lambda w: {"files": {"adapter": ("a.safetensors", _variant(w, "inf"))}}, 422, "invalid_adapter"),
    "no adapter part": (lambda w: {"files": {"eval_data": ("e.txt", b"some text here")}}, 422, "missing_part"),
    "unknown part": (
        lambda w: {"files": {"adapter": ("a.safetensors", _valid(w)), "weights": ("w.bin", b"x")}},
        422,
        "unknown_part",
    ),
    "eval file type": (
        lambda w: {"files": {"adapter": ("a.safetensors", _valid(w)), "eval_data": ("e.csv", b"a,b")}},
        422,
        "unsupported_file_type",
    ),
    "bad eval jsonl": (
        lambda w: {
            "files": {"adapter": ("a.safetensors", _valid(w)), "eval_data": ("e.jsonl", b'{"text": "ok"}\n{broken\n')}
        },
        422,
        "invalid_eval_data",
    ),
    "eval too big": (
        lambda w: {
            "files": {
                "adapter": ("a.safetensors", _valid(w)),
                "eval_data": ("e.txt", b"word " * (w.settings.max_eval_bytes // 5 + 10)),
            }
        },
        413,
        "payload_too_large",
    ),
    "metrics not JSON": (
        lambda w: {"files": {"adapter": ("a.safetensors", _valid(w))}, "data": {"metrics": "{nope"}},
        422,
        "validation_error",
    ),
    "metrics not object": (
        lambda w: {"files": {"adapter": ("a.safetensors", _valid(w))}, "data": {"metrics": "[1, 2]"}},
        422,
        "validation_error",
    ),
    "adapter_config not JSON": (
        lambda w: {"files": {"adapter": ("a.safetensors", _valid(w))}, "data": {"adapter_config": "nope"}},
        422,
        "validation_error",
    ),
    "not multipart": (lambda w: {"json": {"adapter": "AAAA"}}, 415, "unsupported_media_type"),
    "truncated multipart body": (
        lambda w: {
            "content": b'--XyZ\r\nContent-Disposition: form-data; name="adapter"; filename="a.safetensors"\r\n\r\nabc',
            "headers": {"Content-Type": "multipart/form-data; boundary=XyZ"},
        },
        400,
        "bad_request",
    ),
}


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_bad_upload_is_rejected_without_side_effects(world, case):
    make, status, code = BAD_UPLOADS[case]
    kwargs = make(world)
    kwargs["headers"] = {**kwargs.get("headers", {}), **auth(world.keys["alice"])}
    before = _snapshot(world)
    r = world.client.post(f"/v1/emulators/{world.emulator['id']}/adapters", **kwargs)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code, r.json()
    assert len(r.json()["error"]["message"]) > 10
    assert _snapshot(world) == before


def test_streamed_oversize_without_content_length(world):
    """Chunked upload (no Content-Length): the part cap still stops it."""
    boundary = "b0undary"
    cap = world.emulator["max_adapter_bytes"]

    def body():
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="adapter"; filename="a.safetensors"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        for _ in range(cap // 4096 + 4):
            yield b"\0" * 4096
        yield f"\r\n--{boundary}--\r\n".encode()

    before = _snapshot(world)
    r = world.client.post(
        f"/v1/emulators/{world.emulator['id']}/adapters",
        content=body(),
        headers={**auth(world.keys["alice"]), "Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert r.status_code == 413, r.text
    assert _snapshot(world) == before


def test_content_length_over_cap_is_refused_before_reading(world):
    """A declared body larger than the cap gets 413 without the body ever being read."""
    app = world.client.app
    read = []
    sent: list[dict] = []

    async def receive():
        read.append(True)
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": f"/v1/emulators/{world.emulator['id']}/adapters",
        "raw_path": b"",
        "query_string": b"",
        "root_path": "",
        "client": ("127.0.0.1", 1),
        "server": ("testserver", 80),
        "headers": [
            (b"host", b"testserver"),
            (b"authorization", f"Bearer {world.keys['alice']}".encode()),
            (b"content-type", b"multipart/form-data; boundary=x"),
            (b"content-length", str(10**10).encode()),
        ],
        "state": {},
        "app": app,
    }
    before = _snapshot(world)
    anyio.run(app, scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert start["status"] == 413 and json.loads(body)["error"]["code"] == "payload_too_large"
    assert not read, "the body was read although Content-Length already exceeded the cap"
    assert _snapshot(world) == before


def test_valid_upload_changes_state_once(world):
    before_counts, before_files = _snapshot(world)
    r = world.client.post(
        f"/v1/emulators/{world.emulator['id']}/adapters",
        headers=auth(world.keys["bob"]),
        files={"adapter": ("a.safetensors", io.BytesIO(_valid(world)))},
    )
    assert r.status_code == 202, r.text
    counts, listing = _snapshot(world)
    assert counts["adapters"] == before_counts["adapters"] + 1
    assert counts["evaluations"] == before_counts["evaluations"] + 2
    new_files = set(listing) - set(before_files)
    assert new_files == {f"adapters/{r.json()['adapter']['id']}/adapter.safetensors"}
    assert not any(p.startswith("tmp/") for p in listing)


def test_upload_info_says_whether_eval_data_is_required(world, monkeypatch):
    """A client asks before training; with no default evaluation file the answer and the upload agree."""
    url = f"/v1/emulators/{world.emulator['id']}/upload-info"
    info = world.client.get(url, headers=auth(world.keys["alice"])).json()
    assert info["emulator_id"] == world.emulator["id"]
    assert info["default_eval_data"] is True and info["eval_data_required"] is False
    assert ".jsonl" in info["eval_data_suffixes"] and info["max_adapter_bytes"] == world.emulator["max_adapter_bytes"]
    monkeypatch.setattr(world.settings, "default_eval", None)
    info = world.client.get(url, headers=auth(world.keys["alice"])).json()
    assert info["default_eval_data"] is False and info["eval_data_required"] is True
    before = _snapshot(world)
    r = world.client.post(
        f"/v1/emulators/{world.emulator['id']}/adapters",
        headers=auth(world.keys["alice"]),
        files={"adapter": ("a.safetensors", io.BytesIO(_valid(world)))},
    )
    assert r.status_code == 422 and r.json()["error"]["code"] == "no_eval_data", r.text
    assert _snapshot(world) == before
