"""Key lifecycle (issue 20, finding 6): API keys are listed, added, revoked, rotated and expire; grants are
revoked and organizations deleted (API and CLI); each ends access at once, for the API and for console
sessions (which also time out when idle). Every test makes its own organizations: the shared `world` keeps
its admin / alice / bob / mallory as they are."""

from __future__ import annotations

import io
import re
import secrets
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from server_helpers import adapter_bytes, auth, fast_settings
from sqlalchemy import create_engine, select, update
from typer.testing import CliRunner

from model_owner_server import crud
from model_owner_server.core.security import check_api_key
from model_owner_server.main import create_app
from model_owner_server.models import ApiKey, AuditEvent, ConsoleSession, GrantRow, Organization, utcnow


def _org(world, role: str = "data-owner", grant: bool = False) -> tuple[str, str, str]:
    """A fresh organization: (name, id, key), granted the world's model if asked."""
    name = f"kl-{secrets.token_hex(4)}"
    with world.sessions() as s:
        org, key = crud.create_org(s, name, role)
        if grant:
            crud.grant(s, crud.find_model(s, world.model_id), org)
        s.commit()
        return name, org.id, key


def _keys(world, org: str, key: str):
    return world.client.get(f"/v1/orgs/{org}/keys", headers=auth(key))


