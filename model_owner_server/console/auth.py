"""Console sign-in: an organization's API key is exchanged for a server-side session.

The cookie holds a random token; the database keeps only its sha256 (as for API keys), the organization,
the API key it was signed in with, a per-session CSRF token, the expiry and the last use, so sign-out,
expiry (SCALEOT_CONSOLE_SESSION_MINUTES) and the idle timeout (SCALEOT_CONSOLE_IDLE_MINUTES) are enforced by
the server, and a session ends as soon as its key is revoked or expires or its organization is deleted. The
key is checked by the same code as the REST API's bearer auth (core.security.check_api_key), and the
signed-in organization then goes through the same crud.visible_* / route functions as an API call.
Sign-ins, refused sign-ins (bounded like the API's refused keys) and sign-outs go to the audit log.

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
from sqlalchemy import delete, update
from sqlalchemy.orm import Session

from model_owner_server import crud
from model_owner_server.api.deps import SessionDep, SettingsDep
from model_owner_server.audit_log import record_refused_key
from model_owner_server.core.config import Settings
from model_owner_server.core.security import TOUCH_EVERY, check_api_key, key_state, touch
from model_owner_server.models import ApiKey, ConsoleSession, Organization, utcnow

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


class SignInRefused(Exception):
    """The sign-in form's key was refused; the message says why and what to do."""


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


BAD_KEY = (
    "That API key was not accepted: it is wrong or has been revoked. Paste the whole key (it starts with "
    "sot_), or ask the model owner for a new one (`modelowner-server create-key ORG`)."
)


def start_session(session: Session, org: Organization, key: ApiKey, settings: Settings) -> str:
    """Record a new session for `org`, signed in with `key` (and drop its expired ones); return the cookie
    token."""
    now = utcnow()
    session.execute(delete(ConsoleSession).where(ConsoleSession.org_id == org.id, ConsoleSession.expires_at <= now))
    token = secrets.token_urlsafe(32)
    session.add(
        ConsoleSession(
            token_hash=_hash(token),
            org_id=org.id,
            api_key_id=key.id,
            csrf_token=secrets.token_urlsafe(32),
            created_at=now,
            expires_at=now + timedelta(minutes=settings.console_session_minutes),
            last_seen_at=now,
        )
    )
    return token


def sign_in(request: Request, session: Session, settings: Settings, key: str) -> str:
    """Check the sign-in form's key (as the REST API does), start a session, audit it; return the cookie
    token. A refused key raises SignInRefused (and is audited, bounded like the API's refused keys)."""
    if not key:
        raise SignInRefused("Enter your organization's API key (it starts with sot_).")
    check = check_api_key(session, key)
    if check.org is None or check.key is None:
        record_refused_key(request, key, check, action="console_sign_in_failed")
        raise SignInRefused(BAD_KEY if check.reason == "unknown" else check.message[:1].upper() + check.message[1:])
    token = start_session(session, check.org, check.key, settings)
    crud.audit(session, check.org, "console_sign_in", "organization", check.org.id, key_id=check.key.id)
    return token


def end_session(session: Session, request: Request) -> None:
    token = request.cookies.get(SESSION_COOKIE)
    if token:
        row = session.get(ConsoleSession, _hash(token))
        if row is not None:
            session.delete(row)
            org = session.get(Organization, row.org_id)
            crud.audit(session, org, "console_sign_out", "organization", row.org_id, key_id=row.api_key_id)


def current_console(request: Request, session: SessionDep, settings: SettingsDep) -> ConsoleAuth:
    next_path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    token = request.cookies.get(SESSION_COOKIE)
    if not token:
        raise LoginRequired(next_path, "Sign in with your organization's API key to use the console.")
    row = session.get(ConsoleSession, _hash(token))
    org = session.get(Organization, row.org_id) if row is not None else None
    if row is None or org is None:
        raise LoginRequired(next_path, "You were signed out; sign in again.")
    now = utcnow()
    key = session.get(ApiKey, row.api_key_id)
    ended = None
    if row.expires_at <= now:
        ended = "Your console session expired; sign in again."
    elif key is None or key_state(key, now) != "active":
        state = key_state(key, now) if key is not None else "revoked"
        ended = f"The API key this session was signed in with was {state}; sign in with a current key."
    elif row.last_seen_at + timedelta(minutes=settings.console_idle_minutes) <= now:
        ended = f"You were signed out after {settings.console_idle_minutes} minutes without activity; sign in again."
    if ended:
        session.delete(row)
        session.commit()
        raise LoginRequired(next_path, ended)
    if now - row.last_seen_at >= TOUCH_EVERY:  # the idle clock, refreshed at most once a minute
        touch(
            session,
            update(ConsoleSession).where(ConsoleSession.token_hash == row.token_hash).values(last_seen_at=now),
            f"console:{row.token_hash}",
        )
    return ConsoleAuth(org=org, csrf_token=row.csrf_token)


ConsoleDep = Annotated[ConsoleAuth, Depends(current_console)]


def tokens_match(expected: str | None, given: object) -> bool:
    if not expected or not isinstance(given, str):
        return False
    return hmac.compare_digest(expected.encode(), given.encode())


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
