"""The client waits out a short 429 (the server's rate limits and full queues say when to come back) and reports
the rest: a long wait (an hourly quota), a 429 without Retry-After, a streamed body, or the last retry."""

from __future__ import annotations

import httpx
import pytest

from data_owner_client.api import ServerClient
from data_owner_client.errors import ServerError

SERVER = "http://127.0.0.1:9"


def _server(answers: list[tuple[int, str | None]], seen: list[httpx.Request]) -> httpx.MockTransport:
    """Answers the i-th request with answers[i] = (status, Retry-After); 200 {"ok": n} once they run out."""

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        request.read()
        if len(seen) <= len(answers):
            status, after = answers[len(seen) - 1]
            headers = {"Retry-After": after} if after is not None else {}
            body = {"error": {"code": "rate_limited", "message": f"too many requests; retry in {after} s"}}
            return httpx.Response(status, json=body, headers=headers)
        return httpx.Response(200, json={"ok": len(seen)})

    return httpx.MockTransport(handler)


def _client(answers, seen, slept, **kw) -> ServerClient:
    return ServerClient(SERVER, "k", transport=_server(answers, seen), sleep=slept.append, **kw)


def test_a_short_429_is_waited_out_and_the_request_sent_again(capsys):
    seen, slept = [], []
    with _client([(429, "2"), (429, "1")], seen, slept) as c:
        assert c.get_json("/v1/jobs") == {"ok": 3}
    assert slept == [2.0, 1.0] and len(seen) == 3
    assert all(r.headers["authorization"] == "Bearer k" for r in seen)  # every attempt authenticated
    assert "retrying in 2 s (1/3)" in capsys.readouterr().err


def test_a_post_with_a_bytes_body_is_sent_again_whole():
    seen, slept = [], []
    with _client([(429, "1")], seen, slept) as c:
        r = c.http.post(c.url("/v1/adapters"), json={"name": "a"})
    assert r.status_code == 200 and [x.content for x in seen] == [b'{"name":"a"}'] * 2


@pytest.mark.parametrize(
    "answers, why",
    [
        ([(429, "3600")], "an hourly quota's wait is reported, not slept through"),
        ([(429, None)], "no Retry-After: nothing says when"),
        ([(429, "soon")], "an unreadable Retry-After"),
        ([(429, "1")] * 4, "after the third retry"),
    ],
)
def test_a_429_that_cannot_be_waited_out_is_reported(answers, why):
    seen, slept = [], []
    with _client(answers, seen, slept) as c, pytest.raises(ServerError, match="429") as err:
        c.get_json("/v1/jobs")
    assert err.value.status_code == 429, why
    assert len(seen) == min(len(answers), 4) and len(slept) == len(seen) - 1


@pytest.mark.parametrize("how", ["generator", "multipart-file"])
def test_a_streamed_body_is_not_sent_twice(how, tmp_path):
    """A generator body, and a multipart upload of an open file (how upload.py sends an adapter)."""
    seen, slept = [], []

    def body():
        yield b"chunk"

    (tmp_path / "a.safetensors").write_bytes(b"tensor bytes")
    with _client([(429, "1")], seen, slept) as c, open(tmp_path / "a.safetensors", "rb") as f:
        if how == "generator":
            r = c.http.post(c.url("/v1/adapters"), content=body())
        else:
            r = c.http.post(c.url("/v1/adapters"), files={"adapter": ("a.safetensors", f)}, data={"name": "a"})
    assert r.status_code == 429 and len(seen) == 1 and slept == []


def test_retries_can_be_turned_off():
    seen, slept = [], []
    with _client([(429, "1")], seen, slept, retry_429=0) as c, pytest.raises(ServerError):
        c.get_json("/v1/jobs")
    assert len(seen) == 1 and slept == []
