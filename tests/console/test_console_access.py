"""Every /console route needs a session (the console's counterpart of the bearer-key access matrix, which
tests/reliability/test_security.py applies to the API), admin pages refuse data owners, other organizations'
objects are 404, and sessions expire on the server."""

from __future__ import annotations

import re
from datetime import timedelta

from sqlalchemy import update
from test_security import app_routes

from model_owner_server.models import ConsoleSession, utcnow

# Every console route and who may use it. A new route fails the first test until it is listed here.
PUBLIC = {("GET", "/console"), ("GET", "/console/login"), ("POST", "/console/login")}
ADMIN = {
    ("GET", "/console/audit"),
    ("POST", "/console/models"),
    ("POST", "/console/models/{model_id}/grants"),
    ("POST", "/console/models/{model_id}/importance"),
}
SIGNED_IN = {
    ("GET", "/console/models"),
    ("GET", "/console/importance"),
    ("GET", "/console/importance/{run_id}"),
    ("GET", "/console/emulators"),
    ("POST", "/console/emulators"),
    ("GET", "/console/emulators/{emulator_id}"),
    ("GET", "/console/jobs"),
    ("GET", "/console/jobs/rows"),
    ("POST", "/console/jobs/{job_id}/cancel"),
    ("GET", "/console/adapters"),
    ("GET", "/console/adapters/{adapter_id}"),
    ("POST", "/console/adapters/{adapter_id}/generate"),
    ("GET", "/console/keys"),
    ("POST", "/console/logout"),
}


def _ids(world) -> dict[str, str]:
    return {
        "model_id": world.model_id,
        "emulator_id": world.emulator["id"],
        "adapter_id": world.adapter_id,
        "job_id": world.eval_job_id,
        "run_id": "imp_x",
    }


def sign_in(client, key: str) -> str:
    """Sign in through the form (double-submit CSRF cookie); return the session's CSRF token."""
    page = client.get("/console/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    r = client.post("/console/login", data={"api_key": key, "csrf_token": token}, follow_redirects=False)
    assert r.status_code == 303, r.text
    return re.search(r'name="csrf_token" value="([^"]+)"', client.get("/console/keys").text).group(1)


def test_every_console_route_needs_a_session(world):
    client = world.client
    client.cookies.clear()
    routes = {(m, p) for m, p in app_routes(client.app) if p.startswith("/console")}
    assert routes == PUBLIC | ADMIN | SIGNED_IN, "a console route without an access rule: list it above"
    for method, path in sorted(ADMIN | SIGNED_IN):
        r = client.request(method, path.format(**_ids(world)), data={"csrf_token": "x"}, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"].startswith("/console/login?next="), (method, path)


def test_data_owners_get_no_admin_pages_and_no_other_organizations_objects(world):
    client = world.client
    client.cookies.clear()
    csrf = sign_in(client, world.keys["alice"])
    assert client.get("/console/audit").status_code == 403
    r = client.post(f"/console/models/{world.model_id}/grants", data={"org": "mallory", "csrf_token": csrf})
    assert r.status_code == 403 and "admin" in r.text
    assert client.get(f"/console/adapters/{world.adapter_id}").status_code == 200  # alice's own
    client.cookies.clear()
    sign_in(client, world.keys["mallory"])  # not granted the model
    for path in (
        f"/console/emulators/{world.emulator['id']}",
        f"/console/adapters/{world.adapter_id}",
        f"/console/importance/{world.importance_job_id}",
    ):
        assert client.get(path).status_code == 404, path
    assert world.emulator["id"] not in client.get("/console/emulators").text
    client.cookies.clear()


def test_sessions_expire_on_the_server(world):
    client = world.client
    client.cookies.clear()
    sign_in(client, world.keys["bob"])
    assert client.get("/console/models").status_code == 200
    with world.sessions() as s:  # what the browser holds does not matter: the server's expiry does
        s.execute(update(ConsoleSession).values(expires_at=utcnow() - timedelta(seconds=1)))
        s.commit()
    r = client.get("/console/models", follow_redirects=False)
    assert r.status_code == 303 and "expired" in r.headers["location"]
    with world.sessions() as s:
        assert s.query(ConsoleSession).filter(ConsoleSession.org_id == world.org_ids["bob"]).count() == 0
    client.cookies.clear()


def test_cookies_are_httponly_strict_and_secure_over_https(world):
    from fastapi.testclient import TestClient

    for base, secure in (("http://testserver", False), ("https://testserver", True)):
        header = TestClient(world.client.app, base_url=base).get("/console/login").headers["set-cookie"].lower()
        assert "httponly" in header and "samesite=strict" in header and "path=/console" in header
        assert ("; secure" in header) is secure, (base, header)


def test_hostile_ids_in_console_paths_are_clean_4xx_and_change_nothing(world):
    """The API's hostile-id check (tests/reliability/test_hostile_api.py) for the console, signed in as admin
    with a valid CSRF token: every id-bearing console route answers a 4xx page, never a 5xx, stores nothing."""
    from urllib.parse import quote

    from test_hostile_api import HOSTILE, _snapshot

    client = world.client
    client.cookies.clear()
    csrf = sign_in(client, world.keys["admin"])
    outside = world.settings.resolved_data_dir.parent
    before = _snapshot(world, outside)
    routes = sorted((m, p) for m, p in ADMIN | SIGNED_IN if "{" in p)
    for method, template in routes:
        for value in HOSTILE:
            path = re.sub(r"\{[^}]+\}", quote(value, safe="").replace("\\", "\\\\"), template)
            r = client.request(
                method, path, data={"csrf_token": csrf, "prompt": "x", "org": "bob"}, follow_redirects=False
            )
            if r.request.url.raw_path.decode().split("?")[0] != path:
                assert r.status_code < 500, (method, path, r.status_code)  # the client resolved "." / ".."
                continue
            assert 400 <= r.status_code < 500, f"{method} {path!r}: {r.status_code} {r.text[:300]}"
    assert _snapshot(world, outside) == before, "a hostile id changed stored state or wrote a file"
    client.cookies.clear()
