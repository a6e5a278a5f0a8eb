"""A model's compute dtype (issue 22): registered with the model, shown in GET, honoured by every job.

The plan test uses a tiny LLaMA whose ranking is clear by construction: layers 1 and 4 write 8x their random
outputs into the residual stream, layers 2 and 3 write nothing (zero o_proj / down_proj, so they are the
identity, and so is a fresh harmonizer). Replacing 1 or 4 moves the loss a lot (up or down: the weights are
random), replacing 2 or 3 not at all, so each loud layer sits on the same side of each silent one in bf16 as in
float32, and the stage-1 ranking of the layers the plan chooses from (1-4; sandwich placement puts the adapters
at 0 and 5) and the emulator plan must come out the same.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors import safe_open
from server_helpers import auth, fast_settings
from typer.testing import CliRunner

from model_owner_server import crud
from model_owner_server.jobs.resources import checkpoint_dtype, resolve_compute_dtype
from model_owner_server.main import create_app
from shared.architectures import decoder_layers

STRONG, SILENT = (1, 4), (2, 3)


@pytest.fixture(scope="module")
def ranked_model(tmp_path_factory) -> Path:
    from scaleot_samples.tiny import byte_tokenizer, tiny_model

    path = tmp_path_factory.mktemp("ranked") / "tiny-llama-ranked"
    model = tiny_model("llama", 6, 32, 0)
    with torch.no_grad():
        for i, layer in enumerate(decoder_layers(model)):
            scale = 8.0 if i in STRONG else 0.0 if i in SILENT else 1.0
            layer.self_attn.o_proj.weight.mul_(scale)
            layer.mlp.down_proj.weight.mul_(scale)
    model.to(torch.bfloat16).save_pretrained(path)  # a bf16 checkpoint, as modern ones come
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def app_client(tmp_path_factory, new_database_url, files):
    settings = fast_settings(
        tmp_path_factory.mktemp("dtype-data"),
        new_database_url(),
        emulator_calibration_steps=2,
        emulator_fidelity_blocks=2,
    )
    with TestClient(create_app(settings)) as client:
        with client.app.state.sessions() as s:
            _, key = crud.create_org(s, "owner", "admin")
            s.commit()
        yield client, auth(key), settings


def _register(client, h, name: str, path: Path, dtype: str | None) -> dict:
    body = {"name": name, "path": str(path), **({"compute_dtype": dtype} if dtype else {})}
    r = client.post("/v1/models", headers=h, json=body)
    assert r.status_code == 201, r.text
    return r.json()


def _stage1(client, h, model_id: str, corpus: Path) -> dict:
    r = client.post(
        f"/v1/models/{model_id}/importance",
        headers=h,
        json={"steps": 8, "corpus": str(corpus), "rl_interval": 2, "seed": 0},
    )
    assert r.status_code == 202, r.text
    job = client.get(f"/v1/jobs/{r.json()['id']}", headers=h).json()
    assert job["status"] == "succeeded", job
    return job


def test_compute_dtype_is_registered_and_shown(app_client, files):
    client, h, _ = app_client
    default = _register(client, h, "plain", files["model"], None)
    assert default["compute_dtype"] == "auto"
    half = _register(client, h, "half", files["model"], "bfloat16")
    assert half["compute_dtype"] == "bfloat16"
    assert client.get(f"/v1/models/{half['id']}", headers=h).json()["compute_dtype"] == "bfloat16"
    listed = {m["name"]: m["compute_dtype"] for m in client.get("/v1/models", headers=h).json()["models"]}
    assert listed["half"] == "bfloat16" and listed["plain"] == "auto"
    r = client.post("/v1/models", headers=h, json={"name": "x", "path": str(files["model"]), "compute_dtype": "int8"})
    assert r.status_code == 422 and "compute_dtype" in r.text
    names = {m["name"] for m in client.get("/v1/models", headers=h).json()["models"]}
    assert "x" not in names and names == set(listed)  # the refused registration stored nothing


def test_register_model_cli_takes_the_compute_dtype(tmp_path, new_database_url, files, monkeypatch):
    from model_owner_server.cli import app

    monkeypatch.setenv("SCALEOT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("SCALEOT_DATABASE_URL", new_database_url())
    runner = CliRunner()
    out = runner.invoke(app, ["register-model", "m16", "--path", str(files["model"]), "--compute-dtype", "float16"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["compute_dtype"] == "float16"
    bad = runner.invoke(app, ["register-model", "m8", "--path", str(files["model"]), "--compute-dtype", "int8"])
    assert bad.exit_code == 2 and "int8" in bad.output and "bfloat16" in bad.output


def test_auto_is_the_checkpoints_dtype_on_a_gpu_and_float32_on_cpu(ranked_model, files, monkeypatch):
    assert checkpoint_dtype(ranked_model) == "bfloat16"
    assert checkpoint_dtype(files["model"]) == "float32"
    assert resolve_compute_dtype("auto", ranked_model, "cpu") == torch.float32  # bf16 is slow on CPU
    assert resolve_compute_dtype(None, ranked_model, "cpu") == torch.float32  # rows from before the field
    assert resolve_compute_dtype("bfloat16", files["model"], "cpu") == torch.bfloat16  # explicit: honoured
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_compute_dtype("auto", ranked_model, "cuda:0") == torch.bfloat16
    assert resolve_compute_dtype("auto", files["model"], "cuda") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # an older GPU
    assert resolve_compute_dtype("auto", ranked_model, "cuda") == torch.float32
    with pytest.raises(ValueError, match="float16"):
        resolve_compute_dtype("int8", ranked_model, "cpu")


def test_bf16_model_computes_in_bf16_with_the_same_plan_as_fp32(app_client, ranked_model, files, monkeypatch):
    """Stage 1 and the emulator build of a model registered in bf16 run M in bf16 (seen inside the job), and
    give the same ranking and emulator plan as the same checkpoint registered in float32."""
    import model_owner_server.jobs.tasks.importance as importance_task

    client, h, settings = app_client
    seen: list[torch.dtype] = []
    real = importance_task.estimate_importance

    def spy(model, *args, **kwargs):
        seen.append(next(model.parameters()).dtype)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(importance_task, "estimate_importance", spy)
    results, plans = {}, {}
    for dtype in ("float32", "bfloat16"):
        model = _register(client, h, f"ranked-{dtype}", ranked_model, dtype)
        job = _stage1(client, h, model["id"], files["corpus"])
        results[dtype] = job["result"]
        assert job["result"]["compute_dtype"] == dtype
        # float32 whatever M's dtype: bf16 would round a LayerNorm weight's updates away (test_bf16_standins)
        assert job["result"]["harmonizer_dtype"] == "float32"
        assert job["result"]["memory"]["compute_dtype"] == dtype
        r = client.post(
            "/v1/emulators",
            headers=h,
            json={"model_id": model["id"], "n_adapter": 2, "alpha": 0.5, "beta": 0.0, "dtype": "float32"},
        )
        assert r.status_code in (200, 202), r.text
        emu = client.get(f"/v1/emulators/{r.json()['emulator']['id']}", headers=h).json()
        assert emu["status"] == "ready", emu
        job = client.get(f"/v1/jobs/{emu['job_id']}", headers=h).json()
        assert job["result"]["compute_dtype"] == dtype and job["result"]["memory"]["compute_dtype"] == dtype
        plans[dtype] = emu["plan"]
        with client.app.state.sessions() as s:  # the file keeps its issued dtype whatever M was computed in
            from model_owner_server.models import EmulatorRow

            row = s.get(EmulatorRow, emu["id"])
            assert row.build_info["compute_dtype"] == dtype and row.build_info["dtype"] == "float32"
            path = settings.resolved_data_dir / row.path
        with safe_open(str(path), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}  # noqa: SIM118 (safe_open is not iterable)
    assert seen == [torch.float32, torch.bfloat16]
    fp32, bf16 = results["float32"], results["bfloat16"]
    # The ranking of the layers the plan chooses from (sandwich placement puts the adapters at 0 and 5 whatever
    # their scores); among 0 and 5, whose order the construction leaves to chance, bf16 may differ.
    middle = [i for i in fp32["ranking"] if i not in (0, 5)]
    assert middle == [i for i in bf16["ranking"] if i not in (0, 5)], (fp32["ranking"], bf16["ranking"])
    # the constructed signal: every loud layer is on the same side of every silent layer in both runs (how far
    # a score moves is not bounded: a score that moves flips later sampled configurations, a chaotic trajectory)
    for a in STRONG:
        for b in SILENT:
            assert (fp32["scores"][a] > fp32["scores"][b]) == (bf16["scores"][a] > bf16["scores"][b]), (a, b)
    assert plans["float32"]["roles"] == plans["bfloat16"]["roles"]
    assert "harmonizer" in plans["float32"]["roles"]  # a real ScaleOT plan, with stand-ins
