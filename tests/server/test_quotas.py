"""Quotas, rate limits, fair job scheduling and pagination (issue 20, finding 4; model_owner_server/api/quotas.py).

Every limit answers 429 with an integer `Retry-After` and `{"error": {"code": "rate_limited" | "quota_exceeded",
"message"}}` naming the limit's setting, and changes nothing. The request-rate tests use their own small apps
(the buckets are per app); the hourly quotas use the shared `world` with its settings lowered for one test.
"""

from __future__ import annotations

import io
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from server_helpers import adapter_bytes, auth, fast_settings
from sqlalchemy import func, select

from model_owner_server import crud
from model_owner_server.core.security import issue_api_key
from model_owner_server.jobs.runner import HANDLERS, JobRunner
from model_owner_server.main import create_app
from model_owner_server.models import (
    AdapterRow,
    EmulatorRow,
    ImportanceRun,
    JobRow,
    RegisteredModel,
    TokenCharge,
    utcnow,
)


def _limited(r, code: str, setting: str) -> dict:
    """Assert `r` is a clean 429 of `code` naming `setting`, with an integer Retry-After; return the error."""
    assert r.status_code == 429, r.text
    err = r.json()["error"]
    assert err["code"] == code, err
    assert setting in err["message"] and "retry in" in err["message"], err["message"]
    assert r.headers["Retry-After"].isdigit() and int(r.headers["Retry-After"]) >= 1
    return err


@pytest.fixture
def small_app(tmp_path, new_database_url):
    """An app of its own with orgs admin / alice (two keys) / bob; `make(**settings)` starts it."""
    clients: list[TestClient] = []

    def make(**overrides):
        settings = fast_settings(tmp_path / f"data{len(clients)}", new_database_url(), **overrides)
        client = TestClient(create_app(settings))
        client.__enter__()
        clients.append(client)
        keys = {}
        with client.app.state.sessions() as s:
            for name, role in (("admin", "admin"), ("alice", "data-owner"), ("bob", "data-owner")):
                org, keys[name] = crud.create_org(s, name, role)
                if name == "alice":
                    keys["alice2"] = issue_api_key(s, org)
            s.commit()
        return client, keys

    yield make
    for c in clients:
        c.__exit__(None, None, None)


# ---------------------------------------------------------------- request rate


def test_per_key_rate_limit_answers_429_and_spares_other_keys(small_app):
    # 1 request a minute, a bucket of 3: the 4th request in a row is over, whatever the machine's speed.
    client, keys = small_app(rate_limit_per_key=1, rate_limit_burst_seconds=180)
    for _ in range(3):
        assert client.get("/v1/models", headers=auth(keys["alice"])).status_code == 200
    r = client.get("/v1/models", headers=auth(keys["alice"]))
    err = _limited(r, "rate_limited", "SCALEOT_RATE_LIMIT_PER_KEY")
    assert "per minute" in err["message"]
    assert 50 <= int(r.headers["Retry-After"]) <= 60  # one token refills in 60 s
    # Other keys have their own buckets; admins are exempt by default.
    assert client.get("/v1/models", headers=auth(keys["bob"])).status_code == 200
    assert client.get("/v1/models", headers=auth(keys["alice2"])).status_code == 200
    for _ in range(10):
        assert client.get("/v1/models", headers=auth(keys["admin"])).status_code == 200
    # The key's bucket is checked before the database: a flood of a key does not reach the key lookup.
    for _ in range(3):
        client.get("/v1/models", headers=auth("sot_not-a-key"))
    _limited(client.get("/v1/models", headers=auth("sot_not-a-key")), "rate_limited", "SCALEOT_RATE_LIMIT_PER_KEY")


