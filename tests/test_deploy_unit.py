"""deploy/runbell.service: the gateway runs as a DynamicUser, whose only writable place is its
StateDirectory, so the spool must be there (else every event POSTed while Redis is down is refused)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parent.parent / "deploy" / "runbell.service"


def service_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    section = None
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]":
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_the_spool_is_inside_the_units_state_directory() -> None:
    service = service_settings()
    assert service["DynamicUser"] == ["yes"]
    [state] = service["StateDirectory"]
    spool = [v.split("=", 1)[1] for v in service.get("Environment", []) if v.startswith("RUNBELL_SPOOL_DIR=")]
    assert spool, "the unit sets no RUNBELL_SPOOL_DIR: the default (a home directory) is not writable under DynamicUser"
    assert spool[0].startswith(f"%S/{state}/")  # %S is /var/lib: StateDirectory=runbell is /var/lib/runbell


def test_the_unit_verifies(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (the settings are checked above)")
    unit = tmp_path / "runbell.service"  # the ExecStart binary and the env file exist only once installed
    text = UNIT.read_text().replace("ExecStart=/opt/runbell/venv/bin/runbell", "ExecStart=/bin/true")
    unit.write_text(text.replace("EnvironmentFile=/etc/runbell/env", "EnvironmentFile=-/etc/runbell/env"))
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Unknown key" not in done.stderr and "Ignoring" not in done.stderr, done.stderr
