"""The model owner's HTTP API as the client sees it: resource URLs, and a thin httpx client (bearer auth, the
server's JSON errors and transport failures turned into `ServerError`, redirects never followed)."""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import httpx
from pydantic import BaseModel, ValidationError

from shared import schemas
from shared.signing import SignatureError

from .errors import BadInputError, ServerError
from .key_safety import check_transport, server_origin

M = TypeVar("M", bound=BaseModel)


# ---------------------------------------------------------------- URLs


@dataclass(frozen=True)
class EmulatorRef:
    """An emulator resource URL split into the server base and the emulator id."""

    server: str  # e.g. "http://host:8000" (may carry a path prefix if the API sits behind one)
    emulator_id: str

    @property
    def url(self) -> str:
        return f"{self.server}/v1/emulators/{self.emulator_id}"


def parse_emulator_url(url: str) -> EmulatorRef:
    """`{server}/v1/emulators/{id}` -> EmulatorRef; anything else is a usage error."""
    parts = urlsplit(url.strip())
    m = re.fullmatch(r"(?P<prefix>.*?)/v1/emulators/(?P<id>[A-Za-z0-9_.~-]+)/?", parts.path)
    if parts.scheme not in ("http", "https") or not parts.netloc or m is None:
        raise BadInputError(
            f"--emulator-url {url!r} is not an emulator URL; expected "
            "http(s)://SERVER/v1/emulators/ID (copy it from the model owner)"
        )
    server = urlunsplit((parts.scheme, parts.netloc, m["prefix"], "", "")).rstrip("/")
    return EmulatorRef(server, m["id"])


def split_resource_url(url: str, collection: str) -> tuple[str, str] | None:
    """`{server}/v1/{collection}/{id}` -> (server, id), or None when `url` is not such a URL."""
    parts = urlsplit(url.strip())
    m = re.fullmatch(rf"(?P<prefix>.*?)/v1/{collection}/(?P<id>[A-Za-z0-9_.~-]+)/?", parts.path)
    if parts.scheme not in ("http", "https") or not parts.netloc or m is None:
        return None
    return urlunsplit((parts.scheme, parts.netloc, m["prefix"], "", "")).rstrip("/"), m["id"]


# ---------------------------------------------------------------- HTTP


def _error_message(response: httpx.Response) -> tuple[str | None, str]:
    """(code, message) from the server's `{"error": {"code", "message"}}` body, or the raw text."""
    try:
        body = schemas.ErrorBody.model_validate(response.json())
        return body.error.code, body.error.message
    except (ValueError, ValidationError):
        return None, (response.text or response.reason_phrase).strip()[:500]


def raise_for_status(response: httpx.Response) -> None:
    if 300 <= response.status_code < 400:  # not followed: the API key must go only to the server the user named
        raise ServerError(
            f"server redirected {response.request.method} {response.request.url} to "
            f"{response.headers.get('location')!r}; redirects are not followed",
            status_code=response.status_code,
        )
    if response.status_code < 400:
        return
    code, message = _error_message(response)
    if response.status_code == 401 and not response.request.headers.get("authorization"):
        # The server's own hint names the model owner's admin command; the data owner needs a key from them.
        raise ServerError(
            f"server answered 401 for {response.request.method} {response.request.url}: no API key "
            "was sent. Ask the model owner for an API key for your organization, then set "
            "SCALEOT_API_KEY (or pass --api-key-file FILE)",
            status_code=401,
            code=code or "unauthorized",
        )
    hint = {
        401: " (the key in SCALEOT_API_KEY / --api-key-file / --api-key was refused: ask the model owner for a valid one)",
        403: " (check SCALEOT_API_KEY: your organization may lack access; ask the model owner)",
    }.get(response.status_code, "")
    raise ServerError(
        f"server answered {response.status_code} {code or response.reason_phrase} for "
        f"{response.request.method} {response.request.url}: {message}{hint}",
        status_code=response.status_code,
        code=code,
    )


@contextmanager
def network_errors(what: str) -> Iterator[None]:
    """Turn transport failures (refused, reset, timeout) into a ServerError with context."""
    try:
        yield
    except httpx.TransportError as exc:
        raise ServerError(f"{what}: {type(exc).__name__}: {exc or 'connection failed'}") from exc


def parse_as(model: type[M], data: Any, what: str) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ServerError(
            f"unexpected {what} from the server: {exc.error_count()} invalid field(s): "
            f"{exc.errors()[0]['loc']} {exc.errors()[0]['msg']}"
        ) from None


