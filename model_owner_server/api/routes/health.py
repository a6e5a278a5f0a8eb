from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from model_owner_server.core.db import ping
from shared import schemas

router = APIRouter(tags=["health"])

try:
    VERSION = version("scaleot-offsite-tuning")
except PackageNotFoundError:  # running from a source tree without `pip install -e .`
    VERSION = "0.0.0+source"


@router.get(
    "/healthz",
    response_model=schemas.Health,
    responses={503: {"model": schemas.Health, "description": "database unreachable"}},
)
def healthz(request: Request) -> JSONResponse:
    """Liveness plus database reachability (no authentication)."""
    ok = ping(request.app.state.engine)
    body = schemas.Health(status="ok" if ok else "degraded", database="ok" if ok else "unreachable", version=VERSION)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)
