"""Every error answer is JSON: what was wrong, and what is accepted."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, *, accepted: Any = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.accepted, self.headers = status, code, message, accepted, headers


class ErrorBody(BaseModel):
    """Every error answer (4xx and 5xx)."""

    error: str = Field(description="a code, e.g. bad_body, bad_timeout, run_not_found")
    message: str = Field(description="what was wrong, for a person")
    accepted: Any = Field(default=None, description="what is accepted instead; for a malformed body, its problems (type, loc, msg)")


def error_response(status: int, code: str, message: str, accepted: Any = None, headers: dict | None = None) -> JSONResponse:
    body = ErrorBody(error=code, message=message, accepted=accepted).model_dump(mode="json", exclude_none=True)
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
