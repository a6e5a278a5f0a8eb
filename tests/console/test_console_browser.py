"""The web console in a real headless Chromium against a real `modelowner-server serve` on loopback.

One server and one scenario for the module (the tests run in file order and build on each other, as the
two organizations would): the admin signs in, registers and grants a model, starts stage 1 and watches
the bar reach done, builds an emulator and sees its plan; the data owner sees only its own emulator and
adapter and the evaluation chart; a wrong key, a forged form post and a cancelled job are refused or end
as they should. Every page is screenshotted (SCALEOT_CONSOLE_SCREENSHOTS=docs/console refreshes the docs).
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import httpx
import pytest
from browser import launch_chromium, screenshot_dir
from server_helpers import adapter_bytes
from test_serve_process import Server

from tooling.procs import small_server_env, wait_job

STATE: dict = {}  # what earlier steps of the scenario made (keys, ids), for the later ones
PHONE = {"width": 390, "height": 844}


@pytest.fixture(scope="module")
def srv(tmp_path_factory, new_database_url, files):
    tmp = tmp_path_factory.mktemp("console")
    env = small_server_env(
        tmp / "data",
        new_database_url(),
        SCALEOT_EMULATOR_CALIBRATION_STEPS="4",
        SCALEOT_DEFAULT_EVAL=str(files["eval"]),
        OMP_NUM_THREADS="1",
    )
    server = Server(env, tmp / "server.log")
    STATE.update(
        admin=server.cli("create-org", "model-owner", "--role", "admin"),
        acme=server.cli("create-org", "acme", "--role", "data-owner"),
        globex=server.cli("create-org", "globex", "--role", "data-owner"),
        tmp=tmp,
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser():
    yield from launch_chromium()


@pytest.fixture(scope="module")
def shots(srv):
    return screenshot_dir(STATE["tmp"])


def api(srv: Server, who: str) -> httpx.Client:
    return httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {STATE[who]}"}, timeout=60)


def sign_in(browser, srv: Server, who: str, **context):
    page = browser.new_context(base_url=srv.url, **context).new_page()
    page.goto("/console/emulators")
    assert "/console/login" in page.url  # no session yet: sent to sign in, and back afterwards
    page.get_by_label("API key").fill(STATE[who])
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url("**/console/emulators")
    return page


def check_accessible(page) -> None:
    """Every visible form control has a label; nothing is wider than the viewport (phone width)."""
    unlabelled = page.evaluate("""() => [...document.querySelectorAll('input:not([type=hidden]), select, textarea')]
        .filter(e => !(e.id && document.querySelector(`label[for="${e.id}"]`)) && !e.getAttribute('aria-label'))
        .map(e => e.name)""")
    assert unlabelled == [], f"form controls without a label on {page.url}: {unlabelled}"
    overflow = page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 1, f"{page.url} is {overflow}px wider than the viewport"


def snap(page, shots: Path, name: str) -> None:
    check_accessible(page)
    page.screenshot(path=str(shots / f"{name}.png"), full_page=True)


def test_wrong_key_is_refused_with_a_clear_message(browser, srv, shots):
    page = browser.new_context(base_url=srv.url).new_page()
    response = page.goto("/console/models")
    assert "/console/login" in page.url and response.status == 200
    page.keyboard.press("Tab")  # keyboard only: the skip link, then the key field, then Enter submits
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "api_key"
    page.keyboard.type("sot_not-a-real-key")
    with page.expect_response("**/console/login") as answer:
        page.keyboard.press("Enter")
    assert answer.value.status == 401
    assert "was not accepted" in page.get_by_role("alert").inner_text()
    snap(page, shots, "sign-in")
    assert page.context.cookies() and all(c["name"] != "scaleot_console" for c in page.context.cookies())


def test_admin_registers_grants_runs_stage1_and_builds_an_emulator(browser, srv, files, shots):
    page = sign_in(browser, srv, "admin")
    cookie = next(c for c in page.context.cookies() if c["name"] == "scaleot_console")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    page.goto("/console/models")
    assert "No model is registered yet" in page.inner_text("main")
    # Inline validation from the API's own checks, then success.
    page.fill("#register-name", "tiny")
    page.fill("#register-path", str(files["root"] / "no-such-folder"))
    page.click("#register button")
    assert "does not exist on the server" in page.inner_text("#register .error")
    page.fill("#register-path", str(files["model"]))
    page.click("#register button")
    assert "Registered tiny (4 layers)" in page.inner_text(".notice")
    with api(srv, "admin") as admin:
        model_id = admin.get("/v1/models").json()["models"][0]["id"]
        STATE["model_id"] = model_id
        # A second model, granted only to globex (acme must never see it or its emulator).
        other = admin.post("/v1/models", json={"name": "tiny-b", "path": str(files["model"])}).json()["id"]
        admin.post(f"/v1/models/{other}/grants", json={"org": "globex"})
    page.reload()
    page.fill(f"#grant-{model_id}-org", "acme")
    page.click(f"form[action$='{model_id}/grants'] button")
    assert "Granted the model to acme" in page.inner_text(".notice")
    snap(page, shots, "models")

    # Stage 1 from the form; the jobs page moves its bar to done without a reload.
    page.fill(f"#importance-{model_id}-steps", "0")
    page.click(f"form[action$='{model_id}/importance'] button")
    assert "greater than or equal to 1" in page.inner_text(f"#importance-{model_id}-steps-msg")
    page.fill(f"#importance-{model_id}-steps", "150")
    page.fill(f"#importance-{model_id}-corpus", str(files["corpus"]))
    page.click(f"form[action$='{model_id}/importance'] button")
    page.wait_for_url("**/console/jobs?notice=*")
    page.evaluate("window.notReloaded = true")
    row = page.locator("#job-rows tr").first
    seen = set()
    deadline = time.monotonic() + 120
    while row.get_attribute("data-status") != "succeeded" and time.monotonic() < deadline:
        seen.add((row.get_attribute("data-status"), page.locator("#job-rows progress").first.get_attribute("value")))
        time.sleep(0.1)
    assert row.get_attribute("data-status") == "succeeded", row.inner_text()
    assert page.evaluate("window.notReloaded") is True  # updated in place (htmx), not by reloading
    assert any(float(v) < 1 for _, v in seen), f"never saw the bar before done: {seen}"
    assert page.locator("#job-rows progress").first.get_attribute("value") == "1.0"

    page.goto("/console/importance")
    page.locator("table a").first.click()
    assert page.locator("svg.chart rect.bar").count() == 4  # one bar per layer
    assert page.locator("svg.chart polyline").count() >= 1  # the loss curve
    snap(page, shots, "importance")

    # Emulator: an out-of-range alpha is refused inline; then the build, its job and the plan strip.
    page.goto("/console/emulators")
    page.select_option("#build-model_id", model_id)
    page.fill("#build-alpha", "2")
    page.click("#build button")
    assert "less than or equal to 1" in page.inner_text("#build-alpha-msg")
    page.fill("#build-alpha", "0.5")
    page.click("#build button")
    page.wait_for_url("**/console/emulators/emu_*")
    STATE["emulator_id"] = page.url.split("/")[-1].split("?")[0]
    with api(srv, "admin") as admin:
        wait_job(admin, admin.get(f"/v1/emulators/{STATE['emulator_id']}").json()["job_id"], timeout=90, succeeded=True)
        other_emu = admin.post("/v1/emulators", json={"model_id": other, "n_adapter": 2, "alpha": 0.5, "beta": 0.5})
        assert other_emu.status_code == 409  # tiny-b has no importance run: the API's message, as-is
    page.reload()
    strip = page.locator("ol.strip li")
    assert strip.count() == 4 and page.locator("ol.strip li.adapter").count() == 2
    assert "dataowner-client tune --emulator-url" in page.input_value("#cmd1")
    assert "modelowner-server audit-emulator" in page.inner_text("main")  # not audited yet: how to do it
    snap(page, shots, "emulator")
    page.goto("/console/emulators")
    snap(page, shots, "emulators")
    page.goto("/console/jobs")
    snap(page, shots, "jobs")
    page.goto("/console/keys")
    assert page.locator("tr.active").count() == 1
    snap(page, shots, "keys")
    STATE["admin_page"] = page


def _upload_adapter(srv: Server, who: str, emulator_id: str) -> str:
    """The data owner's side, over the REST API as `dataowner-client` does it: download, fine-tune (here: the
    emulator's own adapter layers, nudged), score the emulator before and after on the server's eval file with
    the server's evaluation settings (one measurement), upload with those metrics."""
    from shared.adapter import extract_adapter
    from shared.data import load_dataset
    from shared.emulator_file import load_emulator
    from shared.evaluation import evaluate

    with api(srv, who) as client:
        path = STATE["tmp"] / f"{who}.safetensors"
        path.write_bytes(client.get(f"/v1/emulators/{emulator_id}/file").content)
        loaded = load_emulator(path)
        tensors = {k: v * 1.01 for k, v in extract_adapter(loaded.model, loaded.plan.adapter_layers).items()}
        settings = client.get(f"/v1/emulators/{emulator_id}/upload-info").json()["eval_settings"]
        data = load_dataset(srv.env["SCALEOT_DEFAULT_EVAL"])

        def score() -> dict:
            return evaluate(
                loaded.model, loaded.tokenizer, data, seq_len=settings["seq_len"], max_examples=settings["max_examples"]
            )

        metrics = {"eval_settings": {k: settings[k] for k in ("seq_len", "max_examples")}}
        metrics["emulator_zero_shot"] = score()
        loaded.model.load_state_dict(tensors, strict=False)  # the "fine-tuned" adapter layers
        metrics["emulator_fine_tuned"] = score()
        r = client.post(
            f"/v1/emulators/{emulator_id}/adapters",
            files={
                "adapter": ("adapter.safetensors", io.BytesIO(adapter_bytes(tensors))),
                "metrics": (None, json.dumps(metrics)),
            },
        )
        assert r.status_code == 202, r.text
        wait_job(client, r.json()["job"]["id"], timeout=90, succeeded=True)
        return r.json()["adapter"]["id"]


