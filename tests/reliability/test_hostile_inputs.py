"""Hostile JSON, headers and failures (issue 20, findings 5 and 8): client JSON is bounded before it is
stored and rendered safely when an old row is not; the Range header parses in linear time; console charts
draw only finite numbers; a failed job shows data owners a generic message (admins get the full text);
every answer carries the security headers, and the console's CSP admits exactly its own inline code."""

from __future__ import annotations

import io
import json
import random
import re
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from server_helpers import adapter_bytes, auth, data_dir_listing
from sqlalchemy import delete, func, select

from model_owner_server.api.headers import (
    CONSOLE_CSP,
    CONSOLE_INLINE,
    HTMX_INDICATOR_CSS,
    SecurityHeadersMiddleware,
    csp_hash,
)
from model_owner_server.api.json_bounds import JsonBounds, JsonBoundsError, parse_bounded, readable
from model_owner_server.api.routes.emulators import parse_range
from model_owner_server.console.charts import bar_chart, line_chart
from model_owner_server.models import AdapterRow, Evaluation

CONSOLE = Path(__file__).resolve().parents[2] / "model_owner_server" / "console"


def _deep(levels: int) -> str:
    return '{"a":' * levels + "1" + "}" * levels


def _upload(world, key: str, **json_parts: str):
    files = {"adapter": ("adapter.safetensors", io.BytesIO(adapter_bytes(world.adapter_tensors)))}
    files.update({name: (None, text.encode("utf-8", "surrogatepass")) for name, text in json_parts.items()})
    return world.client.post(f"/v1/emulators/{world.emulator['id']}/adapters", headers=auth(key), files=files)


def _adapter_count(world) -> int:
    with world.client.app.state.sessions() as s:
        return s.scalar(select(func.count()).select_from(AdapterRow))


# --- JSON bounds ---------------------------------------------------------------------------------------------


@pytest.mark.db
@pytest.mark.parametrize(
    ("part", "text", "bound"),
    [
        ("metrics", _deep(10_000), "deeper than 32 levels"),  # past the decoder's own recursion limit
        ("adapter_config", _deep(300), "deeper than 32 levels"),  # decodes, but no response could encode it
        ("metrics", json.dumps({f"k{i}": i for i in range(12_000)}), "more than 10000 keys"),
        ("adapter_config", json.dumps({"note": "x" * 20_000}), "string of 20000 characters"),
        ("metrics", '{"loss": "\\ud800"}', "not valid Unicode"),
        ("metrics", '{"n": ' + "9" * 5000 + "}", "must be JSON text"),  # past int's 4300-digit limit
        ("adapter_config", "[1, 2]", "must be a JSON object"),
    ],
    ids=["deep-10000", "deep-300", "wide", "long-string", "lone-surrogate", "huge-int", "not-an-object"],
)
def test_hostile_json_parts_are_refused_before_anything_is_stored(world, part, text, bound):
    data_dir = world.settings.resolved_data_dir
    before, count = data_dir_listing(data_dir), _adapter_count(world)
    r = _upload(world, world.keys["alice"], **{part: text})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "validation_error" and f"part '{part}'" in error["message"], error
    assert bound in error["message"], error
    assert _adapter_count(world) == count and data_dir_listing(data_dir) == before


def test_json_bounds_in_detail():
    bounds = JsonBounds(max_depth=3, max_items=5, max_string=4, max_bytes=100)
    assert parse_bounded(b'{"a": {"b": [1, NaN, Infinity, -Infinity]}}', JsonBounds()) == {
        "a": {"b": [1, None, None, None]}  # JSON has no NaN (PostgreSQL's json type refuses it): stored as null
    }
    assert parse_bounded(b'{"a": {"b": 1}}', bounds) == {"a": {"b": 1}}
    for raw, which in [
        (b'{"a": {"b": {"c": [1]}}}', "depth"),
        (b"[1, 2, 3, 4, 5, 6]", "items"),
        (b'{"abcde": 1}', "string"),
        (b'["abcde"]', "string"),
        (b"[" + b" " * 100 + b"]", "size"),
        (b"{", "json"),
        (b"\xff", "json"),
    ]:
        with pytest.raises(JsonBoundsError) as err:
            parse_bounded(raw, bounds)
        assert err.value.bound == which, raw
    # Reading: a stored value past what can be rendered becomes a note, never an exception.
    deep: dict = {}
    node = deep
    for _ in range(500):
        node["a"] = node = {}
    assert set(readable(deep)) == {"withheld"} and "deeper than 100 levels" in readable(deep)["withheld"]
    assert readable({"x": float("nan"), "y": [1.5]}) == {"x": None, "y": [1.5]}
    assert readable(None) is None


