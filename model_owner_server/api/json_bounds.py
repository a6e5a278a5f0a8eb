"""Bounds on the client JSON the server stores: nesting depth, total size, item count, string length.

The free-form JSON a data owner sends (an adapter upload's `metrics` and `adapter_config` parts; every other
request body is a fixed pydantic schema) is checked here before anything is written, so a hostile value
(10,000 levels deep, a million keys, lone surrogates) is refused with 422 instead of being stored and then
breaking every page that shows it: the response encoder gives up past ~250 levels and on lone surrogates.

`readable` is the reading side: a row written before these bounds existed is shown only when the encoder
can render it; otherwise a short note replaces it, so one bad row cannot break a whole listing.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from model_owner_server.core.config import Settings

# What `readable` still renders (also the ceilings of the settings, so a stored value is always readable).
READ_DEPTH, READ_ITEMS, READ_STRING = 100, 1_000_000, 1_000_000


@dataclass(frozen=True)
class JsonBounds:
    max_depth: int = 32
    max_items: int = 10_000  # keys + array elements, all levels together
    max_string: int = 16_384  # characters of one string or key
    max_bytes: int = 256 * 1024  # the encoded text

    @classmethod
    def from_settings(cls, settings: Settings) -> JsonBounds:
        return cls(
            settings.max_json_depth,
            settings.max_json_items,
            settings.max_json_string_chars,
            settings.max_json_part_bytes,
        )


READ_BOUNDS = JsonBounds(READ_DEPTH, READ_ITEMS, READ_STRING, 64 * 1024 * 1024)


class JsonBoundsError(ValueError):
    """A value outside the bounds; `bound` names which one (depth, size, items, string, unicode, json)."""

    def __init__(self, bound: str, message: str):
        super().__init__(message)
        self.bound = bound


def parse_bounded(raw: bytes, bounds: JsonBounds) -> Any:
    """Decode JSON text within `bounds`; non-finite numbers (NaN, Infinity: JSON has none, but Python writes
    them) become null. Raises JsonBoundsError saying which bound, or what is wrong with the text."""
    if len(raw) > bounds.max_bytes:
        raise JsonBoundsError("size", f"is {len(raw)} bytes; at most {bounds.max_bytes} are accepted")
    try:
        value = json.loads(raw.decode("utf-8"))
    except RecursionError:  # the C decoder stops near the interpreter's recursion limit (~1000 levels)
        raise JsonBoundsError("depth", f"is nested deeper than {bounds.max_depth} levels") from None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError, or an int of more than 4300 digits
        raise JsonBoundsError("json", f"must be JSON text ({str(exc)[:200]})") from None
    return check_value(value, bounds)


def check_value(value: Any, bounds: JsonBounds) -> Any:
    """`value` (decoded JSON) within `bounds`, with non-finite floats as None; JsonBoundsError otherwise.

    Iterative (an explicit stack), so a deep value cannot exhaust the interpreter's stack while it is checked.
    """
    items = 0
    root: list[Any] = [None]
    # (source container, destination container, depth of the source)
    stack: list[tuple[Any, Any, int]] = []

    def scalar(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, str):
            _check_string(v, bounds, "string")
        return v

    def child(v: Any, depth: int) -> Any:
        if isinstance(v, dict | list):
            if depth > bounds.max_depth:
                raise JsonBoundsError("depth", f"is nested deeper than {bounds.max_depth} levels")
            copy: dict[str, Any] | list[Any] = {} if isinstance(v, dict) else []
            stack.append((v, copy, depth))
            return copy
        return scalar(v)

    root[0] = child(value, 1)
    while stack:
        src, dst, depth = stack.pop()
        items += len(src)
        if items > bounds.max_items:
            raise JsonBoundsError("items", f"holds more than {bounds.max_items} keys and array elements")
        if isinstance(src, dict):
            for k, v in src.items():
                _check_string(k, bounds, "key")
                dst[k] = child(v, depth + 1)
        else:
            dst.extend(child(v, depth + 1) for v in src)
    return root[0]


def _check_string(s: str, bounds: JsonBounds, what: str) -> None:
    if len(s) > bounds.max_string:
        raise JsonBoundsError("string", f"holds a {what} of {len(s)} characters; at most {bounds.max_string}")
    if not s.isascii():
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            raise JsonBoundsError("unicode", f"holds a {what} that is not valid Unicode (a lone surrogate)") from None


def readable(value: Any, bounds: JsonBounds = READ_BOUNDS) -> Any:
    """A stored client JSON as it can be shown: the value itself (non-finite numbers as null), or, when it is
    outside what can be rendered (a row stored before the upload bounds existed), a note saying why."""
    if value is None:
        return None
    try:
        return check_value(value, bounds)
    except JsonBoundsError as exc:
        return {"withheld": f"this stored value {exc}, so it is not shown (it predates the upload limits)"}
