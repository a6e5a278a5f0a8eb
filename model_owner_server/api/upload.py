"""Streaming multipart/form-data intake with hard byte caps.

Starlette's `request.form()` spools whole parts with no size limit, so adapter uploads are parsed
here incrementally with python-multipart's `MultipartParser`: each part goes straight to a temp file
(or a small buffer for JSON text parts) and the request is refused with 413 the moment any part, or
the body, passes its cap. Nothing is kept when an error is raised: the caller deletes the temp files.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from fastapi import Request
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

from model_owner_server.api.errors import ApiError
from model_owner_server.api.json_bounds import JsonBounds, JsonBoundsError, parse_bounded

MULTIPART_OVERHEAD = 64 * 1024  # boundaries and part headers on top of the parts' own caps


@dataclass
class PartSpec:
    cap: int
    is_file: bool
    suffixes: tuple[str, ...] = ()  # allowed filename suffixes (file parts); () = any


@dataclass
class ReceivedPart:
    name: str
    filename: str | None
    size: int = 0
    path: Path | None = None  # file parts
    data: bytearray = field(default_factory=bytearray)  # text parts
    sha256: str = ""
    _fh: BinaryIO | None = None
    _hash: hashlib._Hash = field(default_factory=hashlib.sha256)
    complete: bool = False

    @property
    def file(self) -> Path:
        """The temp file of a file part (`path`); a text part has none."""
        if self.path is None:
            raise ValueError(f"form part {self.name!r} is a text part, not a file")
        return self.path


def boundary_of(request: Request) -> bytes:
    ctype, opts = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or not opts.get(b"boundary"):
        raise ApiError(
            415,
            "unsupported_media_type",
            "send multipart/form-data with parts 'adapter' (safetensors file), optional 'eval_data' "
            "(.txt/.jsonl file), 'metrics' and 'adapter_config' (JSON text)",
        )
    return opts[b"boundary"]


def check_content_length(request: Request, total_cap: int) -> None:
    """Refuse an oversized body before reading a byte of it."""
    raw = request.headers.get("content-length")
    if raw is None:
        return  # chunked: the streaming caps still apply
    try:
        length = int(raw)
    except ValueError:
        raise ApiError(400, "bad_request", "invalid Content-Length header") from None
    if length > total_cap:
        raise ApiError(
            413,
            "payload_too_large",
            f"request body is {length} bytes; this emulator accepts at most {total_cap} "
            "(the adapter layers' tensors plus the eval-file limit). Upload only the adapter tensors.",
        )


async def receive_parts(
    request: Request, specs: dict[str, PartSpec], total_cap: int, temp_path: Callable[[str], Path]
) -> dict[str, ReceivedPart]:
    """Parse the body into parts; file parts land in temp files named by `temp_path(suffix)`.

    On any error the temp files created so far are removed before the exception propagates.
    """
    boundary = boundary_of(request)
    parts: dict[str, ReceivedPart] = {}
    current: list[ReceivedPart | None] = [None]
    headers: dict[bytes, bytes] = {}
    hname, hvalue = bytearray(), bytearray()
    ended = [False]

    def on_part_begin() -> None:
        headers.clear()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        hname.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        hvalue.extend(data[start:end])

    def on_header_end() -> None:
        headers[bytes(hname).lower()] = bytes(hvalue)
        hname.clear()
        hvalue.clear()

    def on_headers_finished() -> None:
        _, opts = parse_options_header(headers.get(b"content-disposition", b""))
        name = opts.get(b"name", b"").decode("utf-8", "replace")
        filename = opts[b"filename"].decode("utf-8", "replace") if b"filename" in opts else None
        spec = specs.get(name)
        if spec is None:
            raise ApiError(422, "unknown_part", f"unexpected form part {name!r}; allowed parts: {', '.join(specs)}")
        if name in parts:
            raise ApiError(422, "duplicate_part", f"form part {name!r} was sent twice")
        part = ReceivedPart(name, filename)
        if spec.is_file:
            suffix = _suffix(filename)
            if spec.suffixes and suffix not in spec.suffixes:
                raise ApiError(
                    422,
                    "unsupported_file_type",
                    f"part {name!r} must be a file named *{' or *'.join(spec.suffixes)} (got {filename!r:.200})",
                )
            # The client's file name never reaches the file system: only a whitelisted suffix does.
            part.path = temp_path(suffix if spec.suffixes else ".part")
            part._fh = open(part.path, "wb")  # noqa: SIM115 - stays open across the parser's callbacks; closed below
        parts[name] = part
        current[0] = part

    def on_part_data(data: bytes, start: int, end: int) -> None:
        part = current[0]
        assert part is not None, "the parser sends part data only between a part's headers and its end"
        chunk = data[start:end]
        part.size += len(chunk)
        spec = specs[part.name]
        if part.size > spec.cap:
            raise ApiError(
                413,
                "payload_too_large",
                f"part {part.name!r} exceeds its limit of {spec.cap} bytes"
                + (
                    " (the adapter must hold only the issued adapter-layer tensors, in the issued dtype)"
                    if part.name == "adapter"
                    else ""
                ),
            )
        part._hash.update(chunk)
        if part._fh is not None:
            part._fh.write(chunk)
        else:
            part.data.extend(chunk)

    def on_part_end() -> None:
        part = current[0]
        if part is not None:
            if part._fh is not None:
                part._fh.close()
                part._fh = None
            part.sha256, part.complete = part._hash.hexdigest(), True
        current[0] = None

    def on_end() -> None:
        ended[0] = True

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
            "on_end": on_end,
        },
    )
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > total_cap:
                raise ApiError(413, "payload_too_large", f"request body exceeds {total_cap} bytes")
            parser.write(chunk)
        parser.finalize()
        if not ended[0] or any(not p.complete for p in parts.values()):
            raise ApiError(400, "bad_request", "the multipart body ended early (truncated upload); send it again")
    except MultipartParseError as exc:
        discard(parts)
        raise ApiError(400, "bad_request", f"malformed multipart body: {exc}") from None
    except ClientDisconnect:
        discard(parts)
        raise ApiError(400, "bad_request", "the client disconnected during the upload") from None
    except BaseException:
        discard(parts)
        raise
    return parts


def json_object_part(part: ReceivedPart | None, bounds: JsonBounds) -> dict[str, Any] | None:
    """A JSON-text part (`metrics`, `adapter_config`) as a dict within `bounds` (api/json_bounds.py); 422
    naming the part and the bound otherwise, before anything is stored."""
    if part is None:
        return None
    try:
        value = parse_bounded(bytes(part.data), bounds)
    except JsonBoundsError as exc:
        raise ApiError(
            422,
            "validation_error",
            f"part {part.name!r} {exc}; send a small JSON object "
            f"(at most {bounds.max_depth} levels deep, {bounds.max_items} keys and array elements, "
            f"strings of at most {bounds.max_string} characters)",
        ) from None
    if not isinstance(value, dict):
        raise ApiError(422, "validation_error", f"part {part.name!r} must be a JSON object")
    return value


def _suffix(filename: str | None) -> str:
    """Lower-cased suffix of a client-supplied file name ('' when odd: NUL bytes, huge, path-like)."""
    name = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    if "\x00" in name or len(name) > 255:
        return ""
    return Path(name).suffix.lower()


def discard(parts: dict[str, ReceivedPart]) -> None:
    for p in parts.values():
        if p._fh is not None:
            with contextlib.suppress(OSError):  # e.g. ENOSPC flushing the buffer: the file is removed anyway
                p._fh.close()
            p._fh = None
        if p.path is not None:
            p.path.unlink(missing_ok=True)
