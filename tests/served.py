"""`runbell serve` in a subprocess: a real gateway process that a test can SIGTERM, SIGKILL, hang
(SIGSTOP) and start again (process control from tests/engines.py)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.engines import START_SECONDS, ManagedProcess, wait_until

REPO = Path(__file__).resolve().parents[1]


class ServedGateway(ManagedProcess):
    """`runbell serve` in a subprocess on a fixed port, which can be killed and started again there."""

    def __init__(self, env: dict[str, str], port: int, log: Path, no_auth: bool = True):
        self.env, self.port, self.log, self.no_auth = env, port, log, no_auth
        self.url = f"http://127.0.0.1:{port}"
        self.address = f"127.0.0.1:{port}"
        self.process: subprocess.Popen | None = None
        self.starts = 0
        self.last_readyz = ""  # the last answer of /readyz that ready() saw (for a failure's message)

    def spawn(self) -> None:
        """Starts the process without waiting for it (wait_ready does): several start side by side."""
        assert not self.alive
        self.starts += 1
        with open(self.log, "a") as log:
            log.write(f"\n---- start #{self.starts}\n")
            self.process = subprocess.Popen(
                [sys.executable, "-m", "runbell.service.client.cli", "serve", "--port", str(self.port)]
                + (["--no-auth"] if self.no_auth else []),
                cwd=REPO,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def ready(self) -> bool:
        """GET /readyz answers 200 (a process that exited fails the test with its log)."""
        if not self.alive:
            assert self.process is not None
            pytest.fail(f"runbell serve exited with {self.process.returncode}:\n{self.log_tail()}", pytrace=False)
        try:
            answer = httpx.get(self.url + "/readyz", timeout=1)
        except httpx.TransportError as exc:
            self.last_readyz = repr(exc)
            return False
        self.last_readyz = answer.text
        return answer.status_code == 200

    def wait_ready(self, timeout: float = START_SECONDS) -> None:
        self.last_readyz = ""
        wait_until(
            self.ready, f"runbell serve on {self.address} ready", timeout, lambda: f"last /readyz: {self.last_readyz}\n{self.log_tail()}"
        )

    def start(self) -> None:
        self.spawn()
        self.wait_ready()

    def restart(self, sig: int = signal.SIGTERM) -> None:
        self.stop(sig)
        self.start()


class ServedGateways:
    """What the served_gateway fixture gives: served_gateway(auth=False, **extra_env) starts one gateway
    on a free port and waits until it is ready; served_gateway.many(n, ...) starts n side by side. All
    share base_env (extra_env on top); close() SIGKILLs those still running."""

    def __init__(self, base_env: dict[str, str], directory: Path):
        self.base_env, self.directory = base_env, directory
        self.started: list[ServedGateway] = []

    def spawn(self, auth: bool = False, **extra: str) -> ServedGateway:
        from tests.conftest import free_port

        log = self.directory / f"gateway-{len(self.started)}.log"
        gateway = ServedGateway({**self.base_env, **extra}, free_port(), log, no_auth=not auth)
        self.started.append(gateway)
        gateway.spawn()
        return gateway

    def __call__(self, auth: bool = False, **extra: str) -> ServedGateway:
        gateway = self.spawn(auth, **extra)
        gateway.wait_ready()
        return gateway

    def many(self, count: int, auth: bool = False, **extra: str) -> list[ServedGateway]:
        gateways = [self.spawn(auth, **extra) for _ in range(count)]
        for gateway in gateways:
            gateway.wait_ready()
        return gateways

    def close(self) -> None:
        for gateway in self.started:
            gateway.ensure_stopped()