def test_per_org_rate_limit_spans_its_keys_and_admins_can_be_limited(small_app):
    client, keys = small_app(rate_limit_per_key=0, rate_limit_per_org=1, rate_limit_burst_seconds=180)
    for key in ("alice", "alice2", "alice"):
        assert client.get("/v1/jobs", headers=auth(keys[key])).status_code == 200
    _limited(client.get("/v1/jobs", headers=auth(keys["alice2"])), "rate_limited", "SCALEOT_RATE_LIMIT_PER_ORG")
    assert client.get("/v1/jobs", headers=auth(keys["bob"])).status_code == 200

    client, keys = small_app(rate_limit_per_key=1, rate_limit_burst_seconds=60, rate_limit_admins=True)
    assert client.get("/v1/models", headers=auth(keys["admin"])).status_code == 200
    _limited(client.get("/v1/models", headers=auth(keys["admin"])), "rate_limited", "SCALEOT_RATE_LIMIT_PER_KEY")


def test_openai_routes_are_rate_limited_in_openai_shape(small_app):
    client, keys = small_app(rate_limit_per_key=1, rate_limit_burst_seconds=60)
    assert client.get("/openai/v1/models", headers=auth(keys["alice"])).status_code == 200
    r = client.get("/openai/v1/models", headers=auth(keys["alice"]))
    err = _limited(r, "rate_limited", "SCALEOT_RATE_LIMIT_PER_KEY")
    assert err["type"]  # OpenAI's shape: message, type, param, code


# ---------------------------------------------------------------- hourly quotas (database rows)


def test_emulator_build_quota_refuses_a_new_build_and_changes_nothing(world, monkeypatch):
    # alice built the world's emulator less than an hour ago: with a quota of 1, a new build is refused.
    monkeypatch.setattr(world.settings, "quota_emulator_builds_per_hour", 1)
    h = auth(world.keys["alice"])
    with world.sessions() as s:
        before = crud.row_counts(s)
    r = world.client.post(
        "/v1/emulators", headers=h, json={"model_id": world.model_id, "n_adapter": 2, "alpha": 0.5, "beta": 0.25}
    )
    err = _limited(r, "quota_exceeded", "SCALEOT_QUOTA_EMULATOR_BUILDS_PER_HOUR")
    assert "per hour" in err["message"] and "UTC" in err["message"]
    assert 1 <= int(r.headers["Retry-After"]) <= 3600
    with world.sessions() as s:
        assert crud.row_counts(s) == before
    # Asking for the existing emulator again starts no build, so it is still answered.
    e = world.emulator
    r = world.client.post(
        "/v1/emulators",
        headers=h,
        json={"model_id": world.model_id, "n_adapter": e["n_adapter"], "alpha": e["alpha"], "beta": e["beta"]},
    )
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("setting", "env"),
    [
        ("quota_adapter_uploads_per_hour", "SCALEOT_QUOTA_ADAPTER_UPLOADS_PER_HOUR"),
        ("quota_evaluations_per_hour", "SCALEOT_QUOTA_EVALUATIONS_PER_HOUR"),
    ],
)
def test_upload_and_evaluation_quotas_refuse_before_the_body_is_stored(world, monkeypatch, setting, env):
    monkeypatch.setattr(world.settings, setting, 1)  # alice's world adapter (and its evaluation) used it up
    with world.sessions() as s:
        before = crud.row_counts(s)
    r = world.client.post(
        f"/v1/emulators/{world.emulator['id']}/adapters",
        headers=auth(world.keys["alice"]),
        files={"adapter": ("adapter.safetensors", io.BytesIO(adapter_bytes(world.adapter_tensors)))},
    )
    _limited(r, "quota_exceeded", env)
    with world.sessions() as s:
        assert crud.row_counts(s) == before
    assert not list(world.settings.tmp_dir.glob("*")) if world.settings.tmp_dir.exists() else True


