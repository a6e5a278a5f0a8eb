"""The privacy audit as a product feature: POST /v1/emulators/{id}/privacy-audit (admins only) runs a
recovery attack as a job and stores the figure with the emulator; `modelowner-server audit-emulator` does
the same from the command line. Bad requests change nothing."""

from __future__ import annotations

import json
import re

import pytest
from server_helpers import auth
from typer.testing import CliRunner

from model_owner_server import crud
from model_owner_server.cli import app as cli_app
from model_owner_server.models import AuditEvent


def _audit(world, who: str, emulator_id: str | None = None, **body):
    return world.client.post(
        f"/v1/emulators/{emulator_id or world.emulator['id']}/privacy-audit", headers=auth(world.keys[who]), json=body
    )


def _counts(world) -> dict[str, int]:
    with world.sessions() as s:
        return crud.row_counts(s)


@pytest.mark.parametrize("who, status", [("alice", 403), ("mallory", 403), ("none", 401)])
def test_only_admins_can_audit(world, who, status):
    before = _counts(world)
    r = _audit(world, who, steps=2)
    assert r.status_code == status, r.text
    assert _counts(world) == before


@pytest.mark.parametrize(
    "emulator_id, body, status, code",
    [
        ("emu_doesnotexist", {"steps": 2}, 404, "not_found"),
        (None, {"steps": 2, "corpus": "/nonexistent/public.txt"}, 422, "no_corpus"),
        (None, {"steps": 2, "attack": "steal-weights"}, 422, "validation_error"),
        (None, {"steps": 0}, 422, "validation_error"),
        (None, {"steps": 5}, 422, "validation_error"),  # over SCALEOT_AUDIT_MAX_STEPS (4 in these tests)
    ],
)
def test_bad_requests_are_refused_and_change_nothing(world, emulator_id, body, status, code):
    before = _counts(world)
    r = _audit(world, "admin", emulator_id, **body)
    assert r.status_code == status and r.json()["error"]["code"] == code, r.text
    assert _counts(world) == before


def test_audit_job_stores_the_residual_gap_with_the_emulator(world, files):
    corpus = files["root"] / "public.txt"
    corpus.write_text("def f(x):\n    return x + 1\n" * 400)  # public text unlike the stage-1 corpus
    r = _audit(world, "admin", attack="heal-lora", steps=3, corpus=str(corpus))
    assert r.status_code == 202, r.text
    job = world.client.get(f"/v1/jobs/{r.json()['id']}", headers=auth(world.keys["admin"])).json()
    assert job["status"] == "succeeded" and job["kind"] == "privacy_audit", job
    privacy = job["result"]["privacy"]
    emu = world.client.get(f"/v1/emulators/{world.emulator['id']}", headers=auth(world.keys["admin"])).json()
    assert emu["privacy"] == privacy
    assert privacy["attack"] == "heal-lora" and privacy["steps"] == 3 and privacy["corpus"] == "public.txt"
    assert privacy["tokens"] == 3 * world.settings.importance_batch_size * world.settings.importance_seq_len
    assert privacy["residual_gap_nats"] == pytest.approx(
        privacy["attacker_loss"] - privacy["full_model_loss"], abs=1e-3
    )
    assert privacy["gap_before_nats"] == pytest.approx(privacy["emulator_loss"] - privacy["full_model_loss"], abs=1e-3)
    assert privacy["attacker_loss"] < privacy["emulator_loss"]  # the attack learned something from its text
    with world.sessions() as s:
        events = s.query(AuditEvent).filter_by(action="privacy_audit", target_id=world.emulator["id"]).all()
        assert events and events[-1].org_id == world.org_ids["admin"]

    # the console's emulator page shows the figure
    client = world.client
    client.cookies.clear()
    token = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/console/login").text).group(1)
    client.post("/console/login", data={"api_key": world.keys["admin"], "csrf_token": token})
    page = client.get(f"/console/emulators/{world.emulator['id']}").text
    client.cookies.clear()
    assert "Privacy audit: heal-lora, 3 steps on public.txt" in page and "residual gap to M" in page
    assert f"{privacy['residual_gap_nats']:.4g}" in page


def test_cli_audit_emulator_runs_the_same_audit(world):
    env = {
        "SCALEOT_DATA_DIR": str(world.settings.data_dir),
        "SCALEOT_DATABASE_URL": world.settings.database_url,
        "SCALEOT_DEVICE": "cpu",
        "SCALEOT_IMPORTANCE_SEQ_LEN": "32",
        "SCALEOT_IMPORTANCE_BATCH_SIZE": "2",
        "SCALEOT_AUDIT_VAL_BLOCKS": "4",
    }
    runner = CliRunner()
    r = runner.invoke(cli_app, ["audit-emulator", world.emulator["id"], "--steps", "2", "--seed", "1"], env=env)
    assert r.exit_code == 0, r.output
    record = json.loads(r.stdout[r.stdout.index("{") :])
    assert record["corpus"] == "pydoc_data.topics" and record["steps"] == 2 and record["val_blocks"] == 4
    emu = world.client.get(f"/v1/emulators/{world.emulator['id']}", headers=auth(world.keys["admin"])).json()
    assert emu["privacy"] == record

    bad = runner.invoke(cli_app, ["audit-emulator", "emu_nope"], env=env)
    assert bad.exit_code == 2 and "no emulator 'emu_nope'" in bad.output
    bad = runner.invoke(cli_app, ["audit-emulator", world.emulator["id"], "--attack", "x"], env=env)
    assert bad.exit_code == 2 and "unknown attack" in bad.output
