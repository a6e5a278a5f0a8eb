"""One job per GPU, for `serve`'s embedded worker as for the `worker` command: several job threads on one GPU
would each hold M and each pass the fit check as if alone. No GPU needed: torch's CUDA probes are faked."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient
from server_helpers import fast_settings
from typer.testing import CliRunner

from model_owner_server.jobs.resources import OneJobPerGPU, check_one_job_per_gpu
from model_owner_server.main import check_embedded_worker, create_app


@pytest.fixture
def fake_gpu(monkeypatch):
    """This machine "has" one GPU as far as device resolution can tell (nothing is allocated on it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)


def _settings(tmp_path, db_url, **overrides):
    values = dict(device="cuda", queue_url=None, embedded_worker=True, worker_threads=2) | overrides
    return fast_settings(tmp_path / "data", db_url, **values)


def test_serve_refuses_an_embedded_worker_of_several_threads_on_a_gpu(tmp_path, new_database_url, fake_gpu):
    settings = _settings(tmp_path, new_database_url())
    with pytest.raises(OneJobPerGPU) as err, TestClient(create_app(settings)):
        pass
    msg = str(err.value)
    assert "SCALEOT_WORKER_THREADS=2" in msg and "SCALEOT_DEVICE=cuda" in msg and "2 jobs on one GPU" in msg
    assert "SCALEOT_WORKER_THREADS=1" in msg and "SCALEOT_EMBEDDED_WORKER=false" in msg and "worker --device" in msg
    assert not (tmp_path / "data").exists()  # refused first: no data dir, no migrations, no consumer


@pytest.mark.parametrize(
    "overrides",
    [
        {"worker_threads": 1},  # one job at a time on the GPU
        {"device": "cpu"},  # CPU: any number of job threads
        {"embedded_worker": False},  # no worker in this process (separate `worker --device cuda:N` processes)
        {"queue_url": "immediate"},  # jobs run inline, no consumer threads
    ],
)
def test_what_serve_accepts(tmp_path, new_database_url, fake_gpu, overrides):
    check_embedded_worker(_settings(tmp_path, new_database_url(), **overrides))


def test_serve_command_names_the_settings_and_starts_nothing(tmp_path, new_database_url, fake_gpu, monkeypatch):
    import uvicorn

    from model_owner_server.cli import app

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("the server started"))
    monkeypatch.setenv("SCALEOT_DATA_DIR", str(tmp_path / "serve-data"))
    monkeypatch.setenv("SCALEOT_DATABASE_URL", new_database_url())
    monkeypatch.setenv("SCALEOT_DEVICE", "cuda")
    monkeypatch.setenv("SCALEOT_WORKER_THREADS", "3")
    out = CliRunner().invoke(app, ["serve"])
    assert out.exit_code == 2, out.output
    assert "SCALEOT_WORKER_THREADS=3" in out.output and "SCALEOT_DEVICE=cuda" in out.output, out.output
    assert not (tmp_path / "serve-data").exists()


def test_the_worker_command_keeps_the_same_rule(tmp_path, new_database_url, fake_gpu, monkeypatch):
    from model_owner_server.cli import app

    monkeypatch.setenv("SCALEOT_DATA_DIR", str(tmp_path / "worker-data"))
    monkeypatch.setenv("SCALEOT_DATABASE_URL", new_database_url())
    out = CliRunner().invoke(app, ["worker", "--device", "cuda", "--threads", "2"])
    assert out.exit_code == 2, out.output
    assert "--threads 2 would run 2 jobs on one GPU" in out.output and "worker --device cuda:0" in out.output


def test_the_rule_itself():
    check_one_job_per_gpu("cpu", 4, threads_setting="--threads 4", instead="-")
    check_one_job_per_gpu("cuda:1", 1, threads_setting="--threads 1", instead="-")
    with pytest.raises(OneJobPerGPU, match=r"^--threads 2 would run 2 jobs on one GPU \(cuda:1\) .*; do this$"):
        check_one_job_per_gpu(torch.device("cuda:1"), 2, threads_setting="--threads 2", instead="do this")
