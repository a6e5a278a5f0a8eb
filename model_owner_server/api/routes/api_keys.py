"""API keys and organizations: list, create, revoke and rotate keys; delete an organization.

An admin manages every organization's keys; a data owner only its own organization's (another
organization is reported as missing, 404). `{org}` is an organization's name or id. Plaintext keys are
returned once, on creation; listings show the prefix only. A revoked or expired key, and every console
session signed in with it, stops working from the next request on.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Query, Response
from pydantic import BaseModel, ConfigDict, Field

from model_owner_server import crud
from model_owner_server.api.deps import AdminDep, OrgDep, SessionDep, SettingsDep, StorageDep
from model_owner_server.api.errors import ApiError
from model_owner_server.core.security import MAX_KEY_DAYS, key_state
from model_owner_server.models import ApiKey, Organization
from shared import schemas

router = APIRouter(prefix="/v1/orgs", tags=["organizations"])
ERR: dict[int | str, dict[str, Any]] = {s: {"model": schemas.ErrorBody} for s in (401, 403, 404, 409, 422)}


class ApiKeyInfo(BaseModel):
    id: str
    org_id: str
    name: str | None
    prefix: str = Field(description="the key's first characters, to tell keys apart (never the key or its hash)")
    state: str = Field(description="active, expired or revoked")
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None = Field(description="last accepted request (refreshed at most once a minute)")
    revoked_at: datetime | None


class ApiKeyList(BaseModel):
    keys: list[ApiKeyInfo]


class ApiKeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(None, max_length=100, description="a label, e.g. the machine that uses it")
    expires_in_days: int | None = Field(
        None, ge=1, le=MAX_KEY_DAYS, description="default SCALEOT_API_KEY_TTL_DAYS (none: never); at most that"
    )


class ApiKeyRotate(ApiKeyCreate):
    grace_minutes: int = Field(
        0, ge=0, le=7 * 24 * 60, description="0: revoke the old key now; else it keeps working this long"
    )


class NewApiKey(BaseModel):
    key: str = Field(description="the new key: shown only now (the server keeps its sha256)")
    api_key: ApiKeyInfo
    replaced: ApiKeyInfo | None = Field(None, description="rotation: the old key, revoked or expiring")


def key_info(k: ApiKey) -> ApiKeyInfo:
    return ApiKeyInfo(
        id=k.id,
        org_id=k.org_id,
        name=k.name,
        prefix=k.prefix,
        state=key_state(k),
        created_at=k.created_at,
        expires_at=k.expires_at,
        last_used_at=k.last_used_at,
        revoked_at=k.revoked_at,
    )


def _managed_org(session: SessionDep, caller: Organization, org: str) -> Organization:
    """The organization whose keys are asked for: any for an admin, only its own for a data owner."""
    target = crud.find_org(session, org) if caller.is_admin else None
    if not caller.is_admin and org in (caller.id, caller.name):
        target = caller
    if target is None:
        raise crud.NotFound(f"organization {org!r} not found (data owners manage their own organization's keys)")
    return target


@router.get("/{org}/keys", response_model=ApiKeyList, responses=ERR)
def list_keys(org: str, session: SessionDep, caller: OrgDep) -> ApiKeyList:
    """The organization's keys, oldest first: prefix, name, state, created, expires, last used, revoked."""
    return ApiKeyList(keys=[key_info(k) for k in crud.list_keys(session, _managed_org(session, caller, org))])


@router.post("/{org}/keys", status_code=201, response_model=NewApiKey, responses=ERR)
def create_key(org: str, body: ApiKeyCreate, session: SessionDep, caller: OrgDep, settings: SettingsDep) -> NewApiKey:
    """An additional key for the organization (e.g. before rotating, or one per machine)."""
    target = _managed_org(session, caller, org)
    try:
        row, key = crud.create_key(
            session, target, name=body.name, expires_in_days=body.expires_in_days, ttl_days=settings.api_key_ttl_days
        )
    except crud.Conflict:  # a ValueError too: answered 409 by its own handler
        raise
    except ValueError as exc:
        raise ApiError(422, "invalid_expiry", str(exc)) from None
    crud.audit(session, caller, "create_api_key", "api_key", row.id, org_id=target.id, prefix=row.prefix)
    session.commit()
    return NewApiKey(key=key, api_key=key_info(row), replaced=None)


@router.delete("/{org}/keys/{key_id}", response_model=ApiKeyInfo, responses=ERR)
def revoke_key(
    org: str,
    key_id: str,
    session: SessionDep,
    caller: OrgDep,
    confirm_last_key: bool = Query(
        False, description="revoke even the organization's last active key of your own (it locks you out)"
    ),
) -> ApiKeyInfo:
    """Revoke a key at once (its console sessions end too). Your organization's last active key needs
    `confirm_last_key=true`; an admin may revoke another organization's last key without it."""
    target = _managed_org(session, caller, org)
    key = crud.get_key(session, target, key_id)
    try:
        crud.revoke_key(session, key, allow_last=confirm_last_key or target.id != caller.id)
    except crud.LastKey as exc:
        raise ApiError(409, "last_key", str(exc)) from None
    crud.audit(session, caller, "revoke_api_key", "api_key", key.id, org_id=target.id, prefix=key.prefix)
    session.commit()
    return key_info(key)


@router.post("/{org}/keys/{key_id}/rotate", status_code=201, response_model=NewApiKey, responses=ERR)
def rotate_key(
    org: str, key_id: str, body: ApiKeyRotate, session: SessionDep, caller: OrgDep, settings: SettingsDep
) -> NewApiKey:
    """Replace a key: a new key (returned once) and the old one revoked now or after `grace_minutes`."""
    target = _managed_org(session, caller, org)
    old = crud.get_key(session, target, key_id)
    try:
        new, key = crud.rotate_key(
            session,
            old,
            grace_minutes=body.grace_minutes,
            name=body.name,
            expires_in_days=body.expires_in_days,
            ttl_days=settings.api_key_ttl_days,
        )
    except crud.Conflict:  # a ValueError too: answered 409 by its own handler
        raise
    except ValueError as exc:
        raise ApiError(422, "invalid_expiry", str(exc)) from None
    crud.audit(
        session,
        caller,
        "rotate_api_key",
        "api_key",
        old.id,
        org_id=target.id,
        new_key_id=new.id,
        grace_minutes=body.grace_minutes,
    )
    session.commit()
    return NewApiKey(key=key, api_key=key_info(new), replaced=key_info(old))


@router.delete("/{org}", status_code=204, responses=ERR)
def delete_org(org: str, session: SessionDep, admin: AdminDep, storage: StorageDep) -> Response:
    """Delete an organization (admin): its keys, grants, jobs, adapters (and their files) and console sessions
    go at once; the audit log keeps its rows. Refused for the last admin organization and while its jobs run."""
    target = crud.find_org(session, org)
    name, org_id = target.name, target.id
    adapter_ids = crud.delete_org(session, target)
    crud.audit(session, admin, "delete_org", "organization", org_id, name=name, adapters=len(adapter_ids))
    session.commit()
    for adapter_id in adapter_ids:
        storage.remove(storage.adapters / adapter_id)
    return Response(status_code=204)