class ServerBearer(httpx.Auth):
    """`Authorization: Bearer KEY` on requests to the server's own origin only: a URL on any other origin, however
    it got into a request (a redirect, a link in a response, a bug), goes without the key."""

    def __init__(self, server: str, api_key: str):
        self._origin = server_origin(server)
        self._value = f"Bearer {api_key}"

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if server_origin(str(request.url)) == self._origin:
            request.headers["Authorization"] = self._value
        yield request


def retry_after_seconds(response: httpx.Response) -> float | None:
    """The 429's `Retry-After` in seconds (the server sends whole seconds), or None when absent or not a number."""
    value = response.headers.get("retry-after", "").strip()
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


class RetryingClient(httpx.Client):
    """httpx.Client that waits out a short 429 and sends the request again: the server's rate limits (a token
    bucket that refills in seconds) and a full generation queue answer 429 with `Retry-After`, and a command that
    dies on the first one makes a busy server look broken. At most `retries` retries, each only when Retry-After
    is at most `max_wait` seconds (an hourly quota's wait is reported, not slept through) and the body can be
    sent again (bytes, not a stream: an adapter upload streams its files, so its 429 is reported with the
    server's "retry in N s")."""

    def __init__(
        self, *, retries: int = 3, max_wait: float = 30.0, sleep: Callable[[float], None] = time.sleep, **kw: Any
    ) -> None:
        super().__init__(**kw)
        self.retries, self.max_wait, self.sleep = retries, max_wait, sleep

    def send(self, request: httpx.Request, **kw: Any) -> httpx.Response:
        attempt = 0
        replayable = isinstance(request.stream, httpx.ByteStream)  # before sending: reading a body may replace it
        while True:
            response = super().send(request, **kw)
            wait = retry_after_seconds(response) if response.status_code == 429 else None
            if wait is None or attempt >= self.retries or wait > self.max_wait or not replayable:
                return response
            response.read()  # the error body, so the connection goes back to the pool
            response.close()
            attempt += 1
            print(
                f"the server is busy (429 for {request.method} {request.url.path}); retrying in {wait:g} s "
                f"({attempt}/{self.retries})",
                file=sys.stderr,
            )
            self.sleep(wait)


class ServerClient:
    """Thin httpx wrapper: bearer auth, JSON errors -> ServerError, transport errors -> ServerError, a short 429
    waited out and retried (RetryingClient).

    With an API key it refuses (BadInputError) a server reached over plain http that is not loopback, unless
    `insecure`; the key is sent only to the server's origin, and redirects are never followed.
    """

    def __init__(
        self,
        server: str,
        api_key: str | None,
        *,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
        insecure: bool = False,
        retry_429: int = 3,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.server = server.rstrip("/")
        if api_key:
            check_transport(self.server, insecure=insecure)
        # Redirects are not followed: the API key must only go to the server the user named.
        self.http = RetryingClient(
            retries=retry_429,
            sleep=sleep,
            auth=ServerBearer(self.server, api_key) if api_key else None,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            transport=transport,
            follow_redirects=False,
        )

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> ServerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def url(self, path: str) -> str:
        return f"{self.server}{path}"

    def get_json(self, path: str) -> Any:
        with network_errors(f"cannot GET {self.url(path)}"):
            r = self.http.get(self.url(path))
        raise_for_status(r)
        try:
            return r.json()
        except ValueError:
            raise ServerError(f"GET {self.url(path)} did not return JSON") from None

    def emulator(self, emulator_id: str) -> schemas.Emulator:
        return parse_as(schemas.Emulator, self.get_json(f"/v1/emulators/{emulator_id}"), "emulator")

    def signed_manifest(self, emulator_id: str) -> dict[str, Any]:
        # Kept as a raw dict: the signature covers the exact manifest fields, not a re-serialised model.
        data = self.get_json(f"/v1/emulators/{emulator_id}/signature")
        if not isinstance(data, dict):
            raise SignatureError("the signature endpoint did not return a JSON object")
        return data

    def signing_keys(self) -> dict[str, Any]:
        return self.get_json("/v1/signing-keys")

    def job(self, job_id: str) -> schemas.Job:
        return parse_as(schemas.Job, self.get_json(f"/v1/jobs/{job_id}"), "job")

    def adapter(self, adapter_id: str) -> schemas.Adapter:
        return parse_as(schemas.Adapter, self.get_json(f"/v1/adapters/{adapter_id}"), "adapter")

    def upload_info(self, emulator_id: str) -> dict[str, Any] | None:
        """What an adapter upload needs (`eval_data_required`, eval suffixes, size caps), asked before training;
        None when the server does not say (a server without this endpoint): the caller must not rely on it."""
        try:
            data = self.get_json(f"/v1/emulators/{emulator_id}/upload-info")
        except ServerError as exc:
            if exc.status_code in (404, 405, 501):
                return None
            raise
        return data if isinstance(data, dict) else None
