from __future__ import annotations

from typing import cast

from fastapi import APIRouter
from sqlalchemy import select

from model_owner_server.api.deps import OrgDep, SessionDep
from model_owner_server.models import SigningKeyRecord
from shared import schemas

router = APIRouter(prefix="/v1", tags=["signing"])


@router.get("/signing-keys", response_model=schemas.SigningKeyList)
def signing_keys(session: SessionDep, _org: OrgDep) -> schemas.SigningKeyList:
    """The server's Ed25519 public keys. `active` signs new manifests; `retired` keys still verify the
    manifests they signed; `revoked` keys must not be trusted (their manifests are re-signed on request)."""
    rows = session.execute(select(SigningKeyRecord).order_by(SigningKeyRecord.created_at)).scalars()
    return schemas.SigningKeyList(
        keys=[
            schemas.SigningKey(
                key_id=r.key_id,
                public_key=r.public_key,
                status=cast(schemas.KeyStatus, r.status),  # the column holds one of these (str in the ORM)
                created_at=r.created_at,
            )
            for r in rows
        ]
    )
