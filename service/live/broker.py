"""Which Redis the gateway uses, and the embedded development broker for a first run with no servers."""

from __future__ import annotations

import logging
import socket
import socketserver
import threading
from dataclasses import dataclass
from urllib.parse import urlparse

from runbell.listeners.config import DEFAULT_REDIS_URL

log = logging.getLogger("runbell.broker")


@dataclass
class EmbeddedBroker:
    """fakeredis's TCP server in a thread: speaks pub/sub, streams and Lua, but pushes messages
    about 10 ms late (it polls). For development only, never for production or measurements."""

    server: socketserver.BaseServer
    thread: threading.Thread
    url: str

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def resolve_redis(configured: str | None) -> tuple[str, EmbeddedBroker | None]:
    """The configured URL; else localhost:6379 when it answers; else a new embedded broker."""
    if configured:
        return configured, None
    default = urlparse(DEFAULT_REDIS_URL)
    if port_answers(default.hostname, default.port):  # type: ignore[arg-type]  # DEFAULT_REDIS_URL names a host and a port
        return DEFAULT_REDIS_URL, None
    broker = start_embedded(default.hostname, default.port)  # type: ignore[arg-type]
    log.warning(
        "No Redis configured and none answering on %s:%s: started an EMBEDDED development broker at %s."
        " It is for development only (in memory, slower); set RUNBELL_REDIS_URL for anything else."
        " A local Airflow's hook publishes to it with RUNBELL_REDIS_URL=%s",
        default.hostname,
        default.port,
        broker.url,
        broker.url,
    )
    return broker.url, broker


def start_embedded(host: str, preferred_port: int) -> EmbeddedBroker:
    from fakeredis import TcpFakeServer

    # The hook's default URL is localhost:6379, so take that port when it is free.
    for port in (preferred_port, 0):
        try:
            server = TcpFakeServer((host, port), server_type="redis")
            break
        except OSError:
            continue
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="runbell-embedded-redis", daemon=True)
    thread.start()
    bound_host, bound_port = server.server_address[:2]
    return EmbeddedBroker(server=server, thread=thread, url=f"redis://{bound_host}:{bound_port}/0")  # type: ignore[str-bytes-safe]  # a TCP server's address is (host, port), never bytes


def port_answers(host: str, port: int, timeout: float = 0.3) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False
