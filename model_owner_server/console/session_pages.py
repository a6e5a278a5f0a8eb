"""Console sign-in and sign-out, and the console's front door."""

from __future__ import annotations

import secrets

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from model_owner_server.api.deps import SessionDep, SettingsDep

from .auth import (
    LOGIN_CSRF_COOKIE,
    SESSION_COOKIE,
    FormDep,
    LoginFormDep,
    SignInRefused,
    end_session,
    safe_next,
    set_cookie,
    sign_in,
)
from .views import ConsoleRoute, page

router = APIRouter(prefix="/console", route_class=ConsoleRoute, include_in_schema=False)


@router.get("", include_in_schema=False)
def index() -> RedirectResponse:
    return RedirectResponse("/console/models", status_code=303)


def _login_page(
    request: Request, settings: SettingsDep, *, error: str | None = None, notice: str | None = None, status: int = 200
) -> HTMLResponse:
    token = secrets.token_urlsafe(32)  # double-submit: the same value in the form and in a Strict cookie
    response = page(
        request,
        None,
        "login.html",
        status,
        login_csrf=token,
        error=error,
        notice=notice or request.query_params.get("reason"),
        next=safe_next(request.query_params.get("next")),
    )
    set_cookie(response, request, settings, LOGIN_CSRF_COOKIE, token, max_age=3600)
    return response


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, settings: SettingsDep) -> HTMLResponse:
    return _login_page(request, settings)


@router.post("/login", response_class=HTMLResponse)
def login(request: Request, session: SessionDep, settings: SettingsDep, form: LoginFormDep) -> Response:
    try:  # the REST API's own key check; audited either way (console/auth.py)
        token = sign_in(request, session, settings, form.get("api_key", "").strip())
    except SignInRefused as exc:
        return _login_page(request, settings, status=401, error=str(exc))
    session.commit()
    response = RedirectResponse(safe_next(form.get("next")), status_code=303)
    set_cookie(response, request, settings, SESSION_COOKIE, token, max_age=settings.console_session_minutes * 60)
    response.delete_cookie(LOGIN_CSRF_COOKIE, path="/console")
    return response


@router.post("/logout", response_class=HTMLResponse)
def logout(request: Request, session: SessionDep, settings: SettingsDep, form: FormDep) -> Response:
    end_session(session, request)
    session.commit()
    response = _login_page(request, settings, notice="Signed out.")
    response.delete_cookie(SESSION_COOKIE, path="/console")
    return response