def test_data_owner_sees_only_its_own_emulator_and_adapter(browser, srv, shots):
    emulator_id = STATE["emulator_id"]
    with api(srv, "admin") as admin:  # globex's own emulator of tiny (granted to it too)
        admin.post(f"/v1/models/{STATE['model_id']}/grants", json={"org": "globex"})
    acme_adapter = _upload_adapter(srv, "acme", emulator_id)
    globex_adapter = _upload_adapter(srv, "globex", emulator_id)

    page = sign_in(browser, srv, "acme", viewport=PHONE)
    assert page.locator("table a[href^='/console/emulators/']").all_inner_texts() == [emulator_id]
    snap(page, shots, "emulators-data-owner-phone")
    page.goto("/console/adapters")
    assert page.locator("table a[href^='/console/adapters/']").all_inner_texts() == [acme_adapter]
    snap(page, shots, "adapters")
    assert page.goto(f"/console/adapters/{globex_adapter}").status == 404  # another org's: as if missing
    assert page.goto("/console/audit").status == 403  # admin only
    page.goto(f"/console/adapters/{acme_adapter}")
    assert page.locator("#evaluation thead th").count() == 5  # metric + the four columns side by side
    assert page.locator("svg.chart rect.bar").count() == 4
    page.fill("#gen-prompt", "the quick brown")
    page.fill("#gen-max_new_tokens", "4")
    page.click("#generate button")
    assert page.inner_text("#completion").startswith("the quick brown")
    snap(page, shots, "adapter")
    page.goto("/console/jobs")
    assert page.locator("#job-rows tr").count() == 1  # acme's evaluation job only
    page.goto("/console/importance")
    assert "not shown to data owners" in page.inner_text("main")


