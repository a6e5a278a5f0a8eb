"""SCALEOT_GRADIENT_CHECKPOINTING reaches the jobs: stage 1 runs M with checkpointed layers and the emulator build
calibrates with them, and both give what they give without it (memory, not the result)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from server_helpers import auth, fast_settings

import model_owner_server.jobs.tasks.emulator as emulator_task
import model_owner_server.jobs.tasks.importance as importance_task
from model_owner_server import crud
from model_owner_server.main import create_app
from shared.architectures import decoder_layers

REAL_IMPORTANCE, REAL_MAKE = importance_task.estimate_importance, emulator_task.make_emulator


def _run(tmp_path, db_url, files, monkeypatch, enabled: bool) -> tuple[dict, dict, list[bool], list[bool]]:
    in_stage1: list[bool] = []
    in_build: list[bool] = []

    def spy_importance(model, *args, **kwargs):
        in_stage1.append(all("forward" in layer.__dict__ for layer in decoder_layers(model)))
        return REAL_IMPORTANCE(model, *args, **kwargs)

    def spy_make(*args, **kwargs):
        in_build.append(kwargs["gradient_checkpointing"])
        return REAL_MAKE(*args, **kwargs)

    monkeypatch.setattr(importance_task, "estimate_importance", spy_importance)
    monkeypatch.setattr(emulator_task, "make_emulator", spy_make)
    settings = fast_settings(
        tmp_path / f"data-{enabled}",
        db_url,
        emulator_calibration_steps=2,
        emulator_fidelity_blocks=2,
        gradient_checkpointing=enabled,
    )
    with TestClient(create_app(settings)) as client:
        with client.app.state.sessions() as s:
            _, key = crud.create_org(s, "owner", "admin")
            s.commit()
        h = auth(key)
        r = client.post("/v1/models", headers=h, json={"name": "m", "path": str(files["model"])})
        assert r.status_code == 201, r.text
        model_id = r.json()["id"]
        r = client.post(
            f"/v1/models/{model_id}/importance",
            headers=h,
            json={"steps": 4, "corpus": str(files["corpus"]), "rl_interval": 2, "seed": 0},
        )
        job = client.get(f"/v1/jobs/{r.json()['id']}", headers=h).json()
        assert job["status"] == "succeeded", job
        r = client.post(
            "/v1/emulators", headers=h, json={"model_id": model_id, "n_adapter": 2, "alpha": 0.5, "beta": 0.0}
        )
        assert r.status_code in (200, 202), r.text
        emu = client.get(f"/v1/emulators/{r.json()['emulator']['id']}", headers=h).json()
        assert emu["status"] == "ready", emu
        return job["result"], emu, in_stage1, in_build


@pytest.mark.db
def test_the_setting_reaches_stage1_and_the_build_and_changes_no_result(tmp_path, new_database_url, files, monkeypatch):
    plain, plain_emu, s1_off, build_off = _run(tmp_path, new_database_url(), files, monkeypatch, False)
    ckpt, ckpt_emu, s1_on, build_on = _run(tmp_path, new_database_url(), files, monkeypatch, True)
    assert (s1_off, build_off, s1_on, build_on) == ([False], [False], [True], [True])
    assert ckpt["ranking"] == plain["ranking"]
    assert ckpt["scores"] == pytest.approx(plain["scores"], rel=1e-4, abs=1e-5)
    assert ckpt_emu["plan"] == plain_emu["plan"]
