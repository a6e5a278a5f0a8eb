"""The audit log (issue 20, finding 8): refused keys and console sign-ins / sign-outs are recorded, bounded so
that a flood of bad keys cannot fill the disk; every row is hash-chained, so an edited, deleted or inserted
row is found (API, CLI) with its id; concurrent writers never fork the chain, on SQLite and PostgreSQL.

Tampering tests use their own database: the shared `world`'s chain must stay intact for the others."""

from __future__ import annotations

import itertools
import json
import re
import threading

import pytest
from fastapi.testclient import TestClient
from server_helpers import auth, fast_settings
from sqlalchemy import create_engine, func, select, text
from typer.testing import CliRunner

from model_owner_server import crud
from model_owner_server.audit_log import GENESIS, FailureLimiter, shown_prefix, verify_chain
from model_owner_server.core.db import alembic_config
from model_owner_server.main import create_app
from model_owner_server.models import AuditChainHead, AuditEvent


@pytest.fixture
def app_client(tmp_path, new_database_url):
    """A fresh app and database (admin org `admin`, a few audit rows), yielding (client, admin key, settings)."""
    settings = fast_settings(tmp_path / "data", new_database_url(), audit_auth_failures_per_minute=3)
    with TestClient(create_app(settings)) as c:
        with c.app.state.sessions() as s:
            org, key = crud.create_org(s, "admin", "admin")
            for i in range(5):
                crud.audit(s, org, "test_event", "model", f"mdl_{i}", n=i, note="ünïcode", ratio=0.1 * i)
            s.commit()
        yield c, key, settings


def _verify(client, key) -> dict:
    r = client.get("/v1/audit/verify", headers=auth(key))
    assert r.status_code == 200, r.text
    return r.json()


def _rows(client) -> list[AuditEvent]:
    with client.app.state.sessions() as s:
        return list(s.execute(select(AuditEvent).order_by(AuditEvent.seq)).scalars())


def _sql(client, statement: str, **params) -> None:
    with client.app.state.engine.begin() as conn:
        conn.execute(text(statement), params)


# ---------------------------------------------------------------- the chain


def test_every_row_is_chained(app_client):
    client, key, _ = app_client
    rows = _rows(client)
    assert [r.seq for r in rows] == list(range(1, len(rows) + 1))
    assert rows[0].prev_hash == GENESIS
    assert all(b.prev_hash == a.row_hash for a, b in itertools.pairwise(rows))
    report = _verify(client, key)
    assert report["ok"] and report["rows"] == len(rows) and report["head_hash"] == rows[-1].row_hash
    listed = client.get("/v1/audit", headers=auth(key)).json()["events"]
    assert listed[0]["seq"] == len(rows) and listed[0]["row_hash"] == rows[-1].row_hash


def test_an_edited_row_is_found_by_its_id(app_client):
    client, key, settings = app_client
    target = _rows(client)[2]
    _sql(client, "UPDATE audit_log SET detail = :d WHERE id = :id", d='{"n": 99}', id=target.id)
    report = _verify(client, key)
    assert not report["ok"] and report["row_id"] == target.id and report["row_seq"] == target.seq
    assert "edited" in report["problem"]
    # The command line says the same and exits 1.
    from model_owner_server.cli import app as cli

    env = {"SCALEOT_DATA_DIR": str(settings.data_dir), "SCALEOT_DATABASE_URL": settings.db_url}
    out = CliRunner().invoke(cli, ["verify-audit-log"], env=env)
    assert out.exit_code == 1 and target.id in out.output


def test_a_row_edited_with_its_hash_recomputed_breaks_the_next_link(app_client):
    from model_owner_server.audit_log import canonical, chain_hash

    client, key, _ = app_client
    rows = _rows(client)
    t = rows[1]
    forged = {**t.detail, "n": 42}
    new_hash = chain_hash(
        t.prev_hash,
        canonical(
            seq=t.seq,
            id=t.id,
            org_id=t.org_id,
            action=t.action,
            target_type=t.target_type,
            target_id=t.target_id,
            detail=forged,
            created_at=t.created_at,
        ),
    )
    _sql(
        client,
        "UPDATE audit_log SET detail = :d, row_hash = :h WHERE id = :id",
        d=json.dumps(forged),
        h=new_hash,
        id=t.id,
    )
    report = _verify(client, key)
    assert not report["ok"] and report["row_id"] == rows[2].id and "does not follow" in report["problem"]


