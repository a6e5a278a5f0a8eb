"""The web console under /console: server-rendered pages (Jinja2), static files shipped in the package
(a vendored htmx for the live job table; nothing is fetched from the internet), sessions from API keys.
See docs/console.md."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from .views import HERE


def mount_console(app: FastAPI) -> None:
    from . import emulator_pages, models_pages, ops_pages, session_pages

    for module in (session_pages, models_pages, emulator_pages, ops_pages):
        app.include_router(module.router)
    app.mount("/console/static", StaticFiles(directory=HERE / "static"), name="console-static")
