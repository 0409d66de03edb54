"""`runbell serve` in a subprocess: a real gateway process that a test can SIGTERM, SIGKILL and start again."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
READY_SECONDS = 30


class ServedGateway:
    """`runbell serve` in a subprocess on a fixed port, which can be killed and started again there."""

    def __init__(self, env: dict[str, str], port: int, log: Path, no_auth: bool = True):
        self.env, self.port, self.log, self.no_auth = env, port, log, no_auth
        self.url = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        assert self.process is None or self.process.poll() is not None
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
        deadline = time.monotonic() + READY_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"runbell serve exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop(signal.SIGKILL)
        pytest.fail(f"runbell serve was not ready within {READY_SECONDS} s:\n{self.log.read_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout)

    def restart(self, sig: int) -> None:
        self.stop(sig)
        self.start()
