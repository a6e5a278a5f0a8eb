"""Look up registered base models from outside the API (the algorithm CLI commands use this)."""

from __future__ import annotations

from sqlalchemy import select

from model_owner_server.core.config import Settings


def registered_model_path(name_or_id: str, settings: Settings | None = None) -> str | None:
    """Folder of a registered model by name or id; None when unknown or the database is not set up."""
    from model_owner_server.core.db import make_engine
    from model_owner_server.models import BaseModel

    settings = settings or Settings()
    engine = make_engine(settings.db_url)
    try:
        with engine.connect() as conn:
            row = conn.execute(select(BaseModel.path).where(
                (BaseModel.name == name_or_id) | (BaseModel.id == name_or_id))).first()
        return row[0] if row else None
    except Exception:  # noqa: BLE001 - no database yet means "not registered"
        return None
    finally:
        engine.dispose()
