"""Running the app under uvicorn so that SIGTERM drains clients instead of cutting them off."""

from __future__ import annotations

import asyncio

import uvicorn
from starlette.applications import Starlette

from service.settings import Settings


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT, first tell every subscriber to leave (SSE farewell with retry:, long-poll
    202), then let uvicorn's graceful shutdown wait for the now-closing connections."""

    def __init__(self, config: uvicorn.Config, app: Starlette):
        super().__init__(config)
        self.starlette_app = app

    def handle_exit(self, sig, frame) -> None:
        hub = getattr(self.starlette_app.state, "hub", None)
        if hub is not None:
            # A signal handler may interrupt the loop anywhere: schedule the drain as a callback.
            asyncio.get_event_loop().call_soon_threadsafe(hub.drain)
        super().handle_exit(sig, frame)


def serve(app: Starlette, settings: Settings) -> None:
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.shutdown_grace) + 1,
        proxy_headers=False,
        server_header=False,
        limit_concurrency=settings.max_subscribers + 1000,  # beyond this uvicorn answers 503 itself
        timeout_keep_alive=5,
    )
    DrainingServer(config, app).run()