def _console(world, org: str) -> TestClient:
    """A signed-in console client of its own (its own cookies; the world's client stays as it is)."""
    client = TestClient(world.client.app)
    token = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/console/login").text).group(1)
    r = client.post("/console/login", data={"api_key": world.keys[org], "csrf_token": token}, follow_redirects=False)
    assert r.status_code == 303, r.text
    return client


@pytest.fixture
def injected(world):
    """Adapter rows written straight into the database (as code before the upload bounds could), removed after."""
    ids: list[str] = []

    def inject(**columns) -> str:
        with world.client.app.state.sessions() as s:
            template = s.get(AdapterRow, world.adapter_id)
            row = AdapterRow(
                emulator_id=template.emulator_id,
                model_id=template.model_id,
                org_id=world.org_ids["alice"],
                status="evaluated",
                path=template.path,
                sha256=template.sha256,
                size_bytes=template.size_bytes,
                method="full",
                **columns,
            )
            s.add(row)
            s.commit()
            ids.append(row.id)
            return row.id

    yield inject
    with world.client.app.state.sessions() as s:
        s.execute(delete(Evaluation).where(Evaluation.adapter_id.in_(ids)))
        s.execute(delete(AdapterRow).where(AdapterRow.id.in_(ids)))
        s.commit()


@pytest.mark.db
def test_a_stored_deep_json_row_does_not_break_listings(world, injected):
    # 300 levels: the old upload stored it (its decoder allowed ~1000); the response encoder gives up at ~255.
    deep: dict = {}
    node = deep
    for _ in range(300):
        node["a"] = node = {}
    adapter_id = injected(adapter_config=deep, client_metrics={"loss": 1.0, "deep": deep})
    for org in ("alice", "admin"):
        r = world.client.get("/v1/adapters", headers=auth(world.keys[org]))
        assert r.status_code == 200, r.text
        row = next(a for a in r.json()["adapters"] if a["id"] == adapter_id)
        assert set(row["adapter_config"]) == {"withheld"} and "deeper than" in row["adapter_config"]["withheld"]
        assert set(row["client_metrics"]) == {"withheld"}
        assert world.client.get(f"/v1/adapters/{adapter_id}", headers=auth(world.keys[org])).status_code == 200
    page = _console(world, "alice").get(f"/console/adapters/{adapter_id}")
    assert page.status_code == 200, page.text


@pytest.mark.db
def test_non_numeric_client_metrics_render_as_escaped_text_not_as_chart_markup(world, injected):
    script = '<script>alert("x")</script>'
    adapter_id = injected(
        client_metrics={
            "emulator_zero_shot": {"perplexity": script, "loss": {"nested": script}},
            "emulator_fine_tuned": {"perplexity": True, "loss": 1e308, "accuracy": -1e308},
        }
    )
    with world.client.app.state.sessions() as s:
        s.add(Evaluation(adapter_id=adapter_id, kind="zero_shot", eval_source="upload", metrics={"perplexity": 12.5}))
        s.add(Evaluation(adapter_id=adapter_id, kind="plug_in", eval_source="upload", metrics={"perplexity": 9.0}))
        s.commit()
    page = _console(world, "alice").get(f"/console/adapters/{adapter_id}")
    assert page.status_code == 200, page.text
    assert script not in page.text and "&lt;script&gt;" in page.text  # shown as text in the table
    chart = page.text[page.text.index("<svg") : page.text.index("</svg>")]
    assert chart.count('<rect class="bar') == 2 and "nan" not in chart and "inf" not in chart


def test_charts_draw_only_finite_numbers():
    chart = bar_chart(
        ["a", "b", "c", "d", "e", "f", "g"],
        [1.0, float("nan"), float("inf"), "2", {"x": 1}, True, None],
        "t",
        classes=[f"c{i}" for i in range(7)],
    )
    assert chart.count("<rect") == 1 and 'class="bar c0"' in chart and "nan" not in chart
    assert bar_chart(["a"], ["<b>"], "t") == ""
    assert "nan" not in bar_chart(["lo", "hi"], [-1.7e308, 1.7e308], "t")  # no overflow of hi - lo
    assert line_chart([(0, 1.0), (1, float("nan")), (2, "x"), (3, 2.0)], "t", "y").count(",") == 2


