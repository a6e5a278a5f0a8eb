"""What every console page shares: templates, the HTML error route, form validation, formatting.

Pages call the REST API's own route functions (and crud's visibility rules) with the signed-in
organization, so the console shows and does exactly what the API would for that organization; this
module only turns their answers and errors into HTML.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode

from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.routing import APIRoute
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, ValidationError

from model_owner_server import crud
from model_owner_server.api.errors import ApiError
from model_owner_server.models import utcnow

from .auth import ConsoleAuth, CsrfError, LoginRequired

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=str(HERE / "templates"))
Schema = TypeVar("Schema", bound=BaseModel)


def human_bytes(n: float | None) -> str:
    if n is None:
        return "–"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def human_count(n: float | None) -> str:
    if n is None:
        return "–"
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return str(int(n))


def when(t: datetime | None) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%S UTC") if t else "–"


def duration(start: datetime | None, end: datetime | None = None) -> str:
    if start is None:
        return "–"
    s = int(((end or utcnow()) - start).total_seconds())
    return f"{s // 3600}h {s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m {s % 60:02d}s" if s >= 60 else f"{s}s"


def number(x: Any, digits: int = 4) -> str:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return "–" if x is None else str(x)
    return f"{x:,}" if isinstance(x, int) else f"{x:.{digits}g}"


templates.env.filters.update(bytes=human_bytes, count=human_count, when=when, number=number)
templates.env.globals.update(duration=duration)


def page(request: Request, auth: ConsoleAuth | None, name: str, status: int = 200, **context: Any) -> HTMLResponse:
    return templates.TemplateResponse(
        request, name, {"auth": auth, "org": auth.org if auth else None, **context}, status_code=status
    )


def error_page(request: Request, status: int, title: str, message: str) -> HTMLResponse:
    return templates.TemplateResponse(
        request, "error.html", {"auth": None, "org": None, "title": title, "message": message}, status_code=status
    )


class ConsoleRoute(APIRoute):
    """Console routes answer in HTML: no session -> sign-in redirect, missing/not visible -> 404 page,
    a refused action -> the API's own message on an error page."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def html_errors(request: Request) -> Response:
            try:
                return await handler(request)
            except LoginRequired as exc:
                query = urlencode({"next": exc.next_path, "reason": exc.reason})
                return RedirectResponse(f"/console/login?{query}", status_code=303)
            except CsrfError:
                return error_page(
                    request,
                    403,
                    "Form refused",
                    "This form was not sent by a console page of this "
                    "session (its CSRF token is missing or wrong). Reload the page and submit it again.",
                )
            except crud.NotFound as exc:
                return error_page(request, 404, "Not found", str(exc))
            except ApiError as exc:
                return error_page(request, exc.status, "Refused", exc.message)

        return html_errors


def validate(
    schema: type[Schema], form: dict[str, str], fields: tuple[str, ...]
) -> tuple[Schema | None, dict[str, str]]:
    """Form text -> the API's request schema; on failure, one message per field for inline display.
    Blank optional fields are left out so the schema's defaults apply, exactly as in a JSON request."""
    data = {k: form[k].strip() for k in fields if form.get(k, "").strip() != ""}
    try:
        return schema.model_validate(data), {}
    except ValidationError as exc:
        errors: dict[str, str] = {}
        for err in exc.errors():
            field = str(err["loc"][0]) if err.get("loc") else "form"
            errors.setdefault(field, err.get("msg", "invalid value").removeprefix("Value error, "))
        return None, errors


def action_error(exc: Exception) -> str:
    """The message of a refused action (the same text the REST API would send)."""
    if isinstance(exc, ApiError):
        return exc.message
    return str(exc)


ACTION_ERRORS = (ApiError, crud.NotFound, crud.Conflict, ValueError)
