"""The client side of a crash round: a download cut mid-stream (killing the server at that moment), an adapter
upload that sends half its body and waits, and the adapter count the round checks against."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import httpx

from reliability.harness import client


class _CutStream(httpx.SyncByteStream):
    def __init__(self, inner: httpx.SyncByteStream, limit: int, on_cut: Any):
        self.inner, self.limit, self.on_cut = inner, limit, on_cut

    def __iter__(self) -> Iterator[bytes]:
        sent = 0
        for chunk in self.inner:
            if sent + len(chunk) >= self.limit:
                yield chunk[: self.limit - sent]
                self.on_cut()
                raise httpx.ReadError("connection lost (fault injection)")
            sent += len(chunk)
            yield chunk

    def close(self) -> None:
        with contextlib.suppress(httpx.HTTPError):
            self.inner.close()


class CuttingTransport(httpx.BaseTransport):
    """Real HTTP, except that the first emulator download is cut after `limit` bytes, calling `on_cut` (which
    kills the server) at that moment."""

    def __init__(self, limit: int, on_cut: Any):
        self.inner, self.limit, self.on_cut, self.cut = httpx.HTTPTransport(), limit, on_cut, False

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if request.url.path.endswith("/file") and not self.cut:
            self.cut = True
            return httpx.Response(
                response.status_code,
                headers=response.headers,
                extensions=response.extensions,
                stream=_CutStream(response.stream, self.limit, self.on_cut),
            )
        return response

    def close(self) -> None:
        self.inner.close()


class SlowUpload:
    """A multipart adapter upload that sends half of the file and then waits (until `release()`)."""

    def __init__(self, url: str, key: str, emulator_id: str, payload: bytes):
        self.url, self.key, self.emulator_id, self.payload = url, key, emulator_id, payload
        self._release = threading.Event()
        self.outcome: str | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name="slow-upload")

    def _body(self) -> Iterator[bytes]:
        yield (
            b'--B0UNDARY\r\nContent-Disposition: form-data; name="adapter"; filename="adapter.safetensors"\r\n'
            b"Content-Type: application/octet-stream\r\n\r\n"
        )
        half = len(self.payload) // 2
        for i in range(0, half, 8192):
            yield self.payload[i : min(half, i + 8192)]
        self._release.wait(120)
        yield self.payload[half:]
        yield b"\r\n--B0UNDARY--\r\n"

    def _run(self) -> None:
        try:
            with client(self.url, self.key, timeout=120) as http:
                r = http.post(
                    f"/v1/emulators/{self.emulator_id}/adapters",
                    content=self._body(),
                    headers={"Content-Type": "multipart/form-data; boundary=B0UNDARY"},
                )
            self.outcome = f"HTTP {r.status_code}"
        except httpx.HTTPError as exc:
            self.outcome = f"{type(exc).__name__}"

    def start(self) -> None:
        self.thread.start()

    def release(self) -> None:
        self._release.set()
        self.thread.join(60)


def count_adapters(url: str, key: str) -> int:
    with client(url, key) as http:
        return len(http.get("/v1/adapters").json()["adapters"])
