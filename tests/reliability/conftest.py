"""Reliability and security tests: fast versions of the load / fault runs in reliability/, hostile input,
and security properties. The server tests' fixtures (`new_database_url`, `files`, `world`, from
tests/server/server_fixtures.py) and helpers (`server_helpers`) are reused as they are, not copied: imported
as plain modules and re-exported here. The server conftest's collection hook, which marks every server test
`db`, is not: here only the tests that are cheap enough for the PostgreSQL pass carry `@pytest.mark.db`."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVER_TESTS = ROOT / "tests" / "server"
for _p in (str(ROOT), str(SERVER_TESTS)):  # `reliability` (scripts' harness), `server_helpers`, `server_fixtures`
    if _p not in sys.path:
        sys.path.insert(0, _p)

from server_fixtures import BASE_DB_URL, files, new_database_url, world  # noqa: E402,F401 - re-exported fixtures
