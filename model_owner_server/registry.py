"""Look up registered base models from outside the API (the algorithm CLI commands use this)."""

from __future__ import annotations

from pathlib import Path

import click
from sqlalchemy import select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from model_owner_server.core.config import Settings

_UNDEFINED_TABLE = "42P01"  # PostgreSQL SQLSTATE undefined_table


class RegistryError(click.ClickException):
    """The registry database exists but cannot be read (bad credentials, unreachable server, corrupt file...).

    A ClickException, so the CLI commands that look a model up print the message instead of a traceback."""


def _missing_table(exc: SQLAlchemyError) -> bool:
    """The schema is not there yet (no migrations applied): the one failure that means "nothing registered"."""
    orig = getattr(exc, "orig", None) if isinstance(exc, DBAPIError) else None
    if orig is None:
        return False
    if getattr(orig, "sqlstate", None) == _UNDEFINED_TABLE or getattr(orig, "pgcode", None) == _UNDEFINED_TABLE:
        return True
    return "no such table" in str(orig).lower()  # SQLite


def registered_model_path(name_or_id: str, settings: Settings | None = None) -> str | None:
    """Folder of a registered model by name or id; None when no such model is registered or the database has
    no schema yet (a SQLite file that does not exist, or tables not created). Any other database failure
    (bad credentials, unreachable server, unreadable file) raises RegistryError: it must not look like
    "not registered"."""
    from model_owner_server.core.db import make_engine
    from model_owner_server.models import RegisteredModel

    settings = settings or Settings()
    url = make_url(settings.db_url)
    if (
        url.get_backend_name() == "sqlite"
        and url.database not in (None, "", ":memory:")
        and not Path(url.database).exists()
    ):
        return None  # no database yet; don't create an empty file just to look
    engine = make_engine(settings.db_url)
    try:
        with engine.connect() as conn:
            row = conn.execute(
                select(RegisteredModel.path).where(
                    (RegisteredModel.name == name_or_id) | (RegisteredModel.id == name_or_id)
                )
            ).first()
        return row[0] if row else None
    except SQLAlchemyError as exc:
        if _missing_table(exc):
            return None
        reason = getattr(exc, "orig", None) or exc
        raise RegistryError(
            f"cannot read the model registry in {url.render_as_string(hide_password=True)} "
            f"to look up {name_or_id!r}: {type(reason).__name__}: {str(reason).strip()} "
            "(check SCALEOT_DATABASE_URL and its credentials)"
        ) from exc
    finally:
        engine.dispose()
