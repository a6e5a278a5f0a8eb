"""Reliability and security tests: fast versions of the load / fault runs in reliability/, hostile input,
and security properties. The server tests' fixtures (`new_database_url`, `files`, `world`) and helpers
(`server_helpers`) are reused as they are, not copied: tests/server/conftest.py is loaded under another
module name and its fixtures re-exported here (its collection hook, which marks every server test `db`,
is not: here only the tests that are cheap enough for the PostgreSQL pass carry `@pytest.mark.db`)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVER_TESTS = ROOT / "tests" / "server"
for _p in (str(ROOT), str(SERVER_TESTS)):  # `reliability` (scripts' harness) and `server_helpers`
    if _p not in sys.path:
        sys.path.insert(0, _p)

_spec = importlib.util.spec_from_file_location("scaleot_server_test_fixtures", SERVER_TESTS / "conftest.py")
_server_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_server_fixtures)

new_database_url = _server_fixtures.new_database_url
files = _server_fixtures.files
world = _server_fixtures.world
BASE_DB_URL = _server_fixtures.BASE_DB_URL
