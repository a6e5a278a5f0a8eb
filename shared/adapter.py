"""The adapter: the only tensors that travel back from the data owner.

Names are the full model's own state-dict names (the emulator keeps every layer at its position), so the
same spec describes the adapter in the emulator and in the full model. Validation is strict: exactly the
issued names, shapes and dtypes, finite values; anything else is refused with a message saying what to fix.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from shared.architectures import decoder_layers, layer_prefix

DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
}
DTYPE_SIZES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}
MAX_HEADER_BYTES = 1 << 20  # an adapter header lists a few hundred tensors at most


class AdapterValidationError(ValueError):
    """An uploaded adapter does not match what was issued; the message says what differs."""


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name, e.g. "F32"

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]

    def to_json(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype}


def adapter_spec(model: nn.Module, layers: list[int], dtype: torch.dtype | None = None) -> dict[str, TensorSpec]:
    """Expected adapter tensors: every parameter of the given decoder layers, by full-model name, in `dtype`
    (default: the model's own; the server passes the emulator's storage dtype)."""
    blocks = decoder_layers(model)
    spec: dict[str, TensorSpec] = {}
    for i in layers:
        prefix = layer_prefix(model, i)
        for name, p in blocks[i].named_parameters():
            spec[prefix + name] = TensorSpec(tuple(p.shape), DTYPE_NAMES[dtype or p.dtype])
    return spec


def spec_to_json(spec: dict[str, TensorSpec]) -> dict[str, dict[str, Any]]:
    return {k: v.to_json() for k, v in spec.items()}


def spec_from_json(d: dict[str, Any]) -> dict[str, TensorSpec]:
    return {k: TensorSpec(tuple(int(x) for x in v["shape"]), str(v["dtype"])) for k, v in d.items()}


def max_adapter_bytes(spec: dict[str, TensorSpec]) -> int:
    """Hard cap for an upload: the tensors' bytes plus a generous header allowance."""
    return sum(s.nbytes for s in spec.values()) + 8 + min(MAX_HEADER_BYTES, 4096 + 256 * len(spec))


def extract_adapter(model: nn.Module, layers: list[int]) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies of the adapter layers' parameters, by full-model name."""
    blocks = decoder_layers(model)
    out: dict[str, torch.Tensor] = {}
    for i in layers:
        prefix = layer_prefix(model, i)
        for name, p in blocks[i].named_parameters():
            out[prefix + name] = p.detach().to("cpu").contiguous().clone()
    return out


def _check_names(names: set[str], spec: dict[str, TensorSpec]) -> None:
    missing, extra = sorted(set(spec) - names), sorted(names - set(spec))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s), e.g. {missing[:3]}")
        if extra:
            parts.append(f"unexpected {len(extra)} tensor(s), e.g. {extra[:3]}")
        raise AdapterValidationError(
            "adapter tensors do not match the adapter layers issued with the emulator: "
            + "; ".join(parts)
            + ". Upload exactly the adapter layers' parameters (see the emulator's adapter_spec)."
        )


def _check_entry(name: str, shape: tuple[int, ...], dtype: str, spec: dict[str, TensorSpec]) -> None:
    want = spec[name]
    if shape != want.shape:
        raise AdapterValidationError(f"{name}: shape {list(shape)} but the emulator issued {list(want.shape)}")
    if dtype != want.dtype:
        raise AdapterValidationError(f"{name}: dtype {dtype} but the emulator issued {want.dtype}; cast before upload")


def validate_adapter(tensors: dict[str, torch.Tensor], spec: dict[str, TensorSpec]) -> None:
    _check_names(set(tensors), spec)
    for name, t in tensors.items():
        _check_entry(name, tuple(t.shape), DTYPE_NAMES.get(t.dtype, str(t.dtype)), spec)
        if not torch.isfinite(t).all():
            raise AdapterValidationError(f"{name}: contains NaN or infinite values")


MAX_DIMS = 8  # adapter tensors are 1-D or 2-D; a header claiming more is refused before any arithmetic
MAX_DIM_SIZE = 1 << 40


