"""`registered_model_path`: "not registered" only when the model or the schema is missing; any other
database failure (bad credentials, unreadable file) is an error with a clear message, never a silent None."""

from __future__ import annotations

import pytest

from model_owner_server.core.config import Settings
from model_owner_server.registry import RegistryError, registered_model_path


def _settings(tmp_path, url: str) -> Settings:
    return Settings(_env_file=None, data_dir=tmp_path / "data", database_url=url)


def test_registered_and_unknown_models(world):
    path = registered_model_path("tiny", world.settings)
    assert path is not None and path == registered_model_path(world.model_id, world.settings)
    assert registered_model_path("no-such-model", world.settings) is None


def test_database_without_schema_means_not_registered(tmp_path, new_database_url):
    assert registered_model_path("tiny", _settings(tmp_path, new_database_url())) is None


def test_missing_sqlite_file_is_not_created(tmp_path):
    db = tmp_path / "nowhere" / "scaleot.db"
    assert registered_model_path("tiny", _settings(tmp_path, f"sqlite:///{db}")) is None
    assert not db.exists()


def test_unreadable_sqlite_database_is_an_error(tmp_path):
    bad = tmp_path / "a-directory.db"
    bad.mkdir()
    with pytest.raises(RegistryError, match="cannot read the model registry"):
        registered_model_path("tiny", _settings(tmp_path, f"sqlite:///{bad}"))


def test_bad_credentials_are_an_error_not_unregistered(tmp_path):
    url = "postgresql+psycopg://scaleot_nobody:wrong-password@127.0.0.1:5432/test?connect_timeout=5"
    with pytest.raises(RegistryError) as info:
        registered_model_path("tiny", _settings(tmp_path, url))
    assert "wrong-password" not in str(info.value)
    assert "SCALEOT_DATABASE_URL" in str(info.value)