# --- Range ---------------------------------------------------------------------------------------------------

SIZE = 1000
RFC_9110_CASES = [
    ("bytes=0-499", (0, 499)),
    ("bytes=500-999", (500, 999)),
    ("bytes=-500", (500, 999)),  # the final 500 bytes
    ("bytes=9500-", "unsatisfiable"),  # starts past the end
    ("bytes=900-", (900, 999)),
    ("bytes=0-0", (0, 0)),
    ("bytes=-1", (999, 999)),
    ("bytes=-0", "unsatisfiable"),
    ("bytes=-5000", (0, 999)),  # a suffix longer than the file: all of it
    ("bytes=0-5000", (0, 999)),  # last-pos past the end: up to the end
    ("BYTES = 10 - 20 ", (10, 20)),  # case and whitespace, as before
    ("bytes=20-10", None),  # invalid: ignored (full 200)
    ("bytes=0-1,5-6", None),  # several ranges: the full 200 is allowed
    ("bytes=-", None),
    ("bytes=", None),
    ("items=0-5", None),
    ("bytes=1-2-3", None),
    ("bytes=a-b", None),
    ("", None),
]


def _old_parse_range(header: str, size: int):
    """The parser before the fix, for comparing results (it backtracked quadratically)."""
    m = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE).match(header)
    if not m or (not m.group(1) and not m.group(2)):
        return None
    first, last = m.group(1), m.group(2)
    if not first:
        n = int(last)
        return "unsatisfiable" if n == 0 else (max(0, size - n), size - 1)
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if last and int(last) < start:
        return None
    if start >= size:
        return "unsatisfiable"
    return start, end


@pytest.mark.parametrize(("header", "expected"), RFC_9110_CASES)
def test_range_rfc_9110_cases(header, expected):
    assert parse_range(header, SIZE) == expected == _old_parse_range(header, SIZE)


def test_range_results_match_the_old_parser_on_random_headers():
    rng = random.Random(20)
    pieces = [" ", "\t", "bytes", "BYTES", "=", "-", ",", "0", "7", "42", "999", "1000", "x", "  "]
    for _ in range(5000):
        header = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        assert parse_range(header, SIZE) == _old_parse_range(header, SIZE), header