def test_forged_form_post_without_csrf_token_is_refused(browser, srv):
    page = STATE["admin_page"]
    url = f"/console/models/{STATE['model_id']}/grants"
    forged = page.request.post(url, form={"org": "globex"}, max_redirects=0)  # the session cookie, no token
    assert forged.status == 403 and "CSRF token" in forged.text()
    wrong = page.request.post(url, form={"org": "globex", "csrf_token": "guess"}, max_redirects=0)
    assert wrong.status == 403
    login = page.request.post("/console/login", form={"api_key": STATE["admin"]}, max_redirects=0)
    assert login.status == 403  # the sign-in form is protected too (double-submit cookie)
    with api(srv, "admin") as admin:
        actions = [e["action"] for e in admin.get("/v1/audit", params={"action": "grant"}).json()["events"]]
    assert len(actions) == 3  # the form grant (acme) and two API grants; nothing from the forged posts


def test_cancelling_a_running_job_ends_it_cancelled(browser, srv, files, shots):
    page = STATE["admin_page"]
    model_id = STATE["model_id"]
    page.goto("/console/models")
    page.fill(f"#importance-{model_id}-steps", "1000000")
    page.fill(f"#importance-{model_id}-corpus", str(files["corpus"]))
    page.click(f"form[action$='{model_id}/importance'] button")
    page.wait_for_url("**/console/jobs?notice=*")
    row = page.locator("#job-rows tr").first
    deadline = time.monotonic() + 60
    while row.get_attribute("data-status") != "running" and time.monotonic() < deadline:
        time.sleep(0.1)
    job_id = row.get_attribute("id").removeprefix("job-")
    snap(page, shots, "jobs-running")
    row.get_by_role("button", name=f"Cancel job {job_id}").click()
    page.wait_for_url("**/console/jobs?notice=*")
    row = page.locator(f"#job-{job_id}")
    deadline = time.monotonic() + 60
    while row.get_attribute("data-status") != "cancelled" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert row.get_attribute("data-status") == "cancelled", row.inner_text()
    with api(srv, "admin") as admin:
        job = admin.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "cancelled" and job["progress"] < 1
    page.goto("/console/audit?action=cancel_job")
    assert page.locator("main tbody tr").count() == 1
    snap(page, shots, "audit")


def test_sign_out_ends_the_session_on_the_server(browser, srv):
    page = STATE["admin_page"]
    page.goto("/console/models")
    token = next(c for c in page.context.cookies() if c["name"] == "scaleot_console")["value"]
    page.get_by_role("button", name="Sign out").click()
    assert "Signed out" in page.inner_text("main")
    # The old cookie is dead on the server, not merely forgotten by this browser.
    replay = httpx.get(f"{srv.url}/console/models", cookies={"scaleot_console": token}, follow_redirects=False)
    assert replay.status_code == 303 and "/console/login" in replay.headers["location"]
    nojs = browser.new_context(base_url=srv.url, java_script_enabled=False).new_page()
    nojs.goto("/console/login")
    assert nojs.get_by_label("API key").is_visible()  # readable and usable without JavaScript