def test_active_job_cap_refuses_new_jobs_until_one_finishes(world, monkeypatch):
    monkeypatch.setattr(world.settings, "max_active_jobs_per_org", 2)
    with world.sessions() as s:
        org = crud.find_org(s, "bob")
        queued = [crud.create_job(s, "fake", org, {}).id for _ in range(2)]
        s.commit()
    try:
        with world.sessions() as s:
            before = crud.row_counts(s)
        h = auth(world.keys["bob"])
        r = world.client.post(
            f"/v1/emulators/{world.emulator['id']}/adapters",
            headers=h,
            files={"adapter": ("adapter.safetensors", io.BytesIO(adapter_bytes(world.adapter_tensors)))},
        )
        err = _limited(r, "quota_exceeded", "SCALEOT_MAX_ACTIVE_JOBS_PER_ORG")
        assert "2 jobs queued or running" in err["message"]
        r = world.client.post(
            "/v1/emulators", headers=h, json={"model_id": world.model_id, "n_adapter": 2, "alpha": 0.5, "beta": 0.3}
        )
        _limited(r, "quota_exceeded", "SCALEOT_MAX_ACTIVE_JOBS_PER_ORG")
        with world.sessions() as s:
            assert crud.row_counts(s) == before
        # alice's own jobs are not bob's: the cap is per organization.
        assert world.client.get("/v1/jobs", headers=auth(world.keys["alice"])).status_code == 200
    finally:
        with world.sessions() as s:
            for job_id in queued:
                s.get(JobRow, job_id).status = "cancelled"
            s.commit()


def _charged(world, org: str) -> int:
    with world.sessions() as s:
        org_id = crud.find_org(s, org).id
        return s.execute(
            select(func.coalesce(func.sum(TokenCharge.tokens), 0)).where(TokenCharge.org_id == org_id)
        ).scalar_one()


def test_generated_tokens_are_charged_and_the_next_request_refused(world, monkeypatch):
    h = auth(world.keys["alice"])
    monkeypatch.setattr(world.settings, "quota_generated_tokens_per_hour", 10**6)
    start = _charged(world, "alice")
    r = world.client.post(
        f"/v1/adapters/{world.adapter_id}/generate", headers=h, json={"prompt": "the", "max_new_tokens": 4}
    )
    assert r.status_code == 200, r.text
    after_generate = _charged(world, "alice")
    assert 1 <= after_generate - start <= 4
    r = world.client.post(
        "/openai/v1/completions", headers=h, json={"model": world.adapter_id, "prompt": "the", "max_tokens": 3}
    )
    assert r.status_code == 200, r.text
    after_openai = _charged(world, "alice")
    assert after_openai - after_generate == r.json()["usage"]["completion_tokens"]
    body = {"model": world.adapter_id, "prompt": "the", "max_tokens": 3, "stream": True}
    with world.client.stream("POST", "/openai/v1/completions", headers=h, json=body) as r:
        assert r.status_code == 200
        assert "".join(r.iter_text()).rstrip().endswith("[DONE]")
    after_stream = _charged(world, "alice")
    assert 1 <= after_stream - after_openai <= 3

    # Over the quota: both generation routes refuse the next request; other organizations are unaffected.
    monkeypatch.setattr(world.settings, "quota_generated_tokens_per_hour", after_stream - 1)
    r = world.client.post(
        f"/v1/adapters/{world.adapter_id}/generate", headers=h, json={"prompt": "the", "max_new_tokens": 4}
    )
    err = _limited(r, "quota_exceeded", "SCALEOT_QUOTA_GENERATED_TOKENS_PER_HOUR")
    assert "tokens in the last hour" in err["message"]
    r = world.client.post("/openai/v1/completions", headers=h, json={"model": world.adapter_id, "prompt": "the"})
    assert r.json()["error"]["type"]  # OpenAI's error shape
    _limited(r, "quota_exceeded", "SCALEOT_QUOTA_GENERATED_TOKENS_PER_HOUR")
    assert _charged(world, "alice") == after_stream  # a refused request is not charged
    # The window is one hour: charges older than that no longer count.
    with world.sessions() as s:
        for charge in s.execute(select(TokenCharge).where(TokenCharge.tokens > 0)).scalars():
            charge.created_at = utcnow() - timedelta(hours=1, minutes=1)
        s.commit()
    r = world.client.post(
        f"/v1/adapters/{world.adapter_id}/generate", headers=h, json={"prompt": "the", "max_new_tokens": 2}
    )
    assert r.status_code == 200, r.text


# ---------------------------------------------------------------- fair scheduling


