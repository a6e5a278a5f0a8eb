"""SCALEOT_EMULATOR_MIX_HEADS (issue 21: stand-ins with token mixing) reaches the emulator job: the served file's
plan carries the mixers, and the data owner rebuilds the emulator from that file alone."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from server_helpers import fast_settings
from test_calibration_grad_setting import _model_with_stage1

from model_owner_server.core.config import Settings
from model_owner_server.main import create_app
from shared.emulator_file import load_emulator
from shared.layer_plan import Role


@pytest.mark.db
def test_mix_heads_reach_the_served_emulator(tmp_path, new_database_url, files):
    settings = fast_settings(
        tmp_path / "data",
        new_database_url(),
        emulator_calibration_steps=2,
        emulator_fidelity_blocks=2,
        emulator_mix_heads=2,
    )
    with TestClient(create_app(settings)) as client:
        h, model_id = _model_with_stage1(client, files)
        r = client.post(
            "/v1/emulators", headers=h, json={"model_id": model_id, "n_adapter": 2, "alpha": 0.5, "beta": 0.0}
        )
        assert r.status_code in (200, 202), r.text
        emu_id = r.json()["emulator"]["id"]
        assert client.get(f"/v1/emulators/{emu_id}", headers=h).json()["status"] == "ready"
        file = client.get(f"/v1/emulators/{emu_id}/file", headers=h)
        assert file.status_code == 200, file.text
    path = tmp_path / "emu.safetensors"
    path.write_bytes(file.content)
    loaded = load_emulator(path)
    assert loaded.plan.mix_heads == 2
    standins = [loaded.model.get_submodule(n) for n, m in loaded.model.named_modules() if n.endswith("harmonizer")]
    assert len(standins) == len(loaded.plan.layers_with(Role.HARMONIZER)) > 0
    assert all(s.mix is not None and s.mix.heads == 2 for s in standins)


def test_a_negative_mix_heads_is_refused(tmp_path):
    with pytest.raises(ValidationError, match="emulator_mix_heads"):
        Settings(data_dir=tmp_path, emulator_mix_heads=-1)
