"""SCALEOT_EMULATOR_CALIBRATION_GRAD_WEIGHT / _GRAD_MATCH reach the emulator job's calibration (the gradient term of
issue 21, calibrate.py), are recorded with the emulator, and a value outside the allowed set is refused at startup."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from server_helpers import auth, fast_settings

import model_owner_server.jobs.tasks.emulator as emulator_task
from model_owner_server import crud
from model_owner_server.core.config import Settings
from model_owner_server.main import create_app

REAL_MAKE = emulator_task.make_emulator


def _model_with_stage1(client: TestClient, files) -> tuple[dict, str]:
    """An admin's headers and a registered model whose stage 1 has run (what POST /v1/emulators needs)."""
    with client.app.state.sessions() as s:
        _, key = crud.create_org(s, "owner", "admin")
        s.commit()
    h = auth(key)
    model_id = client.post("/v1/models", headers=h, json={"name": "m", "path": str(files["model"])}).json()["id"]
    r = client.post(
        f"/v1/models/{model_id}/importance",
        headers=h,
        json={"steps": 4, "corpus": str(files["corpus"]), "rl_interval": 2, "seed": 0},
    )
    assert client.get(f"/v1/jobs/{r.json()['id']}", headers=h).json()["status"] == "succeeded"
    return h, model_id


@pytest.mark.db
def test_the_gradient_term_settings_reach_the_build(tmp_path, new_database_url, files, monkeypatch):
    seen = []

    def spy_make(*args, **kwargs):
        seen.append(kwargs["calibration"])
        return REAL_MAKE(*args, **kwargs)

    monkeypatch.setattr(emulator_task, "make_emulator", spy_make)
    settings = fast_settings(
        tmp_path / "data",
        new_database_url(),
        emulator_calibration_steps=2,
        emulator_fidelity_blocks=2,
        emulator_calibration_grad_weight=10.0,
        emulator_calibration_grad_match="adapters",
    )
    with TestClient(create_app(settings)) as client:
        h, model_id = _model_with_stage1(client, files)
        r = client.post(
            "/v1/emulators", headers=h, json={"model_id": model_id, "n_adapter": 2, "alpha": 0.5, "beta": 0.0}
        )
        assert r.status_code in (200, 202), r.text
        emu = client.get(f"/v1/emulators/{r.json()['emulator']['id']}", headers=h).json()
        assert emu["status"] == "ready", emu
    (cal,) = seen
    assert (cal.steps, cal.grad_weight, cal.grad_match) == (2, 10.0, "adapters")
    recorded = emu["build_info"]["calibration"]  # how the emulator was calibrated, in the owner's record
    assert recorded["config"]["grad_weight"] == 10.0 and recorded["config"]["grad_match"] == "adapters"
    assert recorded["final_grad_mismatch"] is not None


def test_an_unknown_grad_match_is_refused(tmp_path):
    with pytest.raises(ValidationError, match="emulator_calibration_grad_match"):
        Settings(data_dir=tmp_path, emulator_calibration_grad_match="everything")


@pytest.mark.db
@pytest.mark.parametrize("grad_weight", [10.0, 0.0])
def test_on_a_gpu_the_emulator_job_counts_calibrations_activations(
    tmp_path, new_database_url, files, monkeypatch, grad_weight
):
    """The emulator job's fit check gets calibration's activations for the model's config and the service's batch
    (more with the gradient term)."""
    from transformers import AutoConfig

    from model_owner_server.jobs.context import JobFailure
    from model_owner_server.jobs.resources import calibration_activation_bytes
    from model_owner_server.jobs.runner import JobRunner

    settings = fast_settings(
        tmp_path / "data",
        new_database_url(),
        emulator_calibration_steps=2,
        emulator_calibration_grad_weight=grad_weight,
    )
    seen: list[tuple[str, int]] = []
    real_full_model = JobRunner.full_model

    def spy(self, model_row, ctx=None, kind="", activation_bytes=0):
        seen.append((kind, activation_bytes))
        if kind == "emulator":
            raise JobFailure("stopped by the test before loading M")
        return real_full_model(self, model_row, ctx, kind, activation_bytes)

    monkeypatch.setattr(JobRunner, "full_model", spy)
    with TestClient(create_app(settings)) as client:
        h, model_id = _model_with_stage1(client, files)
        monkeypatch.setattr(JobRunner, "device", property(lambda self: "cuda:0"))
        body = {"model_id": model_id, "n_adapter": 2, "alpha": 0.5, "beta": 0.0}
        emu = client.post("/v1/emulators", headers=h, json=body).json()["emulator"]
        assert client.get(f"/v1/emulators/{emu['id']}", headers=h).json()["status"] == "failed"
    config = AutoConfig.from_pretrained(files["model"])
    tokens = settings.importance_batch_size * settings.importance_seq_len
    assert seen == [("emulator", calibration_activation_bytes(config, tokens, grad_weight > 0))]
