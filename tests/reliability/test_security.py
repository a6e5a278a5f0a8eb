"""Security properties: the authorization matrix covers every route, API keys exist only as hashes and are
compared in constant time, the signing key is private and rotates, the audit log answers who downloaded /
uploaded what, and request bodies are size-limited before they are read."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import secrets
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import pytest
from fastapi.testclient import TestClient
from server_helpers import adapter_bytes, auth, fast_settings
from sqlalchemy import select
from typer.testing import CliRunner

from model_owner_server import crud
from model_owner_server.core import security
from model_owner_server.main import create_app
from model_owner_server.models import ApiKey, Base
from shared import signing

DOC_ROUTES = {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}  # public by design


def app_routes(app) -> set[tuple[str, str]]:
    """(method, path template) of every route, including ones left out of the OpenAPI schema."""
    try:
        from fastapi.routing import (
            iter_route_contexts,  # FastAPI >= 0.16x keeps included routers lazily
        )

        items = [(rc.methods, rc.path) for rc in iter_route_contexts(app.routes)]
    except ImportError:
        items = [(getattr(r, "methods", None), getattr(r, "path", None)) for r in app.routes]
    return {(m, p) for methods, p in items if p for m in (methods or ())}


def _template_regex(path: str) -> re.Pattern:
    return re.compile("^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(path)) + "$")


def test_access_matrix_covers_every_route(tmp_path):
    """A route added without a row in tests/server/test_access_matrix.py fails here."""
    import test_access_matrix as matrix

    app = create_app(fast_settings(tmp_path, f"sqlite:///{tmp_path / 'db'}"))
    routes = app_routes(app)
    # The web console authenticates by session cookie, not bearer key: tests/console/test_console_access.py
    # holds every /console route to the same rule (no session, no page) and fails for a route it does not know.
    console = {(m, p) for m, p in routes if p.startswith("/console")}
    api = {(m, p) for m, p in routes if p not in DOC_ROUTES} - console
    assert {p for _, p in routes} - {p for _, p in api} - {p for _, p in console} == DOC_ROUTES
    dummy = {"model": "mdl_x", "emulator": "emu_x", "adapter": "adp_x", "importance_job": "job_x", "eval_job": "job_y"}
    covered = set()
    for name, method, path, _kwargs, expected in matrix.MATRIX:
        assert len(expected) == len(matrix.ROLES), f"matrix row {name!r} lacks a role"
        concrete = path.format(**dummy)
        hits = {(m, p) for m, p in api if m == method and _template_regex(p).match(concrete)}
        assert hits, f"matrix row {name!r} ({method} {path}) matches no route"
        covered |= hits
    missing = sorted(api - covered)
    assert not missing, f"routes without a row in the access matrix: {missing}"


def test_documentation_routes_are_the_only_public_ones_besides_healthz(tmp_path):
    settings = fast_settings(tmp_path / "data", f"sqlite:///{tmp_path / 'db'}")
    with TestClient(create_app(settings)) as c:
        for path in DOC_ROUTES - {"/docs/oauth2-redirect"}:
            assert c.get(path).status_code == 200
        spec = c.get("/openapi.json").json()
        for path, ops in spec["paths"].items():
            for method in ops:
                if path.startswith("/v1/"):
                    r = c.request(method.upper(), re.sub(r"\{[^}]+\}", "x", path))
                    assert r.status_code == 401, (method, path, r.status_code)


# ---------------------------------------------------------------- API keys


@pytest.mark.db
def test_api_keys_are_stored_only_as_hashes_and_compared_in_constant_time(world, monkeypatch):
    with world.sessions() as s:
        org, key = crud.create_org(s, f"keytest-{secrets.token_hex(4)}", "data-owner")
        s.commit()
        rows = list(s.execute(select(ApiKey).where(ApiKey.org_id == org.id)).scalars())
        assert len(rows) == 1 and rows[0].key_hash == hashlib.sha256(key.encode()).hexdigest()
        assert rows[0].prefix == key[:10] and len(key) > 40
        # The key itself is in no column of any table.
        for table in Base.metadata.sorted_tables:
            for row in s.execute(table.select()).all():
                assert not any(key in json.dumps(v, default=str) for v in row), f"API key found in {table.name}"
    if world.settings.db_url.startswith("sqlite:///"):
        db = Path(world.settings.db_url.removeprefix("sqlite:///"))
        for f in (db, db.with_name(db.name + "-wal")):
            if f.exists():
                assert key.encode() not in f.read_bytes(), f"API key bytes in {f.name}"
    calls = []
    real = security.hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(security.hmac, "compare_digest", spy)
    assert world.client.get("/v1/models", headers=auth(key)).status_code == 200
    digest = hashlib.sha256(key.encode()).hexdigest()
    assert calls and all(a == digest and b == digest for a, b in calls), "the key was not compared by hash"
    calls.clear()
    wrong = key[:-1] + ("A" if key[-1] != "A" else "B")
    assert world.client.get("/v1/models", headers=auth(wrong)).status_code == 401
    # A wrong key finds no row by its hash: nothing is compared against any stored value byte by byte.
    assert not calls
    with world.sessions() as s:
        s.get(ApiKey, rows[0].id).revoked_at = datetime.now(UTC)
        s.commit()
    assert world.client.get("/v1/models", headers=auth(key)).status_code == 401


# ---------------------------------------------------------------- signing keys


@pytest.mark.db
def test_signing_key_file_is_private(world):
    path = world.settings.signing_key_path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) & 0o077 == 0


def test_loose_key_file_permissions_are_reported(tmp_path, caplog):
    from model_owner_server.keyring import KeyRing

    path = tmp_path / "keys" / "k.pem"
    KeyRing(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    os.chmod(path, 0o644)
    with caplog.at_level(logging.WARNING, logger="scaleot.keyring"):
        KeyRing(path)
    assert "chmod 600" in caplog.text


@pytest.mark.db
def test_rotate_signing_key_cli(tmp_path, new_database_url, files):
    """rotate-signing-key: new key id, old manifests still verify through their key id, new manifests use the
    new key (picked up without a restart), revoked keys are refused and their manifests re-signed."""
    from model_owner_server.cli import app as cli

    settings = fast_settings(tmp_path / "data", new_database_url(), default_eval=files["eval"])
    env = {
        "SCALEOT_DATA_DIR": str(settings.data_dir),
        "SCALEOT_DATABASE_URL": settings.db_url,
        "SCALEOT_SIGNING_KEY": str(settings.signing_key_path),
    }
    runner = CliRunner()
    with TestClient(create_app(settings)) as c:
        with c.app.state.sessions() as s:
            _, key = crud.create_org(s, "admin", "admin")
            model = crud.register_model(s, "tiny", files["model"])
            s.commit()
        h = auth(key)
        assert (
            c.post(
                f"/v1/models/{model.id}/importance", headers=h, json={"steps": 2, "corpus": str(files["corpus"])}
            ).status_code
            == 202
        )
        emu1 = c.post(
            "/v1/emulators", headers=h, json={"model_id": model.id, "n_adapter": 1, "alpha": 0.5, "beta": 0.2}
        ).json()["emulator"]["id"]
        old_signed = c.get(f"/v1/emulators/{emu1}/signature", headers=h).json()
        k1 = old_signed["key_id"]

        out = runner.invoke(cli, ["rotate-signing-key"], env=env)
        assert out.exit_code == 0, out.output
        k2 = out.stdout.strip().splitlines()[-1]
        assert re.fullmatch(r"[0-9a-f]{16}", k2) and k2 != k1
        assert stat.S_IMODE(settings.signing_key_path.stat().st_mode) == 0o600
        listing = c.get("/v1/signing-keys", headers=h).json()
        assert {k["key_id"]: k["status"] for k in listing["keys"]} == {k1: "retired", k2: "active"}
        # Old manifest: unchanged, still verifies through its own (retired) key id.
        assert c.get(f"/v1/emulators/{emu1}/signature", headers=h).json() == old_signed
        assert signing.verify_signed_manifest(old_signed, signing.trusted_keys_from_listing(listing))
        # New manifest: the running server signs with the new key file without a restart.
        emu2 = c.post(
            "/v1/emulators", headers=h, json={"model_id": model.id, "n_adapter": 1, "alpha": 0.5, "beta": 0.4}
        ).json()["emulator"]["id"]
        new_signed = c.get(f"/v1/emulators/{emu2}/signature", headers=h).json()
        assert new_signed["key_id"] == k2
        signing.verify_signed_manifest(new_signed, signing.trusted_keys_from_listing(listing, [k2]))

        # Revoking the old key: clients refuse what it signed; the server re-signs on request.
        out = runner.invoke(cli, ["revoke-signing-key", k1], env=env)
        assert out.exit_code == 0, out.output
        listing = c.get("/v1/signing-keys", headers=h).json()
        trusted = signing.trusted_keys_from_listing(listing)
        assert k1 not in trusted and k2 in trusted
        with pytest.raises(signing.SignatureError, match="not trusted"):
            signing.verify_signed_manifest(old_signed, trusted)
        assert signing.trusted_keys_from_listing(listing, [k1]) == {}  # a pin on a revoked key trusts nothing
        resigned = c.get(f"/v1/emulators/{emu1}/signature", headers=h).json()
        assert resigned["key_id"] == k2 and signing.verify_signed_manifest(resigned, trusted)

        # --revoke-old: the replaced key is revoked at once (a leaked key).
        out = runner.invoke(cli, ["rotate-signing-key", "--revoke-old"], env=env)
        assert out.exit_code == 0, out.output
        k3 = out.stdout.strip().splitlines()[-1]
        status = {k["key_id"]: k["status"] for k in c.get("/v1/signing-keys", headers=h).json()["keys"]}
        assert status == {k1: "revoked", k2: "revoked", k3: "active"}
        assert c.get(f"/v1/emulators/{emu2}/signature", headers=h).json()["key_id"] == k3
    # A restart keeps the rotated key.
    with TestClient(create_app(settings)) as c:
        status = {k["key_id"]: k["status"] for k in c.get("/v1/signing-keys", headers=h).json()["keys"]}
        assert status[k3] == "active"


# ---------------------------------------------------------------- audit log


@pytest.mark.db
def test_audit_log_shows_who_downloaded_and_uploaded_what(world):
    c, emu = world.client, world.emulator["id"]
    admin = auth(world.keys["admin"])
    since = (datetime.now(UTC) - timedelta(milliseconds=1)).isoformat()
    assert c.get(f"/v1/emulators/{emu}/file", headers=auth(world.keys["alice"])).status_code == 200
    assert (
        c.get(f"/v1/emulators/{emu}/file", headers={**auth(world.keys["bob"]), "Range": "bytes=10-"}).status_code == 206
    )
    r = c.post(
        f"/v1/emulators/{emu}/adapters",
        headers=auth(world.keys["bob"]),
        files={"adapter": ("a.safetensors", io.BytesIO(adapter_bytes(world.adapter_tensors)))},
    )
    assert r.status_code == 202, r.text
    adapter_id = r.json()["adapter"]["id"]

    body = c.get("/v1/audit", headers=admin, params={"since": since}).json()
    got = {(e["org_name"], e["action"], e["target_id"]) for e in body["events"]}
    assert {
        ("alice", "download_emulator", emu),
        ("bob", "download_emulator", emu),
        ("bob", "upload_adapter", adapter_id),
    } <= got
    assert body["total"] == len(body["events"]) >= 3
    times = [e["created_at"] for e in body["events"]]
    assert times == sorted(times, reverse=True), "newest first"

    def query(**params):
        r = c.get("/v1/audit", headers=admin, params={"since": since, **params})
        assert r.status_code == 200, r.text
        return r.json()

    downloads = query(action="download_emulator", target_id=emu)["events"]
    assert {(e["org_name"], e["detail"]["start"]) for e in downloads} == {("alice", 0), ("bob", 10)}
    uploads = query(action="upload_adapter", org="bob")["events"]
    assert [e["target_id"] for e in uploads] == [adapter_id]
    assert uploads[0]["detail"]["emulator_id"] == emu and len(uploads[0]["detail"]["sha256"]) == 64
    assert query(org=world.org_ids["alice"], action="download_emulator")["total"] == 1  # org by id
    assert query(action="upload_adapter", org="alice")["events"] == []
    page = query(limit=1, offset=1)
    assert len(page["events"]) == 1 and page["total"] >= 3
    assert query(until=since)["total"] == 0
    assert c.get("/v1/audit", headers=admin, params={"org": "nobody-like-this"}).status_code == 404
    assert c.get("/v1/audit", headers=admin, params={"since": "yesterday"}).status_code == 422
    assert c.get("/v1/audit", headers=admin, params={"limit": 0}).status_code == 422
    for role in ("alice", "bob", "mallory"):
        assert c.get("/v1/audit", headers=auth(world.keys[role])).status_code == 403


# ---------------------------------------------------------------- request size limits


def _raw_request(app, method: str, path: str, headers: dict[str, str], chunks: list[bytes]) -> tuple[int, dict, int]:
    """Call the ASGI app directly; returns (status, JSON body, how many times `receive` was called)."""
    calls = [0]
    sent: list[dict] = []
    pending = list(chunks)

    async def receive():
        calls[0] += 1
        if not pending:
            return {"type": "http.request", "body": b"", "more_body": False}
        return {"type": "http.request", "body": pending.pop(0), "more_body": bool(pending)}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "client": ("127.0.0.1", 1),
        "server": ("testserver", 80),
        "state": {},
        "app": app,
        "headers": [(b"host", b"testserver")] + [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }
    anyio.run(app, scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], json.loads(body) if body else {}, calls[0]


def _concrete(path: str, world) -> str:
    return re.sub(
        r"\{[^}]+\}",
        lambda m: {
            "{model_id}": world.model_id,
            "{emulator_id}": world.emulator["id"],
            "{adapter_id}": world.adapter_id,
        }.get(m.group(0), "x"),
        path,
    )


@pytest.mark.db
def test_oversized_declared_body_is_refused_before_reading_on_every_route(world):
    app = world.client.app
    limit = world.settings.max_request_bytes
    checked = 0
    for method, path in sorted(app_routes(app)):
        if path in DOC_ROUTES or (method == "POST" and path.endswith("/adapters")):
            continue  # the upload route has its own (emulator-derived) caps: tests/server/test_uploads.py
        headers = {**auth(world.keys["admin"]), "content-type": "application/json", "content-length": str(limit + 1)}
        status, body, calls = _raw_request(app, method, _concrete(path, world), headers, [b"{}"])
        assert status == 413 and body["error"]["code"] == "payload_too_large", (method, path, status, body)
        assert calls == 0, f"{method} {path}: the body was read although Content-Length exceeded the limit"
        checked += 1
    assert checked >= 15


@pytest.mark.db
def test_streamed_json_body_is_cut_off_at_the_limit(world):
    """No Content-Length (chunked): reading stops as soon as the limit is passed; nothing is stored."""
    app = world.client.app
    limit = world.settings.max_request_bytes
    chunk = b" " * 65536
    n_chunks = limit // len(chunk) * 4
    with world.sessions() as s:
        before = crud.row_counts(s)
    status, body, calls = _raw_request(
        app, "POST", "/v1/models", {**auth(world.keys["admin"]), "content-type": "application/json"}, [chunk] * n_chunks
    )
    assert status == 413 and body["error"]["code"] == "payload_too_large", body
    assert calls <= limit // len(chunk) + 2 < n_chunks
    with world.sessions() as s:
        assert crud.row_counts(s) == before
    # Under the limit, JSON bodies work as before.
    r = world.client.post(
        "/v1/models", headers=auth(world.keys["admin"]), json={"name": "x" * 100, "path": "/nonexistent"}
    )
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_model"


@pytest.mark.db
def test_invalid_content_length_is_a_clean_400(world):
    status, body, calls = _raw_request(
        world.client.app, "POST", "/v1/emulators", {**auth(world.keys["admin"]), "content-length": "-5"}, [b"{}"]
    )
    assert status == 400 and body["error"]["code"] == "bad_request" and calls == 0


def test_request_limit_is_a_setting(tmp_path):
    settings = fast_settings(tmp_path, f"sqlite:///{tmp_path / 'db'}", max_request_bytes=4096)
    app = create_app(settings)
    status, body, calls = _raw_request(app, "POST", "/v1/models", {"content-length": "5000"}, [b"x"])
    assert status == 413 and calls == 0
    assert "4096" in body["error"]["message"]
