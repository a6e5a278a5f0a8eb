"""Error shape, health, OpenAPI, migrations, and CLI-level org/model management."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from fastapi.testclient import TestClient
from server_helpers import auth, fast_settings
from sqlalchemy import create_engine

from model_owner_server import crud
from model_owner_server.core.db import run_migrations
from model_owner_server.core.security import hash_api_key
from model_owner_server.main import create_app
from model_owner_server.models import ApiKey, Base


def test_error_shape_everywhere(world):
    c, h = world.client, auth(world.keys["admin"])
    cases = [
        (c.get("/v1/nope", headers=h), 404),
        (c.delete("/v1/models", headers=h), 405),
        (
            c.post(
                "/v1/models",
                headers=h,
                content=b"{not json",
            ),
            422,
        ),
        (c.post("/v1/models", headers=h, json={"name": ""}), 422),
        (c.post(f"/v1/models/{world.model_id}/importance", headers=h, json={"steps": 0}), 422),
        (c.post(f"/v1/models/{world.model_id}/importance", headers=h, json={"steps": 2, "rl_interval": 0}), 422),
        (c.post(f"/v1/models/{world.model_id}/importance", headers=h, json={"steps": 2, "warmup_steps": -1}), 422),
        (c.get("/v1/models/mdl_nope", headers=h), 404),
        (c.post(f"/v1/models/{world.model_id}/grants", headers=h, json={"org": "no-such-org"}), 404),
        (c.get("/v1/models"), 401),
    ]
    for r, status in cases:
        assert r.status_code == status, r.text
        body = r.json()
        assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
        assert body["error"]["message"]


def test_register_model_rejects_bad_folders(world, tmp_path):
    c, h = world.client, auth(world.keys["admin"])
    (tmp_path / "empty").mkdir()
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    (no_tokenizer / "config.json").write_text('{"model_type": "llama"}')
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text('{"model_type": "llama"}')
    (no_weights / "tokenizer.json").write_text("{}")
    unsupported = tmp_path / "bert"
    unsupported.mkdir()
    (unsupported / "config.json").write_text('{"model_type": "bert"}')
    (unsupported / "tokenizer.json").write_text("{}")
    (unsupported / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    for folder, words in (
        (tmp_path / "missing", "does not exist"),
        (tmp_path / "empty", "config.json"),
        (no_tokenizer, "tokenizer"),
        (no_weights, "safetensors"),
        (unsupported, "not supported"),
    ):
        r = c.post("/v1/models", headers=h, json={"name": f"bad-{folder.name}", "path": str(folder)})
        assert r.status_code == 422 and words in r.json()["error"]["message"], r.text


def test_healthz_and_openapi(world):
    r = world.client.get("/healthz")
    assert r.status_code == 200 and r.json()["database"] == "ok"
    spec = world.client.get("/openapi.json").json()
    for path in (
        "/v1/signing-keys",
        "/v1/models",
        "/v1/models/{model_id}/grants",
        "/v1/models/{model_id}/importance",
        "/v1/jobs/{job_id}",
        "/v1/emulators",
        "/v1/emulators/{emulator_id}/file",
        "/v1/emulators/{emulator_id}/signature",
        "/v1/emulators/{emulator_id}/adapters",
        "/v1/adapters",
        "/v1/adapters/{adapter_id}",
        "/v1/adapters/{adapter_id}/generate",
        "/healthz",
    ):
        assert path in spec["paths"], path
    upload = spec["paths"]["/v1/emulators/{emulator_id}/adapters"]["post"]
    assert "adapter" in upload["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]


def test_api_keys_are_stored_hashed(world):
    with world.sessions() as s:
        stored = {k.key_hash for k in s.query(ApiKey).all()}
    for key in world.keys.values():
        if key:
            assert hash_api_key(key) in stored and key not in stored


def test_migrations_match_models(new_database_url):
    url = new_database_url()
    run_migrations(url)
    run_migrations(url)  # idempotent
    engine = create_engine(url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": False}), Base.metadata)
    engine.dispose()
    assert diff == [], diff


def test_org_creation_rules(tmp_path, new_database_url):
    settings = fast_settings(tmp_path / "data", new_database_url())
    with TestClient(create_app(settings)) as c:
        with c.app.state.sessions() as s:
            _, key = crud.create_org(s, "acme", "data-owner")
            s.commit()
            for name, role in (("acme", "data-owner"), ("x", "superuser"), ("  ", "admin")):
                try:
                    crud.create_org(s, name, role)
                except (ValueError, crud.Conflict):
                    s.rollback()
                else:
                    raise AssertionError(f"{name!r}/{role!r} accepted")
        assert key.startswith("sot_") and len(key) > 40
        assert c.get("/v1/models", headers=auth(key)).json() == {"models": []}
        assert c.post("/v1/models", headers=auth(key), json={"name": "n", "path": "/p"}).status_code == 403
