"""Typed dependencies: settings, DB session, the calling organization, admin-only guard."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from model_owner_server.audit_log import record_refused_key
from model_owner_server.core.config import Settings
from model_owner_server.core.security import check_api_key
from model_owner_server.jobs.queue import JobQueue
from model_owner_server.keyring import KeyRing
from model_owner_server.models import Organization
from model_owner_server.storage import Storage

from .errors import ApiError
from .quotas import Admission, admit_request, request_limiter

_bearer = HTTPBearer(auto_error=False, description="API key from `modelowner-server create-org`")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_storage(request: Request) -> Storage:
    return request.app.state.storage


def get_queue(request: Request) -> JobQueue:
    return request.app.state.queue


def get_keyring(request: Request) -> KeyRing:
    return request.app.state.keyring


def get_db(request: Request) -> Iterator[Session]:
    session = request.app.state.sessions()
    try:
        yield session
    finally:
        session.close()  # rolls back anything a failed request left uncommitted


SettingsDep = Annotated[Settings, Depends(get_settings)]
StorageDep = Annotated[Storage, Depends(get_storage)]
QueueDep = Annotated[JobQueue, Depends(get_queue)]
KeyRingDep = Annotated[KeyRing, Depends(get_keyring)]
SessionDep = Annotated[Session, Depends(get_db)]


def current_org(
    admission: Annotated[Admission, Depends(admit_request)],  # request-rate limits first (api/quotas.py)
    request: Request,
    session: SessionDep,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Organization:
    challenge = {"WWW-Authenticate": "Bearer"}
    if creds is None or creds.scheme.lower() != "bearer" or not creds.credentials:
        raise ApiError(
            401,
            "unauthorized",
            "missing API key: send 'Authorization: Bearer <key>' (create one with `modelowner-server create-org`)",
            challenge,
        )
    check = check_api_key(session, creds.credentials.strip())
    org = check.org
    if org is None:  # a presented key was refused: audited (bounded per minute), the key itself never logged
        record_refused_key(request, creds.credentials.strip(), check)
        raise ApiError(401, "unauthorized", check.message, challenge)
    request_limiter(request).check_org(org, admission)
    return org


OrgDep = Annotated[Organization, Depends(current_org)]


def require_admin(org: OrgDep) -> Organization:
    if not org.is_admin:
        raise ApiError(403, "forbidden", "this operation needs an admin (model-owner) API key")
    return org


AdminDep = Annotated[Organization, Depends(require_admin)]
