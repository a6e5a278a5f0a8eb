"""Console tests: the cancel API (in-process app, real queue) and the web console in a real headless
Chromium (browser_helpers.py) against a real `modelowner-server serve` on loopback."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# server_fixtures / server_helpers / test_serve_process (tests/server) and test_security (tests/reliability):
# plain modules, reused as they are.
for _dir in ("server", "reliability"):
    if str(Path(__file__).parents[1] / _dir) not in sys.path:
        sys.path.insert(0, str(Path(__file__).parents[1] / _dir))

from server_fixtures import BASE_DB_URL, files, new_database_url, world  # noqa: E402, F401 - after the path set-up; fixtures for the tests here


def pytest_collection_modifyitems(config, items) -> None:
    """Every console test talks to the configured database (`-m db` runs them on PostgreSQL too)."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.db)
