"""Half-size emulators: `make-emulator --dtype` writes bf16/fp16 files of about half the bytes, the dtype is in
the file's metadata and the loaded module, and a dtype that is not offered is refused before any work."""

import json

import pytest
import torch
from typer.testing import CliRunner

from model_owner_server.cli import app
from scaleot_samples.tiny import save_tiny_model_dir
from shared.emulator_file import load_emulator, read_metadata


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "m", "llama", n_layers=6, hidden=32)


def _make(model_dir, out, *extra):
    return CliRunner().invoke(
        app,
        [
            "make-emulator",
            str(model_dir),
            "--method",
            "uniform_layerdrop",
            "--n-dropped",
            "1",
            "--output",
            str(out),
            *extra,
        ],
    )


def test_make_emulator_dtype_halves_the_file(model_dir, tmp_path):
    sizes = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        out = tmp_path / f"{name}.safetensors"
        res = _make(model_dir, out, "--dtype", name)
        assert res.exit_code == 0, res.output
        sizes[name] = json.loads(res.output[res.output.index("{") :])["emulator_bytes"]
        assert read_metadata(out)["dtype"] == name
        assert {p.dtype for p in load_emulator(out).model.parameters()} == {dtype}
    for half in ("bfloat16", "float16"):  # tensors halve; the metadata (config, tokenizer) does not
        assert 0.5 < sizes[half] / sizes["float32"] < 0.6


def test_make_emulator_refuses_a_dtype_not_offered(model_dir, tmp_path):
    out = tmp_path / "e.safetensors"
    res = _make(model_dir, out, "--dtype", "float64")
    assert res.exit_code == 2 and "float32, bfloat16, float16" in res.output and not out.exists()
