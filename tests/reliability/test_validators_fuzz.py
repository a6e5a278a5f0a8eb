"""Property-based fuzzing of what parses hostile bytes: the safetensors/adapter validator and the signed
manifest verifier. Whatever the input, only the documented error types may come out
(`AdapterValidationError`, `SignatureError`), never a crash with another exception, and what passes
validation really matches the issued spec."""

from __future__ import annotations

import base64
import json
import math
import os
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from shared import signing
from shared.adapter import (
    AdapterValidationError,
    TensorSpec,
    load_and_validate_adapter_file,
    read_safetensors_header,
)

# SCALEOT_FUZZ_SCALE=10 for a longer run (docs/reliability.md).
FUZZ = settings(
    max_examples=max(1, int(250 * float(os.environ.get("SCALEOT_FUZZ_SCALE", "1")))),
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)
SPEC = {
    "model.layers.1.self_attn.q_proj.weight": TensorSpec((4, 4), "F32"),
    "model.layers.1.input_layernorm.weight": TensorSpec((4,), "F32"),
}
_TMP = Path(tempfile.mkdtemp(prefix="fuzz-adapter-"))

# ---------------------------------------------------------------- hostile safetensors files

weird_text = st.one_of(
    st.text(max_size=40),
    st.sampled_from(
        [
            "../../etc/passwd",
            "..\\..\\boot.ini",
            "/abs/name",
            "a\x00b",
            "\ud800",
            "é" * 30,
            "",
            "__metadata__",
            "model.layers.1.self_attn.q_proj.weight",
            "con",
            "x" * 300,
        ]
    ),
)
odd_numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True),
    st.sampled_from([0, 1, 2**63, 2**64 - 1, -1, 10**30]),
)
json_scalar = st.one_of(st.none(), st.booleans(), odd_numbers, weird_text)
json_value = st.recursive(
    json_scalar,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(weird_text, inner, max_size=4)),
    max_leaves=12,
)
dtypes = st.one_of(
    st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "U8", "BOOL", "F8_E4M3", "f32", "", "F32 "]), json_value
)
shapes = st.one_of(
    st.lists(st.integers(min_value=-3, max_value=20), max_size=4), st.lists(odd_numbers, max_size=4), json_value
)
offsets = st.one_of(
    st.tuples(st.integers(-8, 400), st.integers(-8, 400)).map(list), st.lists(odd_numbers, max_size=3), json_value
)
entry = st.one_of(st.fixed_dictionaries({"dtype": dtypes, "shape": shapes, "data_offsets": offsets}), json_value)


@st.composite
def safetensors_files(draw) -> bytes:
    """Header + payload, mostly plausible and then broken in one or more ways."""
    kind = draw(st.sampled_from(["structured", "structured", "structured", "raw", "declared-length", "nested"]))
    if kind == "raw":
        return draw(st.binary(max_size=600))
    if kind == "nested":  # deeply nested JSON: must not blow the parser's recursion
        depth = draw(st.integers(1, 200_000))
        header = ("[" * depth + "]" * depth).encode()
        return struct.pack("<Q", len(header)) + header
    names = draw(st.lists(st.one_of(st.sampled_from(sorted(SPEC)), weird_text), max_size=4))
    header: dict = {}
    for name in names:
        header[name] = draw(entry)
    if draw(st.booleans()):
        header["__metadata__"] = draw(json_value)
    try:
        raw = json.dumps(header, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    except (ValueError, TypeError):
        raw = b"{}"
    if draw(st.booleans()):
        raw = raw[: draw(st.integers(0, len(raw)))]  # truncated JSON
    payload = draw(st.binary(max_size=200))
    declared = len(raw)
    if kind == "declared-length":
        declared = draw(
            st.sampled_from([2**64 - 1, 2**63, 2**32, 1 << 20, (1 << 20) + 1, len(raw) + 1, max(0, len(raw) - 1), 0])
        )
    return struct.pack("<Q", declared) + raw + payload


def _file(header: bytes, payload: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + payload


def _write(data: bytes) -> Path:
    with tempfile.NamedTemporaryFile(dir=_TMP, suffix=".safetensors", delete=False) as f:
        f.write(data)
    return Path(f.name)


@FUZZ
@given(safetensors_files())
@example(struct.pack("<Q", 2**64 - 1) + b"{}")
@example(struct.pack("<Q", 10) + b'{"a": [1e999')
@example(struct.pack("<Q", 5) + b"\xff\xfe{}}")
@example(_file(b'{"x":{"dtype":"F32","shape":[Infinity],"data_offsets":[0,4]}}'))
@example(_file(b'{"x":{"dtype":["F32"],"shape":[1],"data_offsets":[0,4]}}'))
@example(_file(b"[" + b"1" * 5000 + b"]"))
@example(
    _file(
        b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[2,6]}}',
        b"\0" * 8,
    )
)
def test_header_reader_raises_only_validation_errors(data: bytes) -> None:
    path = _write(data)
    try:
        header = read_safetensors_header(path)
    except AdapterValidationError:
        return
    finally:
        path.unlink()  # rejected or not: the fuzzer writes hundreds of these
    # Accepted: the header really describes contiguous, non-overlapping tensors filling the file exactly.
    spans = sorted((e["data_offsets"][0], e["data_offsets"][1]) for e in header.values())
    pos = 0
    for start, end in spans:
        assert start == pos and end >= start
        pos = end
    n = struct.unpack("<Q", data[:8])[0]
    assert 8 + n + pos == len(data)