def test_a_deleted_row_is_found(app_client):
    client, key, _ = app_client
    rows = _rows(client)
    _sql(client, "DELETE FROM audit_log WHERE id = :id", id=rows[2].id)
    report = _verify(client, key)
    assert not report["ok"] and report["row_id"] == rows[3].id and "deleted" in report["problem"]
    assert f"seq {rows[2].seq} missing" in report["problem"]


def test_deleting_the_newest_rows_is_found(app_client):
    client, key, _ = app_client
    rows = _rows(client)
    _sql(client, "DELETE FROM audit_log WHERE seq >= :s", s=rows[-2].seq)
    report = _verify(client, key)
    assert not report["ok"] and "newest row(s)" in report["problem"] and report["row_id"] is None


def test_an_inserted_row_is_found(app_client):
    client, key, _ = app_client
    rows = _rows(client)
    _sql(
        client,
        "INSERT INTO audit_log (id, org_id, action, target_type, target_id, detail, created_at, seq, prev_hash, "
        "row_hash) VALUES ('aud_forged', NULL, 'grant', 'model', 'mdl_x', '{}', :t, :s, :p, :h)",
        t=rows[-1].created_at,
        s=rows[-1].seq + 1,
        p=rows[-1].row_hash,
        h="0" * 64,
    )
    report = _verify(client, key)
    assert not report["ok"] and report["row_id"] == "aud_forged"


