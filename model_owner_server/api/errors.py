"""One error shape for every failure: `{"error": {"code": ..., "message": ...}}`.

FastAPI's own HTTPException and request-validation handlers are overridden so clients never have to
parse two formats; unexpected exceptions become a 500 with the same shape (details go to the log).
"""

from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError as SQLAlchemyDataError
from sqlalchemy.exc import OperationalError as SQLAlchemyOperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from model_owner_server import crud
from model_owner_server.storage import is_disk_full

log = logging.getLogger("scaleot.api")

_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    411: "length_required",
    413: "payload_too_large",
    415: "unsupported_media_type",
    416: "range_not_satisfiable",
    422: "validation_error",
    429: "too_many_requests",
    503: "unavailable",
    507: "insufficient_storage",
}
DISK_FULL_MESSAGE = (
    "the server ran out of disk space while storing your request; nothing was kept. "
    "Try again later (the model owner must free space in SCALEOT_DATA_DIR)"
)


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def not_found(message: str) -> ApiError:
    return ApiError(404, "not_found", message)


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def _loc(loc: tuple) -> str:
    parts = [str(p) for p in loc if p not in ("body",)]
    return ".".join(parts) or "body"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(crud.NotFound)
    async def _not_found(_: Request, exc: crud.NotFound) -> JSONResponse:
        return error_response(404, "not_found", str(exc))

    @app.exception_handler(crud.Conflict)
    async def _conflict(_: Request, exc: crud.Conflict) -> JSONResponse:
        return error_response(409, "conflict", str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _CODES.get(exc.status_code, "error")
        detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        if exc.status_code == 404 and detail == "Not Found":
            detail = "no such endpoint; see /docs for the API"
        return error_response(exc.status_code, code, detail, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors()[:5]:
            if err.get("type") == "json_invalid":
                problems.append("the request body is not valid JSON")
            else:
                problems.append(f"{_loc(tuple(err.get('loc', ())))}: {err.get('msg', 'invalid')}")
        return error_response(422, "validation_error", "invalid request: " + "; ".join(problems))

    async def _disk_full(_: Request, exc: Exception) -> JSONResponse:
        if not is_disk_full(exc):
            raise exc  # -> the 500 handler below
        log.error("disk full: %s", exc)
        return error_response(507, "insufficient_storage", DISK_FULL_MESSAGE)

    # Handled here (not in the catch-all) so a full disk is a clean, expected answer, not a logged crash.
    app.add_exception_handler(OSError, _disk_full)
    app.add_exception_handler(SQLAlchemyOperationalError, _disk_full)

    @app.exception_handler(SQLAlchemyDataError)
    async def _data_error(_: Request, exc: SQLAlchemyDataError) -> JSONResponse:
        # The database refused a value the client sent (e.g. PostgreSQL: NUL in a text field). The failed
        # statement's transaction is rolled back when the request's session closes; nothing was stored.
        if "NUL" in str(exc.orig):
            return error_response(422, "validation_error", "text fields must not contain NUL characters")
        log.warning("database refused a request value: %s", exc.orig)
        return error_response(422, "validation_error", "a value in the request is not valid for the database")

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return error_response(500, "internal_error", "internal server error; the server log has details")