def test_header_reader_accepts_a_valid_file() -> None:
    """The fuzz test above passes if every input is refused; a real file must be read, offsets and all."""
    path = _write(_valid_adapter_bytes({k: torch.ones(*v.shape) for k, v in SPEC.items()}))
    try:
        header = read_safetensors_header(path)
    finally:
        path.unlink()
    assert {k: (e["dtype"], tuple(e["shape"])) for k, e in header.items() if k != "__metadata__"} == {
        k: (v.dtype, v.shape) for k, v in SPEC.items()
    }
    spans = sorted(tuple(e["data_offsets"]) for k, e in header.items() if k != "__metadata__")
    assert spans == [(0, 16), (16, 80)]  # 4 float32 values, then 16


def _valid_adapter_bytes(values: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save(values)


@st.composite
def adapter_variants(draw) -> bytes:
    """A valid adapter for SPEC, then mutated: names, dtypes, shapes, values (NaN/Inf), extra tensors,
    offsets rewritten, bytes flipped."""
    tensors = {k: torch.randn(*v.shape) for k, v in SPEC.items()}
    mutation = draw(
        st.sampled_from(
            ["none", "value", "dtype", "shape", "rename", "extra", "drop", "offsets", "flip", "truncate", "pad"]
        )
    )
    name = draw(st.sampled_from(sorted(SPEC)))
    if mutation == "value":
        tensors[name].view(-1)[0] = draw(st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e38]))
    elif mutation == "dtype":
        tensors[name] = tensors[name].to(
            draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.uint8]))
        )
    elif mutation == "shape":
        tensors[name] = torch.zeros(tuple(draw(st.lists(st.integers(0, 5), min_size=0, max_size=3))))
    elif mutation == "rename":
        tensors[draw(weird_text.filter(lambda s: s and "\x00" not in s and s not in SPEC))] = tensors.pop(name)
    elif mutation == "extra":
        tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros((2, 2))
    elif mutation == "drop":
        tensors.pop(name)
    try:
        data = bytearray(_valid_adapter_bytes({k: v.contiguous() for k, v in tensors.items()}))
    except (ValueError, UnicodeEncodeError, TypeError):
        data = bytearray(_valid_adapter_bytes({k: v.contiguous() for k, v in SPEC_TENSORS().items()}))
    n = struct.unpack("<Q", data[:8])[0]
    if mutation == "offsets":
        header = json.loads(data[8 : 8 + n])
        entry_name = draw(st.sampled_from(sorted(header)))
        if entry_name != "__metadata__":
            header[entry_name]["data_offsets"] = draw(st.tuples(st.integers(-4, 200), st.integers(-4, 200)).map(list))
        raw = json.dumps(header).encode()
        data = bytearray(struct.pack("<Q", len(raw)) + raw + bytes(data[8 + n :]))
    elif mutation == "flip" and len(data) > 8:
        i = draw(st.integers(0, len(data) - 1))
        data[i] ^= draw(st.integers(1, 255))
    elif mutation == "truncate":
        data = data[: draw(st.integers(0, len(data)))]
    elif mutation == "pad":
        data += b"\0" * draw(st.integers(1, 64))
    return bytes(data)


def SPEC_TENSORS() -> dict[str, torch.Tensor]:
    return {k: torch.zeros(v.shape) for k, v in SPEC.items()}


