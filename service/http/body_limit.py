"""Every request body is bounded before it is read in full: one ASGI middleware for every endpoint.

A declared Content-Length over the limit is answered 413 before the app runs; a body without one
(chunked) is counted as it arrives, and the read that passes the limit raises the same 413 in the
endpoint that reads it (runbell.service.http.params.read_body); past the limit after an answer has
begun (a stream, which reads only to see its client leave), the rest is dropped. uvicorn holds at
most about 64 KiB of a body the app has not asked for, and discards what comes after the answer, so
nothing a client sends past the limit is kept.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from runbell.service.http.errors import ApiError, error_response

BODY_TOO_LARGE = 413


def body_too_large(limit: int) -> ApiError:
    return ApiError(
        BODY_TOO_LARGE,
        "body_too_large",
        f"the request body is larger than this endpoint's limit of {limit} bytes",
        accepted={"max_bytes": limit},
    )


class BodyLimit:
    """Bodies of at most ``limit`` bytes; ``limits`` gives other limits to some paths (the events
    endpoint takes an event up to the event cap)."""

    def __init__(self, app: Any, limit: int, limits: Mapping[str, int] | None = None):
        self.app, self.limit, self.limits = app, limit, dict(limits or {})

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limits.get(scope["path"], self.limit)
        declared = content_length(scope)
        if declared is not None and declared > limit:
            error = body_too_large(limit)
            await error_response(error.status, error.code, error.message, error.accepted)(scope, receive, send)
            return
        received = 0
        started = False

        async def bounded_receive() -> dict[str, Any]:
            nonlocal received
            message: dict[str, Any] = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    if started:  # too late for a 413 (a stream that reads only to see the client leave): dropped
                        return {**message, "body": b""}
                    raise body_too_large(limit)
            return message

        async def watched_send(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, bounded_receive, watched_send)


def content_length(scope: dict[str, Any]) -> int | None:
    """The declared Content-Length (uvicorn refuses a malformed one before the app runs)."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None