def test_concurrent_writers_never_fork_the_chain(app_client):
    """Threads with their own sessions write at once (on PostgreSQL the head row's lock orders them, on
    SQLite the database write lock): numbers 1..N without gaps or repeats, and the chain verifies."""
    client, key, _ = app_client
    sessions = client.app.state.sessions
    before = len(_rows(client))
    n_threads, per_thread = 8, 6
    start, errors = threading.Barrier(n_threads), []

    def writer(i: int) -> None:
        try:
            start.wait()
            for j in range(per_thread):
                with sessions() as s:
                    crud.audit(s, None, "concurrent", "model", f"mdl_{i}_{j}", thread=i)
                    if j % 2:
                        crud.audit(s, None, "concurrent", "model", f"mdl_{i}_{j}b", thread=i)  # two in one commit
                    s.commit()
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    rows = _rows(client)
    assert len(rows) == before + n_threads * (per_thread + per_thread // 2)
    assert [r.seq for r in rows] == list(range(1, len(rows) + 1))
    assert _verify(client, key)["ok"]


def test_a_rolled_back_request_writes_no_audit_row(app_client):
    client, _, _ = app_client
    before = len(_rows(client))
    with client.app.state.sessions() as s:
        crud.audit(s, None, "never", "model", "mdl_x")
        s.rollback()
        s.commit()
    with client.app.state.sessions() as s:
        crud.audit(s, None, "never", "model", "mdl_y")  # closed without commit
    assert len(_rows(client)) == before


def test_the_migration_chains_rows_written_before_it(tmp_path, new_database_url):
    from alembic import command

    url = new_database_url()
    cfg = alembic_config(url)
    command.upgrade(cfg, "0006")
    engine = create_engine(url)
    with engine.begin() as conn:
        for i in range(3):
            conn.execute(
                text(
                    "INSERT INTO audit_log (id, org_id, action, target_type, target_id, detail, created_at) "
                    "VALUES (:id, NULL, 'grant', 'model', 'mdl_x', :d, :t)"
                ),
                {"id": f"aud_old{i}", "d": f'{{"i": {i}, "f": 0.1}}', "t": f"2026-01-0{i + 1} 10:00:00.123456+00:00"},
            )
    command.upgrade(cfg, "head")
    from sqlalchemy.orm import Session

    with Session(engine) as s:
        report = verify_chain(s)
        assert report.ok and report.rows == 3, report
        assert [r.id for r in s.execute(select(AuditEvent).order_by(AuditEvent.seq)).scalars()] == [
            "aud_old0",
            "aud_old1",
            "aud_old2",
        ]
        assert s.get(AuditChainHead, 1).seq == 3
    engine.dispose()


# ---------------------------------------------------------------- refused keys and console sign-ins


def test_refused_keys_are_audited_by_prefix_only_and_bounded(app_client):
    client, key, _ = app_client

    def failures() -> list[AuditEvent]:
        return [r for r in _rows(client) if r.action == "auth_failed"]

    bad = "sot_" + "A" * 43
    for _ in range(5):  # the same bad key five times in a minute: one row
        assert client.get("/v1/models", headers=auth(bad)).status_code == 401
    rows = failures()
    assert len(rows) == 1 and rows[0].detail["prefix"] == bad[:10] and rows[0].detail["reason"] == "unknown"
    assert rows[0].detail["path"] == "/v1/models"
    for i in range(10):  # a flood of different keys: at most 3 rows a minute (this app's setting)
        assert client.get("/v1/models", headers=auth(f"sot_{i:02d}" + "B" * 41)).status_code == 401
    assert len(failures()) == 3
    # No bad key is stored whole, anywhere in the log.
    with client.app.state.sessions() as s:
        dump = str(s.execute(select(AuditEvent.detail)).all())
    assert bad not in dump and "B" * 20 not in dump
    # A revoked key's refusal names its key and organization.
    with client.app.state.sessions() as s:
        org, key2 = crud.create_org(s, "acme", "data-owner")
        s.commit()
    client.app.state.auth_failures = FailureLimiter(3)  # a new minute, as far as the limiter knows
    client.delete(f"/v1/orgs/acme/keys/{_key_id(client, key2)}", headers=auth(key))
    assert client.get("/v1/models", headers=auth(key2)).status_code == 401
    row = failures()[-1]
    assert row.detail["reason"] == "revoked" and row.org_id == org.id and row.target_id == _key_id(client, key2)
    assert _verify(client, key)["ok"]


def _key_id(client, key: str) -> str:
    from model_owner_server.models import ApiKey

    with client.app.state.sessions() as s:
        return s.execute(select(ApiKey.id).where(ApiKey.prefix == key[:10])).scalar_one()


def test_the_limiter_counts_what_it_does_not_write():
    lim = FailureLimiter(per_minute=2)
    t = 600.0
    assert lim.admit("sot_a", t) == 0
    assert lim.admit("sot_a", t + 1) is None  # same prefix, same minute
    assert lim.admit("sot_b", t + 2) == 1  # carries the one not written
    assert lim.admit("sot_c", t + 3) is None  # over the cap
    assert lim.admit("sot_d", t + 4) is None
    assert lim.admit("sot_a", t + 60) == 2  # next minute: written, with the two skipped
    assert shown_prefix("sot_" + "x" * 43) == "sot_xxxxxx" and shown_prefix("sot_wrong") == "so"


def test_console_sign_ins_failures_and_sign_outs_are_audited(app_client):
    client, key, _ = app_client

    def form_token() -> str:
        return re.search(r'name="csrf_token" value="([^"]+)"', client.get("/console/login").text).group(1)

    r = client.post("/console/login", data={"api_key": "sot_" + "C" * 43, "csrf_token": form_token()})
    assert r.status_code == 401
    r = client.post("/console/login", data={"api_key": key, "csrf_token": form_token()}, follow_redirects=False)
    assert r.status_code == 303
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/console/models").text).group(1)
    assert client.post("/console/logout", data={"csrf_token": csrf}).status_code == 200
    actions = [r.action for r in _rows(client)]
    assert actions[-3:] == ["console_sign_in_failed", "console_sign_in", "console_sign_out"]
    failed = next(r for r in _rows(client) if r.action == "console_sign_in_failed")
    assert failed.detail["prefix"] == "sot_CCCCCC" and failed.detail["path"] == "/console/login"
    assert _verify(client, key)["ok"]


def test_the_chain_check_is_admin_only(world):
    assert world.client.get("/v1/audit/verify", headers=auth(world.keys["alice"])).status_code == 403
    r = world.client.get("/v1/audit/verify", headers=auth(world.keys["admin"]))
    assert r.status_code == 200 and r.json()["ok"], r.json()
    with world.sessions() as s:
        assert r.json()["rows"] == s.execute(select(func.count()).select_from(AuditEvent)).scalar_one()
