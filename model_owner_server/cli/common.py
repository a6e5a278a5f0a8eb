"""What every `modelowner-server` command shares: the Typer app, error exit, model lookup, settings, database."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(
    help="ScaleOT model-owner server: compress your LLM into emulators, serve them, evaluate adapters.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def model_folder(model: str) -> Path:
    """MODEL is a local folder, or the name of a registered base model."""
    path = Path(model)
    if path.is_dir():
        return path
    try:
        from model_owner_server.registry import registered_model_path  # service layer, when present
    except ImportError:
        registered_model_path = None
    if registered_model_path is not None:
        found = registered_model_path(model)
        if found is not None:
            return Path(found)
    fail(
        f"{model!r} is neither a model folder nor a registered model name "
        "(register one with `modelowner-server register-model NAME --path DIR`)"
    )
    raise AssertionError  # unreachable


def load_settings(**overrides: object):
    from model_owner_server.core.config import Settings

    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def db_session(settings):
    """Apply migrations, then open a session (the commands work directly on the database)."""
    from model_owner_server.core.db import make_engine, make_session_factory, run_migrations

    run_migrations(settings.db_url)
    return make_session_factory(make_engine(settings.db_url))()
