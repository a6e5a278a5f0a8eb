"""The model owner's emulator policy (model_owner_server/policy.py): a data owner cannot get M through an
emulator request, whatever alpha/beta it asks for, and gets only emulators inside the model's policy.

These tests run the server's *default* policy (the rest of the suite runs a permissive one for tiny models,
tests/conftest.py). The tiny model has 8 layers, so with N_a = 2 there are 6 other layers and any alpha below
0.5 / 6 replaces none of them: the plan would keep all of M."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from server_helpers import auth, fast_settings
from typer.testing import CliRunner

from model_owner_server import crud
from model_owner_server.main import create_app
from model_owner_server.models import AuditEvent, RegisteredModel
from shared.schemas import EmulatorPolicy


@dataclass
class PolicyWorld:
    client: TestClient
    keys: dict[str, str]
    model_id: str
    data_dir: Path
    db_url: str

    def post_emulator(self, who: str, **body):
        body = {"model_id": self.model_id, "n_adapter": 2, "alpha": 1.0, "beta": 0.0, **body}
        return self.client.post("/v1/emulators", headers=auth(self.keys[who]), json=body)

    def set_policy(self, **body):
        r = self.client.put(f"/v1/models/{self.model_id}/emulator-policy", headers=auth(self.keys["admin"]), json=body)
        assert r.status_code == 200, r.text
        return r.json()

    def counts(self) -> dict[str, int]:
        with self.client.app.state.sessions() as s:
            return crud.row_counts(s)

    def emulator_files(self) -> list[str]:
        return sorted(p.name for p in (self.data_dir / "emulators").glob("*")) if self.data_dir.exists() else []

    def download(self, who: str, emulator_id: str, what: str = "file"):
        return self.client.get(f"/v1/emulators/{emulator_id}/{what}", headers=auth(self.keys[who]))


@pytest.fixture(scope="module")
def pw(tmp_path_factory, new_database_url, files) -> Iterator[PolicyWorld]:
    from scaleot_samples.tiny import save_tiny_model_dir

    model_dir = save_tiny_model_dir(tmp_path_factory.mktemp("m") / "tiny8", "llama", n_layers=8, hidden=32)
    data_dir = tmp_path_factory.mktemp("data")
    db_url = new_database_url()
    # The server's default policy, exactly as shipped (not the tests' permissive one from the environment).
    settings = fast_settings(data_dir, db_url, emulator_policy=EmulatorPolicy(), audit_steps=2)
    with TestClient(create_app(settings)) as client:
        keys = {}
        with client.app.state.sessions() as s:
            for name, role in (("admin", "admin"), ("alice", "data-owner"), ("mallory", "data-owner")):
                keys[name] = crud.create_org(s, name, role)[1]
            s.commit()
        h = auth(keys["admin"])
        r = client.post("/v1/models", headers=h, json={"name": "tiny8", "path": str(model_dir)})
        model_id = r.json()["id"]
        assert client.post(f"/v1/models/{model_id}/grants", headers=h, json={"org": "alice"}).status_code == 201
        r = client.post(
            f"/v1/models/{model_id}/importance", headers=h, json={"steps": 2, "corpus": str(files["corpus"])}
        )
        assert client.get(f"/v1/jobs/{r.json()['id']}", headers=h).json()["status"] == "succeeded"
        yield PolicyWorld(client, keys, model_id, data_dir.resolve(), db_url)


def test_the_default_policy_is_the_shipped_one(pw):
    r = pw.client.get(f"/v1/models/{pw.model_id}/emulator-policy", headers=auth(pw.keys["alice"]))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["source"] == "server default"
    assert body["policy"] == EmulatorPolicy().model_dump()
    assert body["policy"]["require_audit"] is True and body["policy"]["max_kept_share"] < 1.0


@pytest.mark.parametrize(
    "request_body, reason",
    [
        ({"alpha": 0.0, "beta": 0.0}, "alpha 0.0 is below the minimum"),  # the whole model: the worst case
        ({"alpha": 0.0, "beta": 0.0, "dtype": "float32"}, "keeps 8 of M's 8 layers"),
        ({"alpha": 0.3, "n_adapter": 2}, "alpha 0.3 is below"),
        ({"n_adapter": 9}, "n_adapter 9 is above the maximum 8"),
    ],
)
def test_a_data_owner_asking_for_m_is_refused_and_nothing_is_built(pw, request_body, reason):
    before, files_before = pw.counts(), pw.emulator_files()
    r = pw.post_emulator("alice", **request_body)
    assert r.status_code in (403, 422), r.text
    if r.status_code == 403:
        err = r.json()["error"]
        assert err["code"] == "policy_violation" and reason in err["message"], err
        assert f"GET /v1/models/{pw.model_id}/emulator-policy" in err["message"]
    after = pw.counts()
    after.pop("audit_log", None), before.pop("audit_log", None)  # the refusal itself is audit-logged
    assert after == before and pw.emulator_files() == files_before


def test_an_alpha_that_rounds_to_no_replacement_is_refused_by_the_plan_not_the_number(pw):
    # min_alpha 0 lets any alpha through as a number; 0.05 of 6 layers rounds to 0 replaced: the plan is M.
    pw.set_policy(min_alpha=0.0)
    try:
        before = pw.counts()
        r = pw.post_emulator("alice", alpha=0.05)
        assert r.status_code == 403, r.text
        assert "keeps 8 of M's 8 layers as originals (100%)" in r.json()["error"]["message"]
        assert pw.counts()["emulators"] == before["emulators"]
    finally:
        pw.set_policy(min_alpha=0.5)


def test_dtype_and_builders_bounds(pw):
    pw.set_policy(allowed_dtypes=["bfloat16"])
    r = pw.post_emulator("alice", dtype="float32")
    assert r.status_code == 403 and "dtype float32 is not allowed (allowed: bfloat16)" in r.text
    pw.set_policy(allowed_dtypes=["float32", "bfloat16", "float16"], builders="admins")
    r = pw.post_emulator("alice")
    assert r.status_code == 403 and "only the model owner's admins build" in r.text
    pw.set_policy(builders="granted")


def test_an_emulator_built_by_an_admin_outside_the_policy_is_not_issued_to_data_owners(pw):
    r = pw.post_emulator("admin", alpha=0.0, beta=0.0)  # the model owner may build anything for itself
    assert r.status_code in (200, 202), r.text
    emu = r.json()["emulator"]
    assert emu["status"] == "ready"
    assert emu["policy_check"]["issuable"] is False and emu["policy_check"]["kept_share"] == 1.0
    for what in ("file", "signature"):
        r = pw.download("alice", emu["id"], what)
        assert r.status_code == 403 and r.json()["error"]["code"] == "policy_violation", r.text
        assert "keeps 8 of M's 8 layers" in r.json()["error"]["message"]
    assert pw.download("admin", emu["id"]).status_code == 200
    # Asking for the same parameters does not hand the data owner the existing emulator either.
    r = pw.post_emulator("alice", alpha=0.0, beta=0.0)
    assert r.status_code == 403, r.text
    # HEAD (the client's resume probe) is refused the same way.
    r = pw.client.head(f"/v1/emulators/{emu['id']}/file", headers=auth(pw.keys["alice"]))
    assert r.status_code == 403


def test_builds_are_audited_and_only_audited_emulators_with_a_gap_are_issued(pw):
    # Tiny random weights have no real gap: accept any measured gap first, then demand one they cannot have.
    pw.set_policy(no_min_residual_gap=True)
    r = pw.post_emulator("alice", alpha=1.0)
    assert r.status_code in (200, 202), r.text
    emu = r.json()["emulator"]
    assert emu["status"] == "ready"
    assert isinstance(emu["privacy"]["residual_gap_nats"], float), emu  # the build job ran the audit
    assert emu["privacy"]["attack"] == "heal-lora"
    assert emu["policy_check"] == {"issuable": True, "reasons": [], "kept_share": 0.25}
    assert pw.download("alice", emu["id"]).status_code == 200
    assert pw.download("alice", emu["id"], "signature").status_code == 200

    gap = emu["privacy"]["residual_gap_nats"]
    pw.set_policy(min_residual_gap_nats=round(gap + 5, 3))  # tightening applies to emulators built before
    r = pw.download("alice", emu["id"])
    assert r.status_code == 403, r.text
    assert f"residual gap of {gap:.3f} nats, below the policy's minimum" in r.json()["error"]["message"]
    got = pw.client.get(f"/v1/emulators/{emu['id']}", headers=auth(pw.keys["alice"])).json()
    assert got["policy_check"]["issuable"] is False and "residual gap" in got["policy_check"]["reasons"][0]
    pw.set_policy(no_min_residual_gap=True)
    assert pw.download("alice", emu["id"]).status_code == 200


def test_an_unaudited_emulator_is_withheld_until_the_model_owner_audits_it(pw):
    pw.set_policy(require_audit=False, no_min_residual_gap=True)
    r = pw.post_emulator("alice", alpha=1.0, beta=0.5)
    emu = r.json()["emulator"]
    assert emu["status"] == "ready" and emu["privacy"] is None  # no audit when the policy does not ask for one
    assert pw.download("alice", emu["id"]).status_code == 200
    pw.set_policy(require_audit=True)
    r = pw.download("alice", emu["id"])
    assert r.status_code == 403 and f"modelowner-server audit-emulator {emu['id']}" in r.text
    r = pw.client.post(f"/v1/emulators/{emu['id']}/privacy-audit", headers=auth(pw.keys["admin"]), json={"steps": 2})
    assert r.status_code == 202, r.text
    assert pw.download("alice", emu["id"]).status_code == 200


def test_policy_endpoints_authz_and_validation(pw):
    url = f"/v1/models/{pw.model_id}/emulator-policy"
    assert pw.client.get(url, headers=auth(pw.keys["mallory"])).status_code == 404  # not granted
    assert pw.client.get(url).status_code == 401
    r = pw.client.put(url, headers=auth(pw.keys["alice"]), json={"min_alpha": 0.0})
    assert r.status_code == 403
    before = pw.client.get(url, headers=auth(pw.keys["admin"])).json()
    for bad in (
        {"min_alpha": 2},
        {"max_kept_share": 0},
        {"allowed_dtypes": []},
        {"allowed_dtypes": ["int8"]},
        {"builders": "everyone"},
        {"typo": 1},
    ):
        r = pw.client.put(url, headers=auth(pw.keys["admin"]), json=bad)
        assert r.status_code == 422, (bad, r.text)
    assert pw.client.get(url, headers=auth(pw.keys["admin"])).json() == before
    r = pw.client.delete(url, headers=auth(pw.keys["alice"]))
    assert r.status_code == 403
    r = pw.client.delete(url, headers=auth(pw.keys["admin"]))
    assert r.status_code == 200 and r.json()["source"] == "server default"
    with pw.client.app.state.sessions() as s:
        assert s.get(RegisteredModel, pw.model_id).emulator_policy is None
        actions = {e.action for e in s.query(AuditEvent).all()}
    assert {"set_emulator_policy", "reset_emulator_policy", "emulator_refused"} <= actions


def test_set_policy_cli(pw, monkeypatch):
    from model_owner_server.cli import app as cli_app

    monkeypatch.setenv("SCALEOT_DATA_DIR", str(pw.data_dir))
    monkeypatch.setenv("SCALEOT_DATABASE_URL", pw.db_url)
    monkeypatch.setenv("SCALEOT_EMULATOR_POLICY", EmulatorPolicy().model_dump_json())
    runner = CliRunner()
    r = runner.invoke(cli_app, ["set-policy", "tiny8", "--min-alpha", "0.75", "--dtypes", "bfloat16"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["source"] == "model" and out["policy"]["min_alpha"] == 0.75
    assert out["policy"]["allowed_dtypes"] == ["bfloat16"]
    r = runner.invoke(cli_app, ["set-policy", "tiny8", "--max-kept-share", "1.5"])
    assert r.exit_code != 0 and "max_kept_share" in r.output
    got = pw.client.get(f"/v1/models/{pw.model_id}/emulator-policy", headers=auth(pw.keys["admin"])).json()
    assert got["policy"]["min_alpha"] == 0.75  # the refused change changed nothing
    r = runner.invoke(cli_app, ["set-policy", "tiny8", "--reset"])
    assert r.exit_code == 0 and json.loads(r.output)["source"] == "server default", r.output
    r = runner.invoke(cli_app, ["set-policy", "no-such-model"])
    assert r.exit_code != 0 and "not found" in r.output


def _console_sign_in(client: TestClient, key: str) -> None:
    client.cookies.clear()
    token = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/console/login").text).group(1)
    r = client.post("/console/login", data={"api_key": key, "csrf_token": token}, follow_redirects=False)
    assert r.status_code in (302, 303), r.text


def test_the_console_form_is_bound_by_the_same_policy(pw):
    client = pw.client
    try:
        _console_sign_in(client, pw.keys["alice"])
        page = client.get("/console/emulators").text
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
        before, files_before = pw.counts(), pw.emulator_files()
        form = {"model_id": pw.model_id, "n_adapter": "2", "alpha": "0", "beta": "0", "csrf_token": csrf}
        r = client.post("/console/emulators", data=form, follow_redirects=False)
        assert r.status_code == 422, r.text
        assert "refused by the model owner&#39;s emulator policy" in r.text and "alpha 0.0 is below" in r.text
        after = pw.counts()
        after.pop("audit_log", None), before.pop("audit_log", None)
        assert after == before and pw.emulator_files() == files_before
        # The emulator page says whether data owners may have an emulator, and why not.
        emu_id = pw.post_emulator("admin", alpha=0.0, beta=0.0).json()["emulator"]["id"]
        page = client.get(f"/console/emulators/{emu_id}").text
        assert "Withheld from data owners by the model" in page and "keeps 8 of M&#39;s 8 layers" in page
    finally:
        client.cookies.clear()
