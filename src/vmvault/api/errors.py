"""The one place API errors become responses: JSON {code, message, hint} with the class's http_status."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from vmvault.errors import Unauthorized, VmvaultError

log = logging.getLogger("vmvault")

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid_input",
}
_HTTP_HINTS = {
    400: "send a JSON body (UTF-8) with Content-Type: application/json",
    404: "see the API at /docs",
    405: "see the API at /docs",
}


def error_body(code: str, message: str, hint: str | None, **extra: Any) -> dict[str, Any]:
    return {"code": code, "message": message, "hint": hint, **extra}


def error_response(exc: VmvaultError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else None
    return JSONResponse(error_body(exc.code, exc.message, exc.hint), status_code=exc.http_status, headers=headers)


def install(app: FastAPI) -> None:
    """Register the handlers: VmvaultError (by class), request validation, HTTP errors, anything else."""

    @app.exception_handler(VmvaultError)
    def _vmvault(_request: Request, exc: VmvaultError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            {"location": [str(p) for p in e.get("loc", ())], "message": str(e.get("msg", ""))} for e in exc.errors()
        ]
        first = problems[0] if problems else {"location": [], "message": "invalid request"}
        where = ".".join(first["location"][1:]) or ".".join(first["location"]) or "request"
        return JSONResponse(
            error_body(
                "invalid_input",
                f"{where}: {first['message']}",
                "see the operation's schema at /docs",
                details=problems,
            ),
            status_code=422,
        )

    @app.exception_handler(StarletteHTTPException)
    def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        hint = _HTTP_HINTS.get(exc.status_code)
        return JSONResponse(error_body(code, str(exc.detail), hint), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected API error")
        return JSONResponse(
            error_body("internal_error", f"unexpected error: {type(exc).__name__}", "see the server's log"),
            status_code=500,
        )
