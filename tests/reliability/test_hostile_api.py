"""Hostile requests against the ASGI app: property-based fuzzing of every operation in the server's own
OpenAPI schema (schemathesis; positive and negative examples, bounded), and path traversal / NUL bytes /
odd names in every id and name field. Expected: a clean 4xx with the error shape, never a 5xx, nothing
stored, nothing written outside the data directory."""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, settings
from server_helpers import adapter_bytes, auth, data_dir_listing

from model_owner_server import crud

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed (pip install schemathesis)")

# Examples per operation and mode (generate: a fifth, each runs the model). SCALEOT_FUZZ_SCALE=10 for a
# longer run (docs/reliability.md).
FUZZ_EXAMPLES = max(1, int(30 * float(os.environ.get("SCALEOT_FUZZ_SCALE", "1"))))


def _operations() -> list[tuple[str, str]]:
    """(method, path) of every operation in the server's OpenAPI schema (collected from a fresh app)."""
    from model_owner_server.core.config import Settings
    from model_owner_server.main import create_app

    spec = create_app(Settings(_env_file=None, data_dir=Path("/nonexistent-not-used"))).openapi()
    return sorted((m.upper(), p) for p, ops in spec["paths"].items() for m in ops)


OPERATIONS = _operations()


@pytest.fixture(scope="module")
def fuzz_schema(world):
    return schemathesis.openapi.from_dict(world.client.app.openapi())


def _as_bytes(value) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass")
    return json.dumps(value, default=str).encode()


def _as_text(value) -> str:
    return value if isinstance(value, str) else _as_bytes(value).decode("utf-8", "replace")


def _file_part(value) -> tuple:
    """A requests-style multipart value (negative examples put ints, lists... there) as bytes for httpx."""
    if isinstance(value, tuple) and len(value) >= 2:
        filename = None if value[0] is None else _as_text(value[0])
        return (filename, _as_bytes(value[1]), *value[2:3])
    return (None, _as_bytes(value))


def send_case(client, case, headers: dict[str, str]):
    """Send a schemathesis case with an httpx/TestClient client; its random auth header is replaced."""
    kwargs = case.as_transport_kwargs(base_url="http://testserver")
    sent = {
        k: v
        for k, v in (kwargs.get("headers") or {}).items()
        if k.lower() not in ("authorization", "content-length", "host", "connection")
    }
    sent.update(headers)
    body = {}
    if kwargs.get("json") is not None:
        body["json"] = kwargs["json"]
    if kwargs.get("files"):
        body["files"] = [(str(name), _file_part(value)) for name, value in kwargs["files"]]
        if isinstance(kwargs.get("data"), dict):
            body["data"] = {str(k): _as_text(v) for k, v in kwargs["data"].items()}
    elif isinstance(kwargs.get("data"), dict):
        body["data"] = kwargs["data"]
    elif kwargs.get("data") is not None:
        data = kwargs["data"]
        body["content"] = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    url = kwargs["url"].removeprefix("http://testserver")
    return client.request(kwargs["method"], url, params=kwargs.get("params") or None, headers=sent, **body)


