"""Alembic environment: target metadata is model_owner_server.models.Base.

URL: the `sqlalchemy.url` the caller set (model_owner_server.core.db.run_migrations does), else the
server settings (SCALEOT_DATABASE_URL / the SQLite file under SCALEOT_DATA_DIR).
"""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy import text

from model_owner_server.core.db import make_engine
from model_owner_server.models import Base

config = context.config
if config.config_file_name is not None and config.get_main_option("configure_logging", "true") == "true":
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata
_PG_LOCK_KEY = 0x5CA1E07  # advisory lock: serve and worker may start (and migrate) at the same time


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from model_owner_server.core.config import Settings

    return Settings().db_url


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = make_engine(_url())
    try:
        with engine.connect() as connection:
            is_pg = connection.dialect.name == "postgresql"
            if is_pg:
                connection.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _PG_LOCK_KEY})
                connection.commit()
            try:
                # render_as_batch: SQLite cannot ALTER most things; batch mode recreates tables.
                context.configure(
                    connection=connection, target_metadata=target_metadata, render_as_batch=True, compare_type=True
                )
                with context.begin_transaction():
                    context.run_migrations()
            finally:
                if is_pg:
                    connection.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_LOCK_KEY})
                    connection.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
