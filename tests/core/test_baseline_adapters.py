"""The OT / CRaSh baselines honour --n-adapter (the first and last n_adapter/2 layers) or refuse it; they used
to build 4 adapter layers whatever was asked (`uniform_layerdrop_plan(..., n_edge=2)`)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from model_owner_server.cli import app
from scaleot_samples.tiny import save_tiny_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "m", "llama", n_layers=10, hidden=32)


def make(model_dir, out, method: str, n_adapter: int, *extra: str):
    args = ["make-emulator", str(model_dir), "--method", method, "--n-adapter", str(n_adapter), "--output", str(out)]
    return CliRunner().invoke(app, [*args, *extra])


@pytest.mark.parametrize("method", ["uniform_layerdrop", "layer_sharing"])
def test_baselines_build_the_adapter_layers_asked_for(model_dir, tmp_path, method):
    res = make(model_dir, tmp_path / "e.safetensors", method, 6)
    assert res.exit_code == 0, res.output
    info = json.loads(res.output[res.output.index("{") :])
    assert info["adapter_layers"] == [0, 1, 2, 7, 8, 9]
    # Default n_dropped: half of the 4 middle layers (layer sharing runs a kept layer again in each slot).
    assert info["plan"] == ("AAAF.F.AAA" if method == "uniform_layerdrop" else "AAAFFFFAAA")


@pytest.mark.parametrize(
    ("n_adapter", "message"), [(5, "must be an even number"), (0, "must be an even number"), (10, "at most 8")]
)
def test_an_n_adapter_the_baselines_cannot_honour_is_refused_and_writes_nothing(
    model_dir, tmp_path, n_adapter, message
):
    out = tmp_path / "e.safetensors"
    res = make(model_dir, out, "uniform_layerdrop", n_adapter)
    assert res.exit_code != 0 and message in res.output, res.output
    assert not out.exists()