def test_a_backlog_of_one_organization_does_not_delay_another(small_app, monkeypatch):
    ran: list[str] = []
    monkeypatch.setitem(HANDLERS, "fake", lambda runner, ctx, params: ran.append(params["name"]) or {})
    client, _ = small_app(queue_url=None)  # a real queue (not run inline); no consumer: the test is the worker
    state = client.app.state
    t0 = utcnow() - timedelta(minutes=10)
    with state.sessions() as s:
        alice, bob = crud.find_org(s, "alice"), crud.find_org(s, "bob")
        backlog = []
        for i in range(3):
            job = crud.create_job(s, "fake", alice, {"name": f"alice{i}"})
            job.created_at = t0 + timedelta(seconds=i)
            backlog.append(job.id)
        bob_job = crud.create_job(s, "fake", bob, {"name": "bob0"})
        bob_job.created_at = t0 + timedelta(seconds=5)
        s.commit()
    runner = JobRunner(state.settings, state.sessions, state.storage, None)
    # Each queue message is a turn: alice's backlog came first, but bob's job gets the second turn.
    for job_id in [*backlog, bob_job.id]:
        runner.run(job_id)
    assert ran == ["alice0", "bob0", "alice1", "alice2"]
    with state.sessions() as s:
        assert {j.status for j in s.execute(select(JobRow)).scalars()} == {"succeeded"}
    # A surplus message (e.g. the reaper's requeue) finds nothing queued and runs nothing.
    runner.run(backlog[0])
    assert len(ran) == 4


# ---------------------------------------------------------------- pagination


def test_lists_are_paged_with_a_stable_cursor(small_app):
    client, keys = small_app()
    h = auth(keys["admin"])
    same = utcnow() - timedelta(minutes=1)  # equal timestamps: the id breaks the tie, so no row is lost or repeated
    with client.app.state.sessions() as s:
        admin = crud.find_org(s, "admin")
        model = RegisteredModel(name="m", path="/nowhere", n_layers=4)
        s.add(model)
        s.flush()
        run = ImportanceRun(model_id=model.id, status="succeeded", steps=1)
        s.add(run)
        s.flush()
        for i in range(5):
            emu = EmulatorRow(
                model_id=model.id,
                importance_run_id=run.id,
                n_adapter=1,
                alpha=0.1 * i,
                beta=0.0,
                status="failed",
                error="x",
                created_at=same,
            )
            s.add(emu)
            s.flush()
            job = crud.create_job(s, "fake", admin, {})
            job.created_at, job.status = same, "failed"
            s.add(
                AdapterRow(
                    emulator_id=emu.id,
                    model_id=model.id,
                    org_id=admin.id,
                    status="failed",
                    path="x",
                    sha256="0" * 64,
                    size_bytes=1,
                    created_at=same,
                )
            )
        s.commit()
    for path, field in (("/v1/emulators", "emulators"), ("/v1/adapters", "adapters"), ("/v1/jobs", "jobs")):
        full = client.get(path, headers=h).json()
        assert len(full[field]) == 5 and full["next_cursor"] is None and full["limit"] in (50, 100)
        seen, cursor = [], None
        while True:
            r = client.get(path, headers=h, params={"limit": 2, **({"cursor": cursor} if cursor else {})})
            assert r.status_code == 200, r.text
            page = r.json()
            assert len(page[field]) <= 2 and page["limit"] == 2
            seen += [row["id"] for row in page[field]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == [row["id"] for row in full[field]]  # same order, nothing lost or repeated
        for bad in ("garbage!", "eyJ4IjoxfQ", "WyIyMDI2LTAxLTAxIiwiYSJd"):  # not base64 / not a pair / no timezone
            r = client.get(path, headers=h, params={"cursor": bad})
            assert r.status_code == 422 and "next_cursor" in r.json()["error"]["message"], r.text
        for limit in (0, 501, "x"):
            r = client.get(path, headers=h, params={"limit": limit})
            assert r.status_code == 422 and "limit" in r.json()["error"]["message"], r.text
