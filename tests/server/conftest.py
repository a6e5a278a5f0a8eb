"""Fixtures for the model-owner server tests: they live in server_fixtures.py (a plain module, shared with
tests/reliability/); this conftest exposes them here and marks every server test `db`."""

from __future__ import annotations

from pathlib import Path

import pytest
from server_fixtures import BASE_DB_URL, files, new_database_url, world  # noqa: F401 - fixtures for the tests here


def pytest_collection_modifyitems(config, items) -> None:
    """Every server test talks to the configured database (`-m db` / `-m "not db"` select them)."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.db)
