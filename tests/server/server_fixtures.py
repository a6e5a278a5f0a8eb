"""The server tests' fixtures (`new_database_url`, `files`, `world`) as a plain module, so that both
tests/server/conftest.py and tests/reliability/conftest.py import them the normal way.

Database: SQLite files in tmp by default; set SCALEOT_TEST_DATABASE_URL (e.g.
postgresql+psycopg://postgres@127.0.0.1:5432/test) to run on PostgreSQL: every database the tests
need is a fresh schema (`scaleot_test_<random>`) in that database, dropped afterwards, so concurrent
runs never collide.

Expensive things (tiny model, importance run, emulator, one evaluated adapter) are session-scoped in
`world`; tests that change state compare row counts / file listings rather than absolute contents.
"""

from __future__ import annotations

import io
import os
import random
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from server_helpers import World, adapter_bytes, auth, fast_settings
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from model_owner_server.main import create_app

BASE_DB_URL = os.environ.get("SCALEOT_TEST_DATABASE_URL", "").strip()
WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "merry",
    "kings",
    "sing",
    "of",
    "ancient",
    "ships",
    "and",
    "silver",
    "rivers",
    "under",
    "the",
    "pale",
    "moon",
]


def _words(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="session")
def new_database_url(tmp_path_factory) -> Iterator[Callable[[], str]]:
    """Factory of fresh, empty databases: a SQLite file, or on PostgreSQL a new schema
    (`scaleot_test_<random>`, selected through the connection's search_path) that is dropped at the end.
    Schemas rather than databases: creating and dropping them is instant and needs no backend kills."""
    created: list[str] = []

    def make() -> str:
        if not BASE_DB_URL:
            return f"sqlite:///{tmp_path_factory.mktemp('db') / 'scaleot.db'}"
        name = f"scaleot_test_{secrets.token_hex(6)}"
        admin = create_engine(BASE_DB_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE SCHEMA "{name}"'))
        admin.dispose()
        created.append(name)
        url = make_url(BASE_DB_URL)
        return url.update_query_dict({"options": f"-csearch_path={name}"}).render_as_string(hide_password=False)

    yield make
    if created:
        admin = create_engine(BASE_DB_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            for name in created:
                conn.execute(text(f'DROP SCHEMA IF EXISTS "{name}" CASCADE'))
        admin.dispose()


@pytest.fixture(scope="session")
def files(tmp_path_factory) -> dict[str, Path]:
    """A tiny LLaMA folder, a corpus and an eval text file."""
    from scaleot_samples.tiny import save_tiny_model_dir

    root = tmp_path_factory.mktemp("inputs")
    model_dir = save_tiny_model_dir(root / "tiny-llama", "llama", n_layers=4, hidden=32)
    corpus = root / "corpus.txt"
    corpus.write_text(_words(3000, 1))
    eval_file = root / "eval.txt"
    eval_file.write_text(_words(400, 2))
    return {"model": model_dir, "corpus": corpus, "eval": eval_file, "root": root}


@pytest.fixture(scope="session")
def world(tmp_path_factory, new_database_url, files) -> Iterator[World]:
    """One server app (immediate jobs) with orgs admin / alice (granted) / bob (granted) / mallory (not
    granted), the tiny model registered, an importance run, an emulator and alice's evaluated adapter."""
    from model_owner_server import crud

    settings = fast_settings(tmp_path_factory.mktemp("data"), new_database_url(), default_eval=files["eval"])
    app = create_app(settings)
    with TestClient(app) as client:
        keys: dict[str, str | None] = {"none": None}
        w = World(client, settings, keys)
        with app.state.sessions() as s:
            for name, role in (
                ("admin", "admin"),
                ("alice", "data-owner"),
                ("bob", "data-owner"),
                ("mallory", "data-owner"),
            ):
                org, key = crud.create_org(s, name, role)
                keys[name], w.org_ids[name] = key, org.id
            s.commit()
        h = auth(keys["admin"])
        r = client.post("/v1/models", headers=h, json={"name": "tiny", "path": str(files["model"])})
        assert r.status_code == 201, r.text
        w.model_id = r.json()["id"]
        for org in ("alice", "bob"):
            assert client.post(f"/v1/models/{w.model_id}/grants", headers=h, json={"org": org}).status_code == 201
        r = client.post(
            f"/v1/models/{w.model_id}/importance",
            headers=h,
            json={"steps": 4, "corpus": str(files["corpus"]), "warmup_steps": 1, "rl_interval": 2},
        )
        assert r.status_code == 202, r.text
        w.importance_job_id = r.json()["id"]
        job = client.get(f"/v1/jobs/{w.importance_job_id}", headers=h).json()
        assert job["status"] == "succeeded", job
        r = client.post(
            "/v1/emulators",
            headers=auth(keys["alice"]),
            json={"model_id": w.model_id, "n_adapter": 2, "alpha": 0.5, "beta": 0.5},
        )
        assert r.status_code in (200, 202), r.text
        w.emulator = r.json()["emulator"]
        assert w.emulator["status"] == "ready", r.json()
        r = client.get(f"/v1/emulators/{w.emulator['id']}/file", headers=auth(keys["alice"]))
        assert r.status_code == 200
        w.emulator_bytes = r.content
        emu_path = files["root"] / "downloaded.safetensors"
        emu_path.write_bytes(w.emulator_bytes)
        from shared.adapter import extract_adapter
        from shared.emulator_file import load_emulator

        loaded = load_emulator(emu_path)
        w.adapter_tensors = extract_adapter(loaded.model, loaded.plan.adapter_layers)
        r = client.post(
            f"/v1/emulators/{w.emulator['id']}/adapters",
            headers=auth(keys["alice"]),
            files={"adapter": ("adapter.safetensors", io.BytesIO(adapter_bytes(w.adapter_tensors)))},
        )
        assert r.status_code == 202, r.text
        w.adapter_id, w.eval_job_id = r.json()["adapter"]["id"], r.json()["job"]["id"]
        yield w
