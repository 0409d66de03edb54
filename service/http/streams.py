"""A run's event stream and its long-poll result served as plain ASGI, ahead of Starlette's middleware stack.

A stream lives as long as its client, and every layer its request went through stays suspended with
it: the middleware, the router, the route's wrappers, ~5 KiB of coroutine frames and closures per
connection (tracemalloc, 1,000 idle streams), kept for nothing once the response has started. A
long-poll waiter is held as long, and its answer went back out through every layer's send wrapper.
So the routes most clients hold, a run's events and its result, are matched here first and their
endpoint called with Starlette's own Request and the app's exception handlers, as the route would
call it; anything else, and anything this does not match exactly, goes on to the app."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Match, Route

from runbell.service.http.body_limit import content_length

log = logging.getLogger("runbell.http")


STREAMED = ("run_events", "run_result")  # the names of the routes served here


class StreamRoutes:
    """Serve `routes` (GET and HEAD only) directly; pass every other request to `app`."""

    def __init__(self, app: Starlette, routes: Sequence[Route]):
        self.app, self.routes = app, routes

    @classmethod
    def of(cls, app: Starlette) -> StreamRoutes:
        return cls(app, [route for route in app.routes if isinstance(route, Route) and route.name in STREAMED])

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        matched = self._match(scope)
        if matched is None:
            await self.app(scope, receive, send)
            return
        route, child = matched
        scope = {**scope, **child, "app": self.app}
        request = Request(scope, receive)
        try:
            response = await route.endpoint(request)
        except Exception as exc:  # before the response: answered as the app's handlers answer it
            handled, handler = self._handler(exc)
            if handler is None:
                raise
            if handled is Exception:  # the catch-all: ServerErrorMiddleware re-raised it, and uvicorn logged it
                log.exception("unexpected error on %s", route.path)
            response = await handler(request, exc)
        await response(scope, receive, send)

    def _match(self, scope: dict[str, Any]) -> tuple[Route, Mapping[str, Any]] | None:
        if scope["type"] != "http" or scope["method"] not in ("GET", "HEAD"):
            return None
        if b"%2f" in (scope.get("raw_path") or b"").lower():
            return None  # the app refuses it (runbell.service.http.params.EncodedSlashes)
        if has_body(scope):
            return None  # the app bounds it (runbell.service.http.body_limit.BodyLimit): 413 over its limit
        for route in self.routes:
            match, child = route.matches(scope)
            if match is Match.FULL:
                return route, child
        return None

    def _handler(self, exc: Exception) -> tuple[type | None, Any]:
        """(the class its handler is registered for, the handler): the nearest in the exception's MRO."""
        handlers = self.app.exception_handlers
        return next(((cls, handlers[cls]) for cls in type(exc).__mro__ if cls in handlers), (None, None))


def has_body(scope: dict[str, Any]) -> bool:
    """Whether the request declares a body: a Content-Length other than 0, or a chunked one."""
    return content_length(scope) not in (None, 0) or any(name == b"transfer-encoding" for name, _ in scope["headers"])
