"""Every endpoint x every role: admin, granted data owner (alice), other data owner (mallory, not
granted), no key. Requests are chosen so that passing authorization never changes stored state
(e.g. admin writes use invalid input and stop at validation)."""

from __future__ import annotations

import pytest
from server_helpers import auth

ROLES = ("admin", "alice", "mallory", "none")

# (name, method, path template, request kwargs, expected status per role in ROLES order)
MATRIX = [
    ("healthz", "GET", "/healthz", {}, (200, 200, 200, 200)),
    ("signing keys", "GET", "/v1/signing-keys", {}, (200, 200, 200, 401)),
    ("list models", "GET", "/v1/models", {}, (200, 200, 200, 401)),
    (
        "register model",
        "POST",
        "/v1/models",
        {"json": {"name": "x", "path": "/nonexistent/model"}},
        (422, 403, 403, 401),
    ),
    ("get model", "GET", "/v1/models/{model}", {}, (200, 200, 404, 401)),
    ("grant", "POST", "/v1/models/{model}/grants", {"json": {"org": "alice"}}, (201, 403, 403, 401)),
    ("emulator policy", "GET", "/v1/models/{model}/emulator-policy", {}, (200, 200, 404, 401)),
    (
        "set emulator policy (invalid)",
        "PUT",
        "/v1/models/{model}/emulator-policy",
        {"json": {"min_alpha": 2}},
        (422, 403, 403, 401),
    ),
    ("reset emulator policy", "DELETE", "/v1/models/{model}/emulator-policy", {}, (200, 403, 403, 401)),
    (
        "importance",
        "POST",
        "/v1/models/{model}/importance",
        {"json": {"steps": 1, "corpus": "/nonexistent.txt"}},
        (422, 403, 403, 401),
    ),
    ("list jobs", "GET", "/v1/jobs", {}, (200, 200, 200, 401)),
    ("admin's job", "GET", "/v1/jobs/{importance_job}", {}, (200, 404, 404, 401)),
    ("alice's job", "GET", "/v1/jobs/{eval_job}", {}, (200, 200, 404, 401)),
    (
        "create emulator (existing)",
        "POST",
        "/v1/emulators",
        {"json": {"model_id": "{model}", "n_adapter": 2, "alpha": 0.5, "beta": 0.5}},
        (200, 200, 404, 401),
    ),
    ("list emulators", "GET", "/v1/emulators", {}, (200, 200, 200, 401)),
    ("get emulator", "GET", "/v1/emulators/{emulator}", {}, (200, 200, 404, 401)),
    ("download emulator", "GET", "/v1/emulators/{emulator}/file", {}, (200, 200, 404, 401)),
    ("emulator file headers", "HEAD", "/v1/emulators/{emulator}/file", {}, (200, 200, 404, 401)),
    ("signature", "GET", "/v1/emulators/{emulator}/signature", {}, (200, 200, 404, 401)),
    (
        "privacy audit (corpus missing)",
        "POST",
        "/v1/emulators/{emulator}/privacy-audit",
        {"json": {"steps": 1, "corpus": "/nonexistent.txt"}},
        (422, 403, 403, 401),
    ),
    ("upload info", "GET", "/v1/emulators/{emulator}/upload-info", {}, (200, 200, 404, 401)),
    (
        "upload adapter (no adapter part)",
        "POST",
        "/v1/emulators/{emulator}/adapters",
        {"files": {"metrics": (None, "{}")}},
        (422, 422, 404, 401),
    ),
    ("list adapters", "GET", "/v1/adapters", {}, (200, 200, 200, 401)),
    ("get adapter", "GET", "/v1/adapters/{adapter}", {}, (200, 200, 404, 401)),
    (
        "benchmark (no tasks)",
        "POST",
        "/v1/adapters/{adapter}/benchmarks",
        {"json": {"tasks": []}},
        (422, 403, 403, 401),
    ),
    (
        "generate",
        "POST",
        "/v1/adapters/{adapter}/generate",
        {"json": {"prompt": "the", "max_new_tokens": 2}},
        (200, 200, 404, 401),
    ),
    ("openai models", "GET", "/openai/v1/models", {}, (200, 200, 200, 401)),
    ("openai model", "GET", "/openai/v1/models/{adapter}", {}, (200, 200, 404, 401)),
    (
        "openai completion",
        "POST",
        "/openai/v1/completions",
        {"json": {"model": "{adapter}", "prompt": "the", "max_tokens": 2}},
        (200, 200, 404, 401),
    ),
    (
        "openai chat (the tiny tokenizer has no chat template)",
        "POST",
        "/openai/v1/chat/completions",
        {"json": {"model": "{adapter}", "messages": [{"role": "user", "content": "hi"}]}},
        (400, 400, 404, 401),
    ),
    ("unknown job id", "GET", "/v1/jobs/job_doesnotexist", {}, (404, 404, 404, 401)),
    ("cancel a finished job", "POST", "/v1/jobs/{eval_job}/cancel", {}, (409, 409, 404, 401)),
    ("audit log", "GET", "/v1/audit", {}, (200, 403, 403, 401)),
    ("audit chain check", "GET", "/v1/audit/verify", {}, (200, 403, 403, 401)),
    # Key lifecycle: an admin manages every organization's keys, a data owner only its own (others: 404).
    ("list alice's keys", "GET", "/v1/orgs/alice/keys", {}, (200, 200, 404, 401)),
    (
        "create a key for alice (invalid expiry)",
        "POST",
        "/v1/orgs/alice/keys",
        {"json": {"expires_in_days": 0}},
        (422, 422, 422, 401),
    ),
    ("revoke an unknown key of alice", "DELETE", "/v1/orgs/alice/keys/key_doesnotexist", {}, (404, 404, 404, 401)),
    (
        "rotate an unknown key of alice",
        "POST",
        "/v1/orgs/alice/keys/key_doesnotexist/rotate",
        {"json": {}},
        (404, 404, 404, 401),
    ),
    ("delete an unknown organization", "DELETE", "/v1/orgs/org_doesnotexist", {}, (404, 403, 403, 401)),
    ("revoke a grant never given", "DELETE", "/v1/models/{model}/grants/mallory", {}, (404, 403, 403, 401)),
]


