"""`scripts/demo.py --tiny`: the README's demo flow end to end on a tiny random model, as a subprocess.

Same code path as `make demo` (server process on loopback, create-org, REST importance + emulator, the
client in its own directory, plug-in evaluation, report), smaller budget. Also: the server it started is
stopped on success, on error and on Ctrl-C.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import signal
import subprocess
import sys

import httpx
import pytest

from tooling.procs import wait_until

from .conftest import DEMO, ROOT, subprocess_env

TIMEOUT_S = 600


def _run_demo(args: list[str], timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(DEMO), "--tiny", *args],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _server_url(output: str) -> str:
    m = re.search(r"server up at (http://127\.0\.0\.1:\d+)", output)
    assert m, f"the demo never reported its server:\n{output[-3000:]}"
    return m.group(1)


def _assert_stopped(url: str) -> None:
    def refused() -> bool:
        try:
            httpx.get(f"{url}/healthz", timeout=1)
        except httpx.HTTPError:
            return True
        return False

    try:
        wait_until(refused, timeout=10, interval=0.3, what="the server to stop")
    except TimeoutError:
        pytest.fail(f"the demo's server at {url} is still answering after the demo ended")


def test_tiny_demo_runs_the_two_party_story(tmp_path):
    report_path = tmp_path / "report.json"
    proc = _run_demo(["--workdir", str(tmp_path / "run"), "--report-json", str(report_path)])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]

    # the story, in order
    for marker in (
        "modelowner-server serve",
        "create-org model-owner --role admin",
        "create-org acme-data --role data-owner",
        "POST /v1/models ",
        "/grants",
        "GET /v1/signing-keys",
        "/importance",
        "POST /v1/emulators",
        "dataowner-client tune",
        "--emulator-url http://127.0.0.1:",
        "server stopped",
        "ScaleOT two-party demo: report",
    ):
        assert marker in out, f"missing {marker!r} in the demo output:\n{out[-5000:]}"
    assert out.index("/importance") < out.index("POST /v1/emulators") < out.index("dataowner-client tune")
    assert re.search(r"importance +\d+%", out), "job progress was not shown"
    # the key is shown abbreviated only, never in full
    assert not re.search(r"sot_[A-Za-z0-9_-]{20,}", out)
    _assert_stopped(_server_url(out))

    report = json.loads(report_path.read_text())
    assert report["tiny"] is True
    assert report["adapter_status"] == "evaluated"
    for row in report["metrics"].values():
        assert row is not None and math.isfinite(row["perplexity"])
    assert 0 < report["emulator_bytes"] < report["full_model_bytes"]
    assert 0 < report["adapter_bytes"] < report["emulator_bytes"]
    assert set(report["train_works"]).isdisjoint(report["eval_works"])
    assert report["training"]["steps"] == report["config"]["train_steps"]
    assert report["total_s"] > 0
    # the chat-format tune (messages records, the tiny model's chat template): all four stages on the assistant loss
    chat = report["chat"]
    assert chat["adapter_status"] == "evaluated" and chat["training"]["data_kind"] == "chat"
    for name, row in chat["metrics"].items():
        assert row is not None and math.isfinite(row["assistant_loss"]) and row["tokens"] > 0, name
    assert "the same on chat data" in out and "chat data (messages records" in out

    # two parties, two directories: the data owner's side holds no server state
    run = tmp_path / "run"
    client_files = {p.relative_to(run / "data-owner").parts[0] for p in (run / "data-owner").rglob("*")}
    assert client_files <= {"data", "cache", "adapter", "adapter-chat"}, client_files
    assert not list((run / "data-owner").rglob("*.db")) and not list((run / "data-owner").rglob("*.pem"))
    assert list((run / "model-owner" / "server-data").rglob("*.db")), "the server's SQLite database is missing"


def test_demo_error_stops_the_server(tmp_path):
    # steps=0 is refused by the API (422) after the server started: the demo must fail cleanly and stop it
    proc = _run_demo(["--workdir", str(tmp_path / "run"), "--steps", "0"], timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert "demo failed" in out and "422" in out
    assert "server stopped" in out
    _assert_stopped(_server_url(out))


def test_demo_ctrl_c_stops_the_server(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, str(DEMO), "--tiny", "--workdir", str(tmp_path / "run")],
        cwd=ROOT,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "server up at" in line:
                break
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = "".join(lines) + rest
    assert proc.returncode == 130, out[-3000:]
    assert "interrupted" in out and "server stopped" in out
    _assert_stopped(_server_url(out))


def test_demo_roles_as_docker_compose_runs_them(demo, tmp_path):
    """--role model-owner against a running server, then --role data-owner with only the invitation file
    (what the `model-owner` and `client` services run); a second model-owner run reuses what exists."""
    server_dir, owner_dir, client_dir = tmp_path / "server", tmp_path / "owner", tmp_path / "client"
    invitation = tmp_path / "invitation" / "invitation.json"
    server_env = {
        "SCALEOT_EVAL_SEQ_LEN": "64",
        "SCALEOT_EVAL_MAX_EXAMPLES": "8",
        "SCALEOT_IMPORTANCE_SEQ_LEN": "64",
        "SCALEOT_IMPORTANCE_MAX_BLOCKS": "32",
    }
    with demo.LocalServer(server_dir / "data", server_dir, 0, server_env) as server:
        owner_cmd = [
            sys.executable,
            str(DEMO),
            "--tiny",
            "--role",
            "model-owner",
            "--server-url",
            server.url,
            "--invitation",
            str(invitation),
            "--workdir",
            str(owner_dir),
        ]
        # the model owner's CLI works on the server's own data dir / database, as in the compose file
        owner_env = subprocess_env(SCALEOT_DATA_DIR=str(server.data_dir))
        first = subprocess.run(
            owner_cmd, cwd=ROOT, env=owner_env, capture_output=True, text=True, timeout=300, check=False
        )
        assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-2000:]
        inv = json.loads(invitation.read_text())
        assert set(inv) == {"emulator_url", "api_key", "server_pubkey", "key_id"}
        assert inv["emulator_url"].startswith(f"{server.url}/v1/emulators/emu_")
        assert oct(invitation.stat().st_mode & 0o777) == "0o600"

        again = subprocess.run(
            owner_cmd, cwd=ROOT, env=owner_env, capture_output=True, text=True, timeout=300, check=False
        )
        assert again.returncode == 0, again.stdout[-4000:]
        assert "reusing the organizations" in again.stdout and "reusing it" in again.stdout
        assert json.loads(invitation.read_text())["emulator_url"] == inv["emulator_url"]

        client = subprocess.run(
            [
                sys.executable,
                str(DEMO),
                "--tiny",
                "--role",
                "data-owner",
                "--invitation",
                str(invitation),
                "--workdir",
                str(client_dir),
                "--device",
                "cpu",
            ],
            cwd=ROOT,
            env=subprocess_env(),
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert client.returncode == 0, client.stdout[-4000:] + client.stderr[-2000:]
        report = json.loads((client_dir / "report.json").read_text())
        assert report["adapter_status"] == "evaluated"
        assert report["metrics"]["plug-in: full model + adapter (server)"]["perplexity"] > 0


def _load_docs_demo():
    spec = importlib.util.spec_from_file_location("scaleot_docs_demo", ROOT / "scripts" / "docs_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_same_seed_twice_gives_the_same_figures(tmp_path):
    """Two seeded runs in a row: same works, importance ranking, plan, losses and perplexities (what
    `make docs-demo --runs 2` checks on the real model); a third with another seed differs."""
    docs_demo = _load_docs_demo()
    reports = []
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        path = tmp_path / f"{name}.json"
        proc = _run_demo(
            ["--workdir", str(tmp_path / name), "--report-json", str(path), "--seed", seed, "--no-reference"]
        )
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        reports.append(docs_demo.reproducible_view(json.loads(path.read_text())))
    assert "emulator_id" not in reports[0] and "total_s" not in reports[0]
    assert docs_demo.differences(reports[0], reports[1]) == []
    assert docs_demo.differences(reports[0], reports[2]), "another seed gave the very same figures"


def test_docs_demo_markers_are_in_place():
    """`make docs-demo` rewrites only what lies between these markers; without them it would refuse."""
    readme = (ROOT / "README.md").read_text()
    walkthrough = (ROOT / "docs" / "walkthrough.md").read_text()
    assert readme.count("<!-- demo-report:start -->") == 1 and readme.count("<!-- demo-report:end -->") == 1
    assert walkthrough.count("<!-- demo-run:start -->") == 1 and walkthrough.count("<!-- demo-run:end -->") == 1
    docs_demo = _load_docs_demo()
    assert docs_demo.clean_transcript("a\rab\r\nc\n") == "ab\nc"