@pytest.mark.parametrize("n", [16 * 1024, 1024 * 1024])
def test_pathological_range_headers_parse_in_linear_time(n):
    headers = [
        "bytes=" + " " * n + "x",  # the old pattern: 0.8 s at 16 KB, quadratic
        "bytes=-" + " " * n + "x",  # 1.7 s at 16 KB
        "bytes=0" + " " * n,
        " " * n,
        "bytes=" + "9" * n + "-",  # and no 4300-digit int() error (was a 500)
        "bytes=" + "0-1," * (n // 4),
    ]
    for header in headers:
        start = time.perf_counter()
        assert parse_range(header, SIZE) is None
        assert time.perf_counter() - start < 0.05, (n, header[:20])


# --- job failures --------------------------------------------------------------------------------------------


@pytest.mark.db
def test_failed_job_shows_data_owners_no_server_path_and_admins_the_full_text(world, monkeypatch):
    from model_owner_server.jobs.tasks import evaluation

    secret = str(world.settings.resolved_data_dir / "adapters" / "secret-layout" / "eval.txt")

    def fail(path):
        raise FileNotFoundError(2, "No such file or directory", secret)

    monkeypatch.setattr(evaluation, "load_dataset", fail)
    r = _upload(world, world.keys["alice"])  # the queue runs the evaluation job inline
    assert r.status_code == 202, r.text
    adapter_id, job_id = r.json()["adapter"]["id"], r.json()["job"]["id"]
    alice, admin = auth(world.keys["alice"]), auth(world.keys["admin"])
    job = world.client.get(f"/v1/jobs/{job_id}", headers=alice).json()
    adapter = world.client.get(f"/v1/adapters/{adapter_id}", headers=alice).json()
    assert job["status"] == "failed" and adapter["status"] == "failed"
    for error in (job["error"], adapter["error"]):
        assert "plug-in evaluation" in error and job_id in error and "model owner" in error, error
    console = _console(world, "alice")
    seen = [
        json.dumps(job),
        json.dumps(adapter),
        world.client.get("/v1/jobs", headers=alice).text,
        world.client.get("/v1/adapters", headers=alice).text,
        console.get(f"/console/adapters/{adapter_id}").text,
        console.get("/console/jobs").text,
    ]
    for text in seen:
        assert "secret-layout" not in text and str(world.settings.resolved_data_dir) not in text
        assert "FileNotFoundError" not in text and "No such file" not in text
    assert "error_detail" not in job["result"]
    # The model owner keeps the full text.
    for detail in (
        world.client.get(f"/v1/jobs/{job_id}", headers=admin).json()["error"],
        world.client.get(f"/v1/adapters/{adapter_id}", headers=admin).json()["error"],
    ):
        assert secret in detail and "No such file" in detail, detail


# --- security headers ----------------------------------------------------------------------------------------

COMMON = {"x-content-type-options": "nosniff", "referrer-policy": "no-referrer", "x-frame-options": "DENY"}


def _has_common(r) -> None:
    for name, value in COMMON.items():
        assert r.headers.get(name) == value, (r.request.url, name, dict(r.headers))


@pytest.mark.db
def test_security_headers_on_api_and_console_answers(world):
    c = world.client
    for r in (
        c.get("/v1/jobs", headers=auth(world.keys["alice"])),
        c.get("/v1/jobs"),  # 401
        c.get(f"/v1/emulators/{world.emulator['id']}/file", headers=auth(world.keys["alice"])),
        c.post("/v1/models", headers=auth(world.keys["admin"]), content=b" " * (world.settings.max_request_bytes + 1)),
        c.get("/healthz"),
    ):
        _has_common(r)
        assert "strict-transport-security" not in r.headers  # plain http: HSTS would be ignored or harmful
        if r.request.url.path.startswith("/v1/"):
            assert r.headers["content-security-policy"] == "default-src 'none'; frame-ancestors 'none'"
    for path in ("/console/login", "/console/nope"):
        r = c.get(path)
        _has_common(r)
        csp = r.headers["content-security-policy"]
        assert csp == CONSOLE_CSP and "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    # Over https (the request's scheme), HSTS as well.
    r = TestClient(c.app, base_url="https://testserver").get("/console/login")
    assert r.headers["strict-transport-security"] == "max-age=31536000"


def test_hsts_when_the_public_url_is_https():
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    app = Starlette(routes=[Route("/", lambda request: PlainTextResponse("ok", headers={"X-Frame-Options": "x"}))])
    behind_tls = TestClient(SecurityHeadersMiddleware(app, public_url="https://models.example.org"))
    r = behind_tls.get("/")  # a TLS-terminating proxy talks plain http to the server
    assert r.headers["strict-transport-security"] == "max-age=31536000"
    assert r.headers["x-frame-options"] == "x"  # a header the route set itself is kept
    assert "strict-transport-security" not in TestClient(SecurityHeadersMiddleware(app, "http://h")).get("/").headers


def test_console_csp_admits_exactly_the_consoles_own_inline_code():
    """Every inline event handler in the templates is pinned in the CSP by hash; there are no inline <script>
    bodies or style attributes; the htmx indicator style allowed by hash is what the vendored htmx inserts."""
    handlers, scripts, styles = set(), [], []
    for template in (CONSOLE / "templates").glob("*.html"):
        text = template.read_text()
        handlers |= set(re.findall(r"""\son[a-z]+\s*=\s*"([^"]*)\"""", text))
        scripts += [t for t in re.findall(r"<script\b([^>]*)>", text) if "src=" not in t]
        styles += re.findall(r"\sstyle\s*=", text) + re.findall(r"<style\b", text)
    assert handlers and handlers <= set(CONSOLE_INLINE["script"]), handlers
    assert not scripts and not styles
    for source in CONSOLE_INLINE["script"] + CONSOLE_INLINE["style"]:
        assert csp_hash(source) in CONSOLE_CSP
    js = (CONSOLE / "static" / "htmx.min.js").read_text()
    inserted = js.split("`<style${e}>`+", 1)[1].split('+"</style>"', 1)[0]
    css = "".join(re.findall(r"`([^`]*)`", inserted)).replace("${t}", "htmx-indicator").replace("${n}", "htmx-request")
    assert css == HTMX_INDICATOR_CSS
    assert 'indicatorClass:"htmx-indicator"' in js and 'requestClass:"htmx-request"' in js