def _fill(value, ids):
    if isinstance(value, str):
        return value.format(**ids)
    if isinstance(value, dict):
        return {k: _fill(v, ids) for k, v in value.items()}
    return value


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("name,method,path,kwargs,expected", MATRIX, ids=[m[0] for m in MATRIX])
def test_access(world, role, name, method, path, kwargs, expected):
    ids = {
        "model": world.model_id,
        "emulator": world.emulator["id"],
        "adapter": world.adapter_id,
        "importance_job": world.importance_job_id,
        "eval_job": world.eval_job_id,
    }
    r = world.client.request(method, path.format(**ids), headers=auth(world.keys[role]), **_fill(kwargs, ids))
    want = expected[ROLES.index(role)]
    assert r.status_code == want, f"{name} as {role}: {r.status_code} {r.text[:300]}"
    if r.status_code >= 400 and method != "HEAD":  # a HEAD answer has no body
        err = r.json()["error"]
        assert err["code"] and err["message"]
    if r.status_code == 401:
        assert r.headers.get("www-authenticate") == "Bearer"


def test_listings_are_scoped(world):
    c = world.client
    assert c.get("/v1/models", headers=auth(world.keys["mallory"])).json() == {"models": []}
    for listing in ("emulators", "adapters", "jobs"):  # paged listings: empty, and no next page
        page = c.get(f"/v1/{listing}", headers=auth(world.keys["mallory"])).json()
        assert page[listing] == [] and page["next_cursor"] is None, page
    # bob is granted the same model: he sees it and its emulator, but none of alice's adapters or jobs.
    bob = auth(world.keys["bob"])
    assert [m["id"] for m in c.get("/v1/models", headers=bob).json()["models"]] == [world.model_id]
    assert world.emulator["id"] in {e["id"] for e in c.get("/v1/emulators", headers=bob).json()["emulators"]}
    assert world.adapter_id not in {a["id"] for a in c.get("/v1/adapters", headers=bob).json()["adapters"]}
    assert c.get(f"/v1/adapters/{world.adapter_id}", headers=bob).status_code == 404
    assert c.get(f"/v1/jobs/{world.eval_job_id}", headers=bob).status_code == 404
    assert (
        c.post(
            f"/v1/adapters/{world.adapter_id}/generate", headers=bob, json={"prompt": "x", "max_new_tokens": 1}
        ).status_code
        == 404
    )
    admin_jobs = {j["id"] for j in c.get("/v1/jobs", headers=auth(world.keys["admin"])).json()["jobs"]}
    assert world.eval_job_id in admin_jobs


def test_bad_keys(world):
    c = world.client
    for headers in (
        {"Authorization": "Bearer sot_wrong"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer " + "x" * 5000},
    ):
        r = c.get("/v1/models", headers=headers)
        assert r.status_code == 401, (headers, r.text)
        assert r.json()["error"]["code"] == "unauthorized"
