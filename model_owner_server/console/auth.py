"""Console sign-in: an organization's API key is exchanged for a server-side session.

The cookie holds a random token; the database keeps only its sha256 (as for API keys), the organization,
a per-session CSRF token and the expiry, so sign-out and expiry are enforced by the server. The key is
checked by the same code as the REST API's bearer auth (core.security.organization_for_key), and the
signed-in organization then goes through the same crud.visible_* / route functions as an API call.

CSRF: every console form carries the session's token in a hidden field (compared in constant time);
the sign-in form, which has no session yet, uses a double-submit cookie. Cookies are HttpOnly and
SameSite=Strict, and Secure when the console is reached over HTTPS.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated

from fastapi import Depends, Request
from fastapi.responses import Response
from sqlalchemy import delete
from sqlalchemy.orm import Session

from model_owner_server.api.deps import SessionDep
from model_owner_server.core.config import Settings
from model_owner_server.models import ConsoleSession, Organization, utcnow

SESSION_COOKIE = "scaleot_console"
LOGIN_CSRF_COOKIE = "scaleot_console_login"
CSRF_FIELD = "csrf_token"


class LoginRequired(Exception):
    """No valid session: the console answers with a redirect to the sign-in page."""

    def __init__(self, next_path: str, reason: str):
        super().__init__(reason)
        self.next_path, self.reason = next_path, reason


class CsrfError(Exception):
    """A form post without the right CSRF token (a forged cross-site request, or a stale page)."""


@dataclass(frozen=True)
class ConsoleAuth:
    org: Organization
    csrf_token: str


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def secure_cookies(request: Request, settings: Settings) -> bool:
    """Secure cookies when the browser talks HTTPS: directly, or through a proxy whose public URL is https."""
    return request.url.scheme == "https" or (settings.public_url or "").startswith("https://")


def set_cookie(
    response: Response, request: Request, settings: Settings, name: str, value: str, max_age: int | None
) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path="/console",
        httponly=True,
        samesite="strict",
        secure=secure_cookies(request, settings),
    )


def start_session(session: Session, org: Organization, settings: Settings) -> str:
    """Record a new session for `org` (and drop its expired ones); return the cookie token."""
    now = utcnow()
    session.execute(delete(ConsoleSession).where(ConsoleSession.org_id == org.id, ConsoleSession.expires_at <= now))
    token = secrets.token_urlsafe(32)
    session.add(
        ConsoleSession(
            token_hash=_hash(token),
            org_id=org.id,
            csrf_token=secrets.token_urlsafe(32),
            created_at=now,
            expires_at=now + timedelta(minutes=settings.console_session_minutes),
        )
    )
    return token


def end_session(session: Session, request: Request) -> None:
    token = request.cookies.get(SESSION_COOKIE)
    if token:
        session.execute(delete(ConsoleSession).where(ConsoleSession.token_hash == _hash(token)))


def current_console(request: Request, session: SessionDep) -> ConsoleAuth:
    next_path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    token = request.cookies.get(SESSION_COOKIE)
    if not token:
        raise LoginRequired(next_path, "Sign in with your organization's API key to use the console.")
    row = session.get(ConsoleSession, _hash(token))
    org = session.get(Organization, row.org_id) if row is not None else None
    if row is None or org is None:
        raise LoginRequired(next_path, "You were signed out; sign in again.")
    if row.expires_at <= utcnow():
        session.delete(row)
        session.commit()
        raise LoginRequired(next_path, "Your console session expired; sign in again.")
    return ConsoleAuth(org=org, csrf_token=row.csrf_token)


ConsoleDep = Annotated[ConsoleAuth, Depends(current_console)]


def tokens_match(expected: str | None, given: object) -> bool:
    return bool(expected) and isinstance(given, str) and hmac.compare_digest(expected.encode(), given.encode())


async def _form_with_token(request: Request, expected: str | None) -> dict[str, str]:
    """The posted form's text fields, once its CSRF token matched `expected` (else CsrfError)."""
    form = await request.form()
    if not tokens_match(expected, form.get(CSRF_FIELD)):
        raise CsrfError()
    return {k: v for k, v in form.items() if isinstance(v, str) and k != CSRF_FIELD}


async def checked_form(request: Request, auth: ConsoleDep) -> dict[str, str]:
    return await _form_with_token(request, auth.csrf_token)


async def login_form(request: Request) -> dict[str, str]:
    """The sign-in form: no session yet, so its token is checked against the double-submit cookie."""
    return await _form_with_token(request, request.cookies.get(LOGIN_CSRF_COOKIE))


FormDep = Annotated[dict[str, str], Depends(checked_form)]
LoginFormDep = Annotated[dict[str, str], Depends(login_form)]


def safe_next(path: str | None) -> str:
    """Only console paths after sign-in: never an open redirect to another site."""
    if path and path.startswith("/console") and not path.startswith("//") and "\\" not in path:
        return path
    return "/console/models"