@pytest.mark.db
@pytest.mark.parametrize("mode", ["positive", "negative"])
@pytest.mark.parametrize("method,path", OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_fuzzed_requests_never_get_a_server_error(world, fuzz_schema, method, path, mode):
    """Schema-driven examples (valid ones, and ones violating the schema), half of them with real ids in
    the path so they reach the handlers' own checks; sent with the admin key (the most reachable code)."""
    from hypothesis import given
    from hypothesis import strategies as st

    op = fuzz_schema[path][method]
    gen_mode = schemathesis.GenerationMode(mode)
    real = {
        "model_id": world.model_id,
        "emulator_id": world.emulator["id"],
        "adapter_id": world.adapter_id,
        "job_id": world.eval_job_id,
    }
    params = {k: v for k, v in real.items() if "{" + k + "}" in path}
    strategy = op.as_strategy(gen_mode)
    if params:
        strategy = st.one_of(strategy, op.as_strategy(gen_mode, path_parameters=params))

    if gen_mode is schemathesis.GenerationMode.NEGATIVE and not (op.path_parameters or op.query or op.body):
        pytest.skip("nothing in this operation's schema can be violated")

    @given(case=strategy)
    @settings(
        max_examples=FUZZ_EXAMPLES // 5 if path.endswith("/generate") else FUZZ_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case):
        r = send_case(world.client, case, auth(world.keys["admin"]))
        assert r.status_code < 500, f"{case.method} {case.formatted_path}: {r.status_code} {r.text[:500]}"
        if r.status_code >= 400 and method != "HEAD":
            err = r.json()["error"]
            assert err["code"] and err["message"], r.text

    try:
        run()
    finally:  # a valid fuzzed policy (PUT) must not outlive this test: later tests download the world's emulator
        if path.endswith("/emulator-policy"):
            world.client.delete(f"/v1/models/{world.model_id}/emulator-policy", headers=auth(world.keys["admin"]))


# ---------------------------------------------------------------- path traversal and odd ids

HOSTILE = [
    "../../etc/passwd",
    "..%2f..%2fetc%2fpasswd",
    "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "..",
    ".",
    "a/b",
    "a\x00b",
    "\x00",
    "....//....//etc/passwd",
    "..\\..\\windows\\win.ini",
    "emu_../../x",
    "%252e%252e%252f",
    "~root",
    "$(id)",
    "'; DROP TABLE jobs; --",
    "x" * 1000,
    "\u202e\ufeff",
    "%ED%A0%BD",
    "%FF%FE",
    "/etc/passwd",
    "file:///etc/passwd",
    "C:\\Windows\\system.ini",
]
BODIES = {
    "/grants": {"json": {"org": "alice"}},
    "/importance": {"json": {"steps": 1}},
    "/generate": {"json": {"prompt": "x", "max_new_tokens": 1}},
    "/adapters": {"files": {"adapter": ("a.safetensors", b"\0" * 16)}},
}


def _id_routes(world) -> list[tuple[str, str]]:
    from test_security import DOC_ROUTES, app_routes

    # /console routes answer HTML to a session cookie: tests/console/test_console_access.py sends them these ids.
    return sorted(
        (m, p)
        for m, p in app_routes(world.client.app)
        if "{" in p and p not in DOC_ROUTES and not p.startswith("/console")
    )


def _snapshot(world, outside: Path):
    """Rows, every file of the world's data dir, and what stands next to it (where `..` in an id would land).
    Only the top level next to it: the folders there belong to other tests, whose job threads may still be
    finishing and would make a deep listing change under this test."""
    with world.sessions() as s:
        counts = crud.row_counts(s)
    return counts, data_dir_listing(world.settings.resolved_data_dir), sorted(str(p) for p in outside.iterdir())


@pytest.mark.db
def test_hostile_ids_in_every_path_parameter(world):
    """Every route with an id in its path, every hostile value: (a) as the ASGI app receives it from a
    server after percent-decoding (raw: slashes, dots and NUL bytes intact), (b) percent-encoded through an
    HTTP client. Always a clean 4xx (mostly 404), never a 5xx, nothing stored or written anywhere."""
    from test_security import _raw_request

    app, admin = world.client.app, auth(world.keys["admin"])
    outside = world.settings.resolved_data_dir.parent
    before = _snapshot(world, outside)
    answered = 0
    for method, template in _id_routes(world):
        body = next((b for suffix, b in BODIES.items() if template.endswith(suffix)), {})
        raw_body = json.dumps(body.get("json", {})).encode()
        for value in HOSTILE:
            path = re.sub(r"\{[^}]+\}", lambda _, v=value: v, template)
            status, err, _ = _raw_request(
                app,
                method,
                path,
                {**admin, "content-type": "application/json", "content-length": str(len(raw_body))},
                [raw_body],
            )
            assert 400 <= status < 500, f"raw {method} {path!r}: {status} {err}"
            assert method == "HEAD" or err["error"]["code"], err
            for encoded in {quote(value, safe=""), quote(value, safe="/%")}:
                path = re.sub(r"\{[^}]+\}", lambda _, v=encoded: v, template)
                r = world.client.request(method, path, headers=admin, follow_redirects=False, **body)
                if r.request.url.raw_path.decode().split("?")[0] != path:
                    # The client itself resolved "." / ".." segments: another URL reached the server.
                    assert r.status_code < 500, (method, path, r.status_code)
                    continue
                if 300 <= r.status_code < 400:
                    # Starlette's TestClient decodes the path twice ("%252e" -> "."), so a trailing-slash
                    # redirect can appear here; it stays on this server. The raw ASGI check above is exact.
                    assert r.headers["location"].startswith("http://testserver/"), r.headers
                    continue
                assert 400 <= r.status_code < 500, f"{method} {path!r}: {r.status_code} {r.text[:300]}"
                if method != "HEAD":
                    assert r.json()["error"]["code"], r.text
                answered += 1
    assert answered > 200
    assert _snapshot(world, outside) == before, "a hostile id changed stored state or wrote a file"


@pytest.mark.db
def test_hostile_names_in_bodies_and_queries(world):
    c, admin = world.client, auth(world.keys["admin"])
    outside = world.settings.resolved_data_dir.parent
    before = _snapshot(world, outside)
    for value in HOSTILE:
        for method, path, kwargs, ok in [
            ("POST", f"/v1/models/{world.model_id}/grants", {"json": {"org": value}}, {404, 422}),
            ("POST", "/v1/models", {"json": {"name": value, "path": value}}, {422}),
            ("POST", "/v1/models", {"json": {"name": "ok", "path": "../" * 12 + "etc"}}, {422}),
            ("POST", f"/v1/models/{world.model_id}/importance", {"json": {"steps": 1, "corpus": value}}, {422}),
            (
                "POST",
                "/v1/emulators",
                {"json": {"model_id": value, "n_adapter": 1, "alpha": 0.5, "beta": 0.5}},
                {404, 422},
            ),
            ("GET", "/v1/audit", {"params": {"org": value}}, {404, 422}),
            ("GET", "/v1/audit", {"params": {"target_id": value[:40], "action": value[:50]}}, {200, 422}),
            ("GET", "/v1/jobs", {"params": {"limit": value}}, {422}),
        ]:
            r = c.request(method, path, headers=admin, **kwargs)
            assert r.status_code in ok, f"{method} {path} {kwargs}: {r.status_code} {r.text[:300]}"
    assert _snapshot(world, outside) == before


@pytest.mark.db
def test_hostile_upload_file_names_never_reach_the_file_system(world):
    """The client's file names are ignored: only the server's own names exist on disk afterwards."""
    data_dir = world.settings.resolved_data_dir
    outside = data_dir.parent
    before_outside = sorted(str(p) for p in outside.rglob("*") if data_dir not in p.parents and p != data_dir)
    good = adapter_bytes(world.adapter_tensors)
    names = [
        ("../../../../evil.safetensors", "../../evil.txt"),
        ("/tmp/evil.safetensors", "/tmp/evil.jsonl"),
        ("evil\x00.safetensors", "a/b/c.txt"),
        ("x" * 600 + ".safetensors", "..\\..\\evil.txt"),
        (".safetensors", "NOTES.TXT"),
    ]
    for adapter_name, eval_name in names:
        content = b'{"text": "some words here"}\n' * 5 if eval_name.endswith(".jsonl") else b"some words " * 20
        before = data_dir_listing(data_dir)
        r = c_post = world.client.post(
            f"/v1/emulators/{world.emulator['id']}/adapters",
            headers=auth(world.keys["bob"]),
            files={"adapter": (adapter_name, io.BytesIO(good)), "eval_data": (eval_name, io.BytesIO(content))},
        )
        assert c_post.status_code == 202, r.text
        new = set(data_dir_listing(data_dir)) - set(before)
        adapter_id = r.json()["adapter"]["id"]
        suffix = Path(eval_name.replace("\\", "/")).suffix.lower()
        assert new == {f"adapters/{adapter_id}/adapter.safetensors", f"adapters/{adapter_id}/eval{suffix}"}, new
    after_outside = sorted(str(p) for p in outside.rglob("*") if data_dir not in p.parents and p != data_dir)
    assert after_outside == before_outside
    assert not list((data_dir / "tmp").iterdir())
    # An eval file whose (hostile) name has a suffix that is not allowed is refused, with nothing kept.
    before = data_dir_listing(data_dir)
    r = world.client.post(
        f"/v1/emulators/{world.emulator['id']}/adapters",
        headers=auth(world.keys["bob"]),
        files={"adapter": ("a.safetensors", io.BytesIO(good)), "eval_data": ("evil.txt\x00.sh", io.BytesIO(b"x"))},
    )
    assert r.status_code == 422 and r.json()["error"]["code"] == "unsupported_file_type", r.text
    assert data_dir_listing(data_dir) == before
    # So is one whose name no file system would take (600 characters).
    r = world.client.post(
        f"/v1/emulators/{world.emulator['id']}/adapters",
        headers=auth(world.keys["bob"]),
        files={"adapter": ("a.safetensors", io.BytesIO(good)), "eval_data": ("x" * 600 + ".txt", io.BytesIO(b"x"))},
    )
    assert r.status_code == 422 and r.json()["error"]["code"] == "unsupported_file_type", r.text
    assert data_dir_listing(data_dir) == before
