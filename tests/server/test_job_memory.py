"""Peak memory of every job stage, stored with the job (issue 22), the GPU fit check and the worker's device."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from server_helpers import auth, fast_settings
from typer.testing import CliRunner

from model_owner_server import crud
from model_owner_server.jobs.resources import DoesNotFit, MemoryMeter, check_fits
from model_owner_server.main import create_app

MB = 1024 * 1024


def test_meter_sees_a_stage_peak_and_not_what_an_earlier_stage_freed():
    meter = MemoryMeter("cpu")
    with meter.stage("big"):
        x = torch.ones(16 * MB)  # 64 MiB of float32, written (resident), then freed inside the stage
        x.add_(1)
        del x
    with meter.stage("small"):
        y = torch.ones(MB // 4)  # 1 MiB
        del y
    rec = meter.record()
    assert rec["device"] == "cpu" and "statm" in rec["method"]
    assert rec["stages"]["big"]["peak_bytes"] >= 60 * MB
    assert rec["stages"]["small"]["peak_bytes"] < 32 * MB  # the 64 MiB were given back, not counted again
    assert rec["peak_bytes"] == rec["stages"]["big"]["peak_bytes"]


@pytest.fixture(scope="module")
def mid_model(tmp_path_factory) -> Path:
    """A ~38 MB LLaMA (hidden 512): big enough that its load is a real step in the process's memory."""
    from scaleot_samples.tiny import save_tiny_model_dir

    return save_tiny_model_dir(tmp_path_factory.mktemp("mid") / "llama-512", "llama", n_layers=4, hidden=512)


def test_importance_job_stores_plausible_peak_memory_per_stage(tmp_path, new_database_url, mid_model, files):
    settings = fast_settings(tmp_path / "data", new_database_url())
    with TestClient(create_app(settings)) as client:
        with client.app.state.sessions() as s:
            _, key = crud.create_org(s, "owner", "admin")
            s.commit()
        h = auth(key)
        model = client.post("/v1/models", headers=h, json={"name": "mid", "path": str(mid_model)}).json()
        r = client.post(
            f"/v1/models/{model['id']}/importance",
            headers=h,
            json={"steps": 1, "corpus": str(files["corpus"]), "rl_interval": 1},
        )
        job = client.get(f"/v1/jobs/{r.json()['id']}", headers=h).json()
    assert job["status"] == "succeeded", job
    mem = job["result"]["memory"]
    assert mem["device"] == "cpu" and mem["compute_dtype"] == "float32"
    n_bytes = mem["model_bytes"]
    assert n_bytes == model["n_params"] * 4 > 30 * MB
    assert set(mem["stages"]) == {"load", "tokenize", "stage1"}
    # A float32 checkpoint loaded in float32 is memory-mapped: its pages become resident when stage 1's first
    # forward reads them, so stage 1 holds all of M (plus the harmonizers and activations), and not many copies.
    assert mem["stages"]["load"]["peak_bytes"] < n_bytes
    assert mem["stages"]["stage1"]["peak_bytes"] >= n_bytes
    assert mem["peak_over_model"] < 10
    assert all(s["seconds"] >= 0 and s["over_model"] > 0 for s in mem["stages"].values())
    assert job["metrics"]["memory"]["stages"].keys() == mem["stages"].keys()  # shown live as well


def test_a_model_that_does_not_fit_the_gpu_is_refused_naming_the_memory(monkeypatch):
    gib = 1024**3
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (20 * gib, 80 * gib))
    with pytest.raises(DoesNotFit) as exc:
        check_fits(7_000_000_000, torch.bfloat16, "emulator", "cuda:0")
    msg = str(exc.value)
    assert "needs about 45.6 GiB on cuda:0" in msg and "20.0 of 80.0 GiB" in msg and "bfloat16" in msg
    check_fits(7_000_000_000, torch.bfloat16, "importance", "cuda:0", resident_bytes=14 * gib)  # fits: M is there
    check_fits(70_000_000_000, torch.float32, "emulator", "cpu")  # no check on CPU


def test_a_cuda_device_without_cuda_fails_jobs_and_workers_clearly(tmp_path, new_database_url, files, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    settings = fast_settings(tmp_path / "data", new_database_url(), device="cuda")
    with TestClient(create_app(settings)) as client:
        with client.app.state.sessions() as s:
            _, key = crud.create_org(s, "owner", "admin")
            s.commit()
        h = auth(key)
        model = client.post("/v1/models", headers=h, json={"name": "t", "path": str(files["model"])}).json()
        r = client.post(
            f"/v1/models/{model['id']}/importance", headers=h, json={"steps": 1, "corpus": str(files["corpus"])}
        )
        job = client.get(f"/v1/jobs/{r.json()['id']}", headers=h).json()
    assert job["status"] == "failed"
    assert "SCALEOT_DEVICE=cuda" in job["error"] and "CUDA is not available" in job["error"]
    assert job["error"].count("SCALEOT_DEVICE=cuda") == 1, job["error"]  # said once, not prefixed twice

    from model_owner_server.cli import app

    monkeypatch.setenv("SCALEOT_DATA_DIR", str(tmp_path / "worker-data"))
    monkeypatch.setenv("SCALEOT_DATABASE_URL", new_database_url())
    out = CliRunner().invoke(app, ["worker", "--device", "cuda"])
    assert out.exit_code == 2, out.output
    # the option the user typed is named (once), with what to use instead
    assert "--device cuda" in out.output and "CUDA is not available" in out.output and "cpu" in out.output
    assert out.output.count("cuda asks for a GPU") == 1, out.output


def test_calibration_activations_are_counted_on_top_of_the_model_factor(monkeypatch):
    """The emulator job's GPU fit check adds calibration's activations, which grow with the step's tokens (not M's
    bytes); with them, M x the factor covers the peaks measured on SmolLM2 at the service's batch (4 x 128) with
    the gradient term (benchmarks/results/scaling_calibration_gradterm_*_b4.md: bf16 10.09x, fp32 6.68x)."""
    from types import SimpleNamespace

    from model_owner_server.jobs.resources import STAGE_FACTORS, calibration_activation_bytes

    smollm2 = SimpleNamespace(num_hidden_layers=30, hidden_size=576, vocab_size=49152)
    mib = 1024**2
    for dtype_bytes, m_mib, measured in ((2, 257, 10.09), (4, 513, 6.68)):
        planned = m_mib * mib * STAGE_FACTORS["emulator"] + calibration_activation_bytes(smollm2, 4 * 128, True)
        assert planned >= measured * m_mib * mib, (dtype_bytes, planned / (m_mib * mib))
    off = calibration_activation_bytes(smollm2, 512, False)
    assert 0 < off < calibration_activation_bytes(smollm2, 512, True)
    gib = 1024**3
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (50 * gib, 80 * gib))
    check_fits(7_000_000_000, torch.bfloat16, "emulator", "cuda:0")  # 45.6 GiB: fits
    with pytest.raises(DoesNotFit, match=r"x 3.5 \+ 8.0 GiB of activations"):
        check_fits(7_000_000_000, torch.bfloat16, "emulator", "cuda:0", activation_bytes=8 * gib)