def _sign_in(client, key: str):
    """Sign in through the console's form; return the answer (303 on success)."""
    client.cookies.clear()
    page = client.get("/console/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    return client.post("/console/login", data={"api_key": key, "csrf_token": token}, follow_redirects=False)


def _console_models(client):
    return client.get("/console/models", follow_redirects=False)


# ---------------------------------------------------------------- API keys over the API


def test_list_add_revoke_and_rotate_keys(world):
    c = world.client
    name, _, key1 = _org(world)
    listed = _keys(world, name, key1).json()["keys"]
    assert len(listed) == 1 and listed[0]["state"] == "active" and listed[0]["prefix"] == key1[:10]
    assert "key_hash" not in listed[0] and "key" not in listed[0]
    assert not any(key1 in str(v) for v in listed[0].values())

    r = c.post(f"/v1/orgs/{name}/keys", headers=auth(key1), json={"name": "laptop"})
    assert r.status_code == 201, r.text
    key2, key2_id = r.json()["key"], r.json()["api_key"]["id"]
    assert r.json()["api_key"]["name"] == "laptop" and c.get("/v1/models", headers=auth(key2)).status_code == 200

    key1_id = listed[0]["id"]
    r = c.delete(f"/v1/orgs/{name}/keys/{key1_id}", headers=auth(key2))
    assert r.status_code == 200 and r.json()["state"] == "revoked"
    r = c.get("/v1/models", headers=auth(key1))
    assert r.status_code == 401 and "revoked" in r.json()["error"]["message"]
    assert "create-key" in r.json()["error"]["message"]

    # Rotation with a grace period: both keys work until the old one's new expiry.
    r = c.post(f"/v1/orgs/{name}/keys/{key2_id}/rotate", headers=auth(key2), json={"grace_minutes": 10})
    assert r.status_code == 201, r.text
    key3, key3_id = r.json()["key"], r.json()["api_key"]["id"]
    assert r.json()["replaced"]["expires_at"] is not None and r.json()["api_key"]["name"] == "laptop"
    assert c.get("/v1/models", headers=auth(key2)).status_code == 200
    assert c.get("/v1/models", headers=auth(key3)).status_code == 200
    # Without one the old key stops at once.
    r = c.post(f"/v1/orgs/{name}/keys/{key3_id}/rotate", headers=auth(key3), json={})
    assert r.status_code == 201 and r.json()["replaced"]["state"] == "revoked"
    key4 = r.json()["key"]
    assert c.get("/v1/models", headers=auth(key3)).status_code == 401
    assert c.get("/v1/models", headers=auth(key4)).status_code == 200
    # A revoked key is not rotated again.
    r = c.post(f"/v1/orgs/{name}/keys/{key3_id}/rotate", headers=auth(key4), json={})
    assert r.status_code == 409 and "create a new key" in r.json()["error"]["message"]
    states = {k["id"]: k["state"] for k in _keys(world, name, key4).json()["keys"]}
    assert states[key1_id] == "revoked" and states[key3_id] == "revoked" and states[key2_id] == "active"


def test_an_organization_cannot_revoke_its_last_key_by_accident(world):
    c = world.client
    name, _, key = _org(world)
    key_id = _keys(world, name, key).json()["keys"][0]["id"]
    r = c.delete(f"/v1/orgs/{name}/keys/{key_id}", headers=auth(key))
    assert r.status_code == 409 and r.json()["error"]["code"] == "last_key"
    assert "confirm_last_key=true" in r.json()["error"]["message"]
    assert c.get("/v1/models", headers=auth(key)).status_code == 200  # nothing changed
    r = c.delete(f"/v1/orgs/{name}/keys/{key_id}?confirm_last_key=true", headers=auth(key))
    assert r.status_code == 200 and c.get("/v1/models", headers=auth(key)).status_code == 401
    # An admin locking another organization out is deliberate: no confirmation needed.
    name2, _, key2 = _org(world)
    key2_id = _keys(world, name2, key2).json()["keys"][0]["id"]
    assert c.delete(f"/v1/orgs/{name2}/keys/{key2_id}", headers=auth(world.keys["admin"])).status_code == 200
    assert c.get("/v1/models", headers=auth(key2)).status_code == 401


def test_data_owners_manage_only_their_own_keys(world):
    c = world.client
    name, org_id, key = _org(world)
    key_id = _keys(world, name, key).json()["keys"][0]["id"]
    mallory = auth(world.keys["mallory"])
    with world.sessions() as s:
        before = s.execute(select(ApiKey.id, ApiKey.revoked_at, ApiKey.expires_at).order_by(ApiKey.id)).all()
    for method, path, kwargs in (
        ("GET", f"/v1/orgs/{name}/keys", {}),
        ("GET", f"/v1/orgs/{org_id}/keys", {}),
        ("POST", f"/v1/orgs/{name}/keys", {"json": {}}),
        ("DELETE", f"/v1/orgs/{name}/keys/{key_id}?confirm_last_key=true", {}),
        ("POST", f"/v1/orgs/{name}/keys/{key_id}/rotate", {"json": {}}),
        ("DELETE", f"/v1/orgs/{name}/keys/{key_id}", {}),
    ):
        r = c.request(method, path, headers=mallory, **kwargs)
        assert r.status_code == 404, (method, path, r.text)
    # mallory naming her own organization but alice's key: still 404.
    r = c.delete(f"/v1/orgs/mallory/keys/{key_id}", headers=mallory)
    assert r.status_code == 404
    with world.sessions() as s:
        assert s.execute(select(ApiKey.id, ApiKey.revoked_at, ApiKey.expires_at).order_by(ApiKey.id)).all() == before
    assert c.delete(f"/v1/orgs/{name}", headers=auth(key)).status_code == 403  # deleting is for admins


def test_expired_keys_are_refused_with_what_to_do(world, monkeypatch):
    c = world.client
    name, _, key = _org(world)
    with world.sessions() as s:
        s.execute(update(ApiKey).where(ApiKey.prefix == key[:10]).values(expires_at=utcnow() - timedelta(seconds=1)))
        s.commit()
    r = c.get("/v1/models", headers=auth(key))
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    message = r.json()["error"]["message"]
    assert "expired at" in message and "create-key" in message and "/keys" in message
    # SCALEOT_API_KEY_TTL_DAYS: new keys expire, and may not ask for longer.
    monkeypatch.setattr(world.settings, "api_key_ttl_days", 7)
    admin = auth(world.keys["admin"])
    r = c.post(f"/v1/orgs/{name}/keys", headers=admin, json={"expires_in_days": 30})
    assert r.status_code == 422 and "SCALEOT_API_KEY_TTL_DAYS" in r.json()["error"]["message"]
    r = c.post(f"/v1/orgs/{name}/keys", headers=admin, json={})
    assert r.status_code == 201
    expires = r.json()["api_key"]["expires_at"]
    assert expires is not None and expires.startswith((utcnow() + timedelta(days=7)).strftime("%Y-%m-%d"))


def test_last_used_is_recorded_at_most_once_a_minute(world):
    c = world.client
    name, _, key = _org(world)

    def last_used():
        with world.sessions() as s:
            return s.execute(select(ApiKey.last_used_at).where(ApiKey.prefix == key[:10])).scalar_one()

    assert last_used() is None
    assert c.get("/v1/models", headers=auth(key)).status_code == 200
    first = last_used()
    assert first is not None and abs((utcnow() - first).total_seconds()) < 60
    assert c.get("/v1/models", headers=auth(key)).status_code == 200
    assert last_used() == first  # within the minute: no write
    with world.sessions() as s:
        s.execute(update(ApiKey).where(ApiKey.prefix == key[:10]).values(last_used_at=first - timedelta(minutes=2)))
        s.commit()
    assert c.get("/v1/models", headers=auth(key)).status_code == 200
    assert last_used() > first - timedelta(minutes=1)
    assert _keys(world, name, key).json()["keys"][0]["last_used_at"] is not None
    # The refresh is its own short transaction: the request's session stays clean, so a read-only request
    # never flushes a write (on SQLite that would hold the database's write lock for the whole request).
    with world.sessions() as s:
        s.execute(update(ApiKey).where(ApiKey.prefix == key[:10]).values(last_used_at=first - timedelta(minutes=5)))
        s.commit()
        assert check_api_key(s, key).org is not None
        assert not s.dirty
    assert last_used() > first - timedelta(minutes=1)


def test_the_last_use_refresh_needs_no_second_connection(tmp_path, new_database_url):
    """A request must never hold one pooled connection while waiting for another: the last-use refresh of a key
    once did, so N requests at once on a pool of N connections all waited the pool timeout and answered 500
    (found by reliability.flood). With a pool of one connection a single request shows it."""
    settings = fast_settings(tmp_path / "data", new_database_url())
    app = create_app(settings)
    with TestClient(app) as client:
        with app.state.sessions() as s:
            _, key = crud.create_org(s, "solo", "data-owner")
            s.commit()
        sqlite = settings.db_url.startswith("sqlite")
        one = create_engine(
            settings.db_url,
            pool_size=1,
            max_overflow=0,
            pool_timeout=3,
            connect_args={"check_same_thread": False} if sqlite else {},
        )
        app.state.sessions.configure(bind=one)
        try:
            r = client.get("/v1/models", headers=auth(key))
            assert r.status_code == 200, r.text
            with app.state.sessions() as s:
                assert s.execute(select(ApiKey.last_used_at).where(ApiKey.prefix == key[:10])).scalar_one()
        finally:
            one.dispose()


# ---------------------------------------------------------------- grants


def test_a_revoked_grant_ends_downloads_uploads_and_generation_at_once(world):
    c = world.client
    name, _, key = _org(world, grant=True)
    h, emu = auth(key), world.emulator["id"]
    r = c.post(
        f"/v1/emulators/{emu}/adapters",
        headers=h,
        files={"adapter": ("adapter.safetensors", io.BytesIO(adapter_bytes(world.adapter_tensors)))},
    )
    assert r.status_code == 202, r.text
    adapter_id = r.json()["adapter"]["id"]
    gen = {"prompt": "the", "max_new_tokens": 2}
    assert c.post(f"/v1/adapters/{adapter_id}/generate", headers=h, json=gen).status_code == 200
    assert c.get(f"/v1/emulators/{emu}/file", headers=h).status_code == 200

    r = c.delete(f"/v1/models/{world.model_id}/grants/{name}", headers=auth(world.keys["admin"]))
    assert r.status_code == 204, r.text
    assert c.get(f"/v1/emulators/{emu}/file", headers=h).status_code == 404  # download
    assert c.get(f"/v1/emulators/{emu}/signature", headers=h).status_code == 404
    r = c.post(
        f"/v1/emulators/{emu}/adapters",
        headers=h,
        files={"adapter": ("adapter.safetensors", io.BytesIO(adapter_bytes(world.adapter_tensors)))},
    )
    assert r.status_code == 404  # upload
    assert c.post(f"/v1/adapters/{adapter_id}/generate", headers=h, json=gen).status_code == 404  # generation
    r = c.post("/openai/v1/completions", headers=h, json={"model": adapter_id, "prompt": "the", "max_tokens": 2})
    assert r.status_code == 404
    assert adapter_id not in {a["id"] for a in c.get("/v1/adapters", headers=h).json()["adapters"]}
    assert c.get("/v1/models", headers=h).json()["models"] == []
    # The rows stay: granting the model again restores access; revoking twice is a clear 404.
    assert c.delete(f"/v1/models/{world.model_id}/grants/{name}", headers=auth(world.keys["admin"])).status_code == 404
    r = c.post(f"/v1/models/{world.model_id}/grants", headers=auth(world.keys["admin"]), json={"org": name})
    assert r.status_code == 201
    assert c.post(f"/v1/adapters/{adapter_id}/generate", headers=h, json=gen).status_code == 200
    with world.sessions() as s:
        actions = set(s.execute(select(AuditEvent.action).where(AuditEvent.target_id == world.model_id)).scalars())
    assert "revoke_grant" in actions


def test_console_sessions_of_an_organization_that_lost_a_grant_no_longer_see_the_model(world):
    client = world.client
    name, _, key = _org(world, grant=True)
    assert _sign_in(client, key).status_code == 303
    assert "tiny" in _console_models(client).text
    assert client.get(f"/console/emulators/{world.emulator['id']}").status_code == 200
    with world.sessions() as s:
        crud.revoke_grant(s, crud.find_model(s, world.model_id), crud.find_org(s, name))
        s.commit()
    assert client.get(f"/console/emulators/{world.emulator['id']}").status_code == 404
    assert world.emulator["id"] not in client.get("/console/emulators").text
    client.cookies.clear()


# ---------------------------------------------------------------- console sessions


def test_console_sessions_end_when_their_key_is_revoked_or_expires(world):
    client = world.client
    name, org_id, key1 = _org(world)
    key2 = client.post(f"/v1/orgs/{name}/keys", headers=auth(key1), json={}).json()["key"]
    assert _sign_in(client, key1).status_code == 303
    assert _console_models(client).status_code == 200
    with world.sessions() as s:
        key1_id = s.execute(select(ApiKey.id).where(ApiKey.prefix == key1[:10])).scalar_one()
        assert (
            s.execute(select(ConsoleSession.api_key_id).where(ConsoleSession.org_id == org_id)).scalar_one() == key1_id
        )
    # Revoked with the other key over the API: the console session made with key1 ends on its next request.
    assert client.delete(f"/v1/orgs/{name}/keys/{key1_id}", headers=auth(key2)).status_code == 200
    r = _console_models(client)
    assert r.status_code == 303 and "revoked" in r.headers["location"]
    with world.sessions() as s:
        assert s.execute(select(ConsoleSession).where(ConsoleSession.org_id == org_id)).first() is None
    # A revoked key cannot sign in again, and the page says why.
    r = _sign_in(client, key1)
    assert r.status_code == 401 and "revoked" in r.text
    # Expiry of the session's key ends it too.
    assert _sign_in(client, key2).status_code == 303
    with world.sessions() as s:
        s.execute(update(ApiKey).where(ApiKey.prefix == key2[:10]).values(expires_at=utcnow() - timedelta(seconds=1)))
        s.commit()
    r = _console_models(client)
    assert r.status_code == 303 and "expired" in r.headers["location"]
    client.cookies.clear()


def test_console_sessions_time_out_when_idle(world, monkeypatch):
    client = world.client
    _, org_id, key = _org(world)
    assert _sign_in(client, key).status_code == 303
    monkeypatch.setattr(world.settings, "console_idle_minutes", 30)

    def seen(minutes_ago: float) -> None:
        with world.sessions() as s:
            s.execute(
                update(ConsoleSession)
                .where(ConsoleSession.org_id == org_id)
                .values(last_seen_at=utcnow() - timedelta(minutes=minutes_ago))
            )
            s.commit()

    seen(29)
    assert _console_models(client).status_code == 200  # active within the idle window: refreshed
    with world.sessions() as s:
        last = s.execute(select(ConsoleSession.last_seen_at).where(ConsoleSession.org_id == org_id)).scalar_one()
    assert utcnow() - last < timedelta(minutes=1)
    seen(31)
    r = _console_models(client)
    assert r.status_code == 303 and "without+activity" in r.headers["location"]
    client.cookies.clear()


# ---------------------------------------------------------------- deleting an organization


def test_deleting_an_organization_ends_its_access_and_keeps_the_audit_trail(world):
    c, admin = world.client, auth(world.keys["admin"])
    name, org_id, key = _org(world, grant=True)
    assert _sign_in(c, key).status_code == 303
    assert c.get(f"/v1/emulators/{world.emulator['id']}/file", headers=auth(key)).status_code == 200
    r = c.delete(f"/v1/orgs/{name}", headers=admin)
    assert r.status_code == 204, r.text
    assert c.get("/v1/models", headers=auth(key)).status_code == 401
    assert _console_models(c).status_code == 303
    with world.sessions() as s:
        assert s.get(Organization, org_id) is None
        for table in (ApiKey, GrantRow, ConsoleSession):
            assert s.execute(select(table).where(table.org_id == org_id)).first() is None, table
        kept = set(s.execute(select(AuditEvent.action).where(AuditEvent.org_id == org_id)).scalars())
        deleted = s.execute(select(AuditEvent).where(AuditEvent.action == "delete_org", AuditEvent.target_id == org_id))
        assert "download_emulator" in kept and deleted.scalar_one().detail["name"] == name
    assert c.delete(f"/v1/orgs/{name}", headers=admin).status_code == 404
    c.cookies.clear()


def test_the_last_admin_organization_cannot_be_deleted(world):
    r = world.client.delete("/v1/orgs/admin", headers=auth(world.keys["admin"]))
    assert r.status_code == 409 and "last admin organization" in r.json()["error"]["message"]
    assert world.client.get("/v1/models", headers=auth(world.keys["admin"])).status_code == 200


# ---------------------------------------------------------------- the same from the command line


def test_key_grant_and_organization_commands(world):
    from model_owner_server.cli import app as cli

    env = {"SCALEOT_DATA_DIR": str(world.settings.data_dir), "SCALEOT_DATABASE_URL": world.settings.db_url}
    runner = CliRunner()
    c = world.client
    name, _, key1 = _org(world, grant=True)

    out = runner.invoke(cli, ["create-key", name, "--name", "ci"], env=env)
    assert out.exit_code == 0, out.output
    key2 = out.stdout.strip().splitlines()[-1]
    assert key2.startswith("sot_") and c.get("/v1/models", headers=auth(key2)).status_code == 200
    out = runner.invoke(cli, ["list-keys", name], env=env)
    assert out.exit_code == 0 and key1[:10] in out.stdout and key2[:10] in out.stdout and key2 not in out.stdout
    key1_id = next(line.split()[0] for line in out.stdout.splitlines() if key1[:10] in line)
    key2_id = next(line.split()[0] for line in out.stdout.splitlines() if key2[:10] in line)

    out = runner.invoke(cli, ["rotate-key", key2_id, "--grace-minutes", "5"], env=env)
    assert out.exit_code == 0, out.output
    key3 = out.stdout.strip().splitlines()[-1]
    assert c.get("/v1/models", headers=auth(key2)).status_code == 200  # in its grace period
    assert c.get("/v1/models", headers=auth(key3)).status_code == 200

    out = runner.invoke(cli, ["revoke-key", key1_id], env=env)
    assert out.exit_code == 0, out.output
    assert c.get("/v1/models", headers=auth(key1)).status_code == 401
    out = runner.invoke(cli, ["revoke-key", "key_doesnotexist"], env=env)
    assert out.exit_code != 0 and "list-keys" in out.output

    out = runner.invoke(cli, ["revoke-grant", name, "tiny"], env=env)
    assert out.exit_code == 0, out.output
    assert c.get(f"/v1/emulators/{world.emulator['id']}/file", headers=auth(key3)).status_code == 404
    out = runner.invoke(cli, ["revoke-grant", name, "tiny"], env=env)
    assert out.exit_code != 0 and "no grant" in out.output

    out = runner.invoke(cli, ["delete-org", "admin", "--yes"], env=env)
    assert out.exit_code != 0 and "last admin organization" in out.output
    out = runner.invoke(cli, ["delete-org", name], env=env, input="n\n")
    assert out.exit_code != 0 and c.get("/v1/models", headers=auth(key3)).status_code == 200  # not confirmed
    out = runner.invoke(cli, ["delete-org", name, "--yes"], env=env)
    assert out.exit_code == 0, out.output
    assert c.get("/v1/models", headers=auth(key3)).status_code == 401


@pytest.mark.parametrize("last", [True, False])
def test_cli_guards_the_last_key(world, last):
    from model_owner_server.cli import app as cli

    env = {"SCALEOT_DATA_DIR": str(world.settings.data_dir), "SCALEOT_DATABASE_URL": world.settings.db_url}
    name, _, key = _org(world)
    if not last:
        world.client.post(f"/v1/orgs/{name}/keys", headers=auth(key), json={})
    key_id = _keys(world, name, key).json()["keys"][0]["id"]
    out = CliRunner().invoke(cli, ["revoke-key", key_id], env=env)
    if last:
        assert out.exit_code != 0 and "--force" in out.output
        assert world.client.get("/v1/models", headers=auth(key)).status_code == 200
        out = CliRunner().invoke(cli, ["revoke-key", key_id, "--force"], env=env)
    assert out.exit_code == 0, out.output
    assert world.client.get("/v1/models", headers=auth(key)).status_code == 401
