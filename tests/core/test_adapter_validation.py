"""Bad adapters get a clear error and change nothing."""

import copy
import struct

import pytest
import torch
from safetensors.torch import save_file

from model_owner_server.scaleot.plugin import plug_in
from scaleot_samples.tiny import tiny_model
from shared.adapter import (
    AdapterValidationError,
    adapter_spec,
    extract_adapter,
    load_and_validate_adapter_file,
    max_adapter_bytes,
    validate_adapter_file,
)

# Both file validators (loading, and streaming in bounded memory) must refuse exactly the same files.
VALIDATORS = pytest.mark.parametrize("validate", [load_and_validate_adapter_file, validate_adapter_file])

LAYERS = [0, 2]


@pytest.fixture
def model():
    return tiny_model("llama")


def _mutations(good: dict[str, torch.Tensor]):
    name = sorted(good)[0]
    wrong_key = dict(good)
    wrong_key["model.layers.1.mlp.up_proj.weight"] = wrong_key.pop(name)
    missing = dict(good)
    missing.pop(name)
    extra = dict(good, **{"lm_head.weight": torch.zeros(3)})
    shape = dict(good, **{name: torch.zeros(good[name].shape[0] + 1, *good[name].shape[1:])})
    dtype = dict(good, **{name: good[name].to(torch.float16)})
    nan = dict(good, **{name: good[name].clone().index_fill_(0, torch.tensor([0]), float("nan"))})
    inf = dict(good, **{name: good[name].clone().fill_(float("inf"))})
    return {
        "wrong key": (wrong_key, "unexpected"),
        "missing": (missing, "missing"),
        "extra": (extra, "unexpected"),
        "shape": (shape, "shape"),
        "dtype": (dtype, "dtype"),
        "nan": (nan, "NaN"),
        "inf": (inf, "infinite"),
    }


@pytest.mark.parametrize("case", ["wrong key", "missing", "extra", "shape", "dtype", "nan", "inf"])
def test_plugin_rejects_bad_adapter_and_changes_nothing(model, case):
    bad, message = _mutations(extract_adapter(model, LAYERS))[case]
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(AdapterValidationError, match=message):
        plug_in(model, bad, LAYERS)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@VALIDATORS
@pytest.mark.parametrize("case", ["wrong key", "missing", "extra", "shape", "dtype", "nan", "inf"])
def test_file_validator_rejects_bad_adapter(tmp_path, model, case, validate):
    bad, message = _mutations(extract_adapter(model, LAYERS))[case]
    path = tmp_path / "a.safetensors"
    save_file(bad, str(path))
    spec = adapter_spec(model, LAYERS)
    with pytest.raises(AdapterValidationError, match=message if case != "extra" else "unexpected|limit"):
        validate(path, spec, max_bytes=max_adapter_bytes(spec) + 1000)


def test_file_validator_accepts_good_adapter(tmp_path, model):
    good = extract_adapter(model, LAYERS)
    path = tmp_path / "a.safetensors"
    save_file(good, str(path))
    loaded = load_and_validate_adapter_file(path, adapter_spec(model, LAYERS))
    assert loaded.keys() == good.keys() and all(torch.equal(loaded[k], good[k]) for k in good)


def _raw(tmp_path, header: bytes, body: bytes = b"", declared: int | None = None):
    path = tmp_path / "raw.safetensors"
    path.write_bytes(struct.pack("<Q", len(header) if declared is None else declared) + header + body)
    return path


@VALIDATORS
@pytest.mark.parametrize(
    "header,body,declared,message",
    [
        (b"", b"", None, "not JSON"),
        (b"not json", b"", None, "not JSON"),
        (b"[1,2]", b"", None, "not a JSON object"),
        (b"{}", b"", 1 << 40, "header length"),
        (b'{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', b"\0" * 4, None, "size"),
        (b'{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}', b"\0" * 4, None, "offsets"),
        (b'{"x":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}}', b"\0" * 8, None, "dtype"),
        (
            b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}',
            b"\0" * 12,
            None,
            "overlapping",
        ),
        (b'{"x":{"dtype":"F32","shape":[2]}}', b"\0" * 8, None, "malformed"),
    ],
)
def test_header_validator_rejects_malformed_files(tmp_path, model, header, body, declared, message, validate):
    path = _raw(tmp_path, header, body, declared)
    with pytest.raises(AdapterValidationError, match=message):
        validate(path, adapter_spec(model, LAYERS), max_bytes=1 << 20)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_streaming_validator_finds_a_nan_in_any_chunk(tmp_path, dtype):
    model = tiny_model("llama").to(dtype)
    good = extract_adapter(model, LAYERS)
    spec = adapter_spec(model, LAYERS)
    path = tmp_path / "a.safetensors"
    save_file(good, str(path))
    validate_adapter_file(path, spec, chunk_bytes=64)  # many small chunks: every boundary is crossed
    name = sorted(good)[-1]
    bad = dict(
        good,
        **{
            name: good[name]
            .clone()
            .view(-1)
            .index_fill_(0, torch.tensor([good[name].numel() - 1]), float("nan"))
            .view_as(good[name])
        },
    )
    save_file(bad, str(path))
    with pytest.raises(AdapterValidationError, match="NaN"):
        validate_adapter_file(path, spec, chunk_bytes=64)


def test_file_validator_rejects_oversized_file(tmp_path, model):
    path = tmp_path / "big.safetensors"
    path.write_bytes(b"\0" * 5000)
    with pytest.raises(AdapterValidationError, match="limit"):
        load_and_validate_adapter_file(path, adapter_spec(model, LAYERS), max_bytes=4000)
