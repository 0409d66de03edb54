"""Every error answer is JSON: what was wrong, and what is accepted."""

from __future__ import annotations

from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, *, accepted: Any = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.accepted, self.headers = status, code, message, accepted, headers


def error_response(status: int, code: str, message: str, accepted: Any = None, headers: dict | None = None) -> JSONResponse:
    body: dict[str, Any] = {"error": code, "message": message}
    if accepted is not None:
        body["accepted"] = accepted
    return JSONResponse(body, status_code=status, headers=headers)


async def api_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.code, exc.message, exc.accepted, exc.headers)


async def http_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    codes = {404: "not_found", 405: "method_not_allowed"}
    message = {404: f"no route for {request.url.path}", 405: f"{request.method} is not allowed here"}
    return error_response(
        exc.status_code,
        codes.get(exc.status_code, "http_error"),
        message.get(exc.status_code, str(exc.detail)),
        headers=getattr(exc, "headers", None),
    )


async def unexpected_error_handler(request: Request, exc: Exception) -> JSONResponse:
    return error_response(500, "internal_error", "the gateway hit an unexpected error; it has been logged")