def _plain_int(x: Any, lo: int, hi: int) -> int:
    """A JSON integer within [lo, hi]; anything else (floats, bools, strings, inf) raises ValueError."""
    if isinstance(x, bool) or not isinstance(x, int) or not lo <= x <= hi:
        raise ValueError(x)
    return x


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def read_safetensors_header(path: str | Path) -> dict[str, Any]:
    """Parse and sanity-check a safetensors header without trusting it (sizes, offsets, overlaps).

    Raises only AdapterValidationError, whatever the bytes (huge declared lengths, non-JSON, deep nesting,
    NaN/Infinity, odd types, overlapping or non-contiguous offsets)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise AdapterValidationError("not a safetensors file: shorter than its 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise AdapterValidationError(
                f"not a safetensors file: declared header length {n} exceeds the file or the limit"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise AdapterValidationError(f"not a safetensors file: header is not JSON ({str(exc)[:200]})") from None
    if not isinstance(header, dict):
        raise AdapterValidationError("not a safetensors file: header is not a JSON object")
    header.pop("__metadata__", None)
    spans = []
    for name, entry in header.items():
        try:
            if (
                not isinstance(entry, dict)
                or not isinstance(entry.get("shape"), list)
                or not isinstance(entry.get("data_offsets"), list)
                or len(entry["data_offsets"]) != 2
                or len(entry["shape"]) > MAX_DIMS
            ):
                raise ValueError(name)
            dtype = entry["dtype"]
            shape = tuple(_plain_int(x, 0, MAX_DIM_SIZE) for x in entry["shape"])
            start, end = (_plain_int(x, 0, size) for x in entry["data_offsets"])
        except (TypeError, KeyError, ValueError) as exc:
            raise AdapterValidationError(
                f"malformed header entry for {name[:200]!r}: expected "
                "{dtype, shape: [ints], data_offsets: [start, end]} within the file"
            ) from exc
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise AdapterValidationError(
                f"{name[:200]}: dtype {str(dtype)[:50]!r} is not a floating dtype an adapter may use"
            )
        if not start <= end or end - start != math.prod(shape) * DTYPE_SIZES[dtype]:
            raise AdapterValidationError(f"{name[:200]}: data offsets do not match its shape and dtype")
        spans.append((start, end, name))
    spans.sort()
    pos = 0
    for start, end, name in spans:
        if start != pos:
            raise AdapterValidationError(f"{name[:200]}: overlapping or non-contiguous tensor data")
        pos = end
    if 8 + n + pos != size:
        raise AdapterValidationError(f"file size {size} does not match its header (truncated or padded upload)")
    return header


def _check_file(path: Path, spec: dict[str, TensorSpec], max_bytes: int | None) -> dict[str, Any]:
    """Size cap, header sanity, then exactly the issued names, shapes and dtypes. Returns the header."""
    limit = max_adapter_bytes(spec) if max_bytes is None else max_bytes
    size = path.stat().st_size
    if size > limit:
        raise AdapterValidationError(
            f"adapter file is {size} bytes; the limit for this emulator is {limit}" + _why_too_big(path, spec)
        )
    return _check_header(path, spec)


def _check_header(path: Path, spec: dict[str, TensorSpec]) -> dict[str, Any]:
    header = read_safetensors_header(path)
    _check_names(set(header), spec)
    for name, entry in header.items():
        _check_entry(name, tuple(int(x) for x in entry["shape"]), entry["dtype"], spec)
    return header


def _why_too_big(path: Path, spec: dict[str, TensorSpec]) -> str:
    """The header's own mismatch, when it has one (e.g. fp32 tensors for a bf16 emulator); bounded reads only."""
    try:
        _check_header(path, spec)
    except AdapterValidationError as exc:
        return f" ({exc})"
    return ""


_TORCH_DTYPES = {v: k for k, v in DTYPE_NAMES.items()}


def validate_adapter_file(
    path: str | Path, spec: dict[str, TensorSpec], max_bytes: int | None = None, chunk_bytes: int = 4 << 20
) -> None:
    """The same checks as load_and_validate_adapter_file in bounded memory: tensor data is streamed through
    one reused buffer to check finiteness, so a 100 MB upload never costs 100 MB of server RAM."""
    path = Path(path)
    header = _check_file(path, spec, max_bytes)
    buf = bytearray(chunk_bytes)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        base = 8 + n
        for name, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            dtype = _TORCH_DTYPES[entry["dtype"]]
            item = DTYPE_SIZES[entry["dtype"]]
            start, end = entry["data_offsets"]
            f.seek(base + start)
            remaining = end - start
            step = chunk_bytes - chunk_bytes % item
            while remaining > 0:
                got = f.readinto(memoryview(buf)[: min(step, remaining)])
                if not got:
                    raise AdapterValidationError(f"{name}: file ends inside its data (truncated upload)")
                values = torch.frombuffer(buf, dtype=dtype, count=got // item)
                if not torch.isfinite(values).all():
                    raise AdapterValidationError(f"{name}: contains NaN or infinite values")
                remaining -= got


def load_and_validate_adapter_file(
    path: str | Path, spec: dict[str, TensorSpec], max_bytes: int | None = None
) -> dict[str, torch.Tensor]:
    """Validate an uploaded adapter file against the issued spec; only then load its tensors."""
    path = Path(path)
    _check_file(path, spec, max_bytes)
    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise AdapterValidationError(f"adapter file could not be read as safetensors ({exc})") from exc
    validate_adapter(tensors, spec)
    return tensors