@FUZZ
@given(adapter_variants())
def test_adapter_validator_raises_only_validation_errors(data: bytes) -> None:
    path = _write(data)
    try:
        tensors = load_and_validate_adapter_file(path, SPEC)
    except AdapterValidationError as exc:
        assert str(exc), "the error must say what to fix"
        return
    finally:
        path.unlink()
    assert set(tensors) == set(SPEC)
    for name, t in tensors.items():
        assert tuple(t.shape) == SPEC[name].shape and t.dtype == torch.float32
        assert torch.isfinite(t).all()


def test_valid_adapter_passes() -> None:
    path = _write(_valid_adapter_bytes({k: torch.ones(*v.shape) for k, v in SPEC.items()}))
    assert set(load_and_validate_adapter_file(path, SPEC)) == set(SPEC)


def test_huge_declared_header_length_is_refused_without_reading() -> None:
    path = _write(struct.pack("<Q", 2**64 - 1) + b"{}")
    with pytest.raises(AdapterValidationError, match="header length"):
        read_safetensors_header(path)


def test_overlapping_offsets_are_refused() -> None:
    h = json.dumps(
        {
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
        }
    ).encode()
    path = _write(struct.pack("<Q", len(h)) + h + b"\0" * 12)
    with pytest.raises(AdapterValidationError, match="overlapping"):
        read_safetensors_header(path)


# ---------------------------------------------------------------- signed manifests

KEY = Ed25519PrivateKey.generate()
KID = signing.key_id(KEY.public_key())
TRUSTED = {KID: KEY.public_key()}
GOOD = signing.sign_manifest(
    KEY,
    signing.emulator_manifest(
        emulator_id="emu_1",
        model_id="mdl_1",
        sha256="0" * 64,
        size_bytes=123,
        layer_plan={"roles": ["adapter"]},
        key_id=KID,
    ),
)


@st.composite
def signed_envelopes(draw) -> object:
    kind = draw(st.sampled_from(["anything", "tampered", "tampered", "resigned-weird"]))
    if kind == "anything":
        return draw(json_value)
    env = json.loads(json.dumps(GOOD))
    which = draw(st.sampled_from(["manifest", "signature", "key_id", "manifest-field", "drop"]))
    if which == "manifest":
        env["manifest"] = draw(json_value)
    elif which == "signature":
        env["signature"] = draw(
            st.one_of(
                json_value, st.binary(max_size=80).map(lambda b: base64.b64encode(b).decode()), st.text(max_size=100)
            )
        )
    elif which == "key_id":
        env["key_id"] = draw(st.one_of(json_value, st.just(KID.upper()), st.just(KID + " ")))
    elif which == "manifest-field":
        env["manifest"][draw(weird_text)] = draw(json_value)
    else:
        env.pop(draw(st.sampled_from(["manifest", "signature", "key_id"])))
    if kind == "resigned-weird" and isinstance(env.get("manifest"), dict):
        # A manifest with the right key id and odd content (lone surrogates, NaN, deep nesting) reaching the
        # signature check itself.
        env["manifest"]["key_id"], env["key_id"] = KID, KID
        env["manifest"]["x"] = draw(st.sampled_from(["\ud800", float("nan"), 10**400, [[[[[]]]]]]))
    return env


def _nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


@FUZZ
@given(signed_envelopes())
@example({"manifest": {"key_id": KID, "x": "\ud800"}, "signature": GOOD["signature"], "key_id": KID})
@example({"manifest": {"key_id": KID, "x": _nested(5000)}, "signature": GOOD["signature"], "key_id": KID})
def test_manifest_verifier_raises_only_signature_errors(signed: object) -> None:
    try:
        manifest = signing.verify_signed_manifest(signed, TRUSTED)
    except signing.SignatureError as exc:
        assert str(exc)
        return
    # Accepted: only the genuine manifest (any change to it breaks the signature).
    assert signing.canonical_bytes(manifest) == signing.canonical_bytes(GOOD["manifest"])


@FUZZ
@given(json_value, st.lists(st.one_of(st.text(max_size=50), st.just(KID)), max_size=3))
def test_key_listing_parser_never_crashes(listing: object, pins: list[str]) -> None:
    try:
        keys = signing.trusted_keys_from_listing(listing if isinstance(listing, dict) else {"keys": listing}, pins)
    except signing.SignatureError:
        return  # an unparseable pin
    for kid, key in keys.items():
        assert signing.key_id(key) == kid


def test_genuine_manifest_verifies() -> None:
    assert signing.verify_signed_manifest(json.loads(json.dumps(GOOD)), TRUSTED)["emulator_id"] == "emu_1"
    assert not math.isnan(GOOD["manifest"]["size_bytes"])
