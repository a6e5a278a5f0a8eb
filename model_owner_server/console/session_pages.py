"""Console sign-in and sign-out, and the console's front door."""

from __future__ import annotations

import secrets

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from model_owner_server import crud
from model_owner_server.api.deps import SessionDep, SettingsDep
from model_owner_server.core.security import organization_for_key

from .auth import (
    LOGIN_CSRF_COOKIE,
    SESSION_COOKIE,
    FormDep,
    LoginFormDep,
    end_session,
    safe_next,
    set_cookie,
    start_session,
)
from .views import ConsoleRoute, page

router = APIRouter(prefix="/console", route_class=ConsoleRoute, include_in_schema=False)
BAD_KEY = (
    "That API key was not accepted: it is wrong or has been revoked. Paste the whole key (it starts with "
    "sot_), or ask the model owner for a new one (`modelowner-server create-org`)."
)


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
    key = form.get("api_key", "").strip()
    org = organization_for_key(session, key) if key else None  # the REST API's own key check
    if org is None:
        return _login_page(
            request,
            settings,
            status=401,
            error=BAD_KEY if key else "Enter your organization's API key (it starts with sot_).",
        )
    token = start_session(session, org, settings)
    crud.audit(session, org, "console_sign_in", "organization", org.id)
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
