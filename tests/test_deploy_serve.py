"""deploy/serve installs only when it must: no .venv yet, or pyproject.toml changed since the last
successful install. Run in a scratch copy with stand-ins for python and runbell (no pip, no gateway)."""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# `python -m venv .venv` makes a .venv whose python logs each pip call (and fails it when told to)
# and whose runbell prints its arguments.
FAKE_PYTHON = """#!/usr/bin/env bash
set -eu
if [ "$1 $2" = "-m venv" ]; then
  mkdir -p "$3/bin"
  cp "$0" "$3/bin/python"
  printf '#!/usr/bin/env bash\\necho "runbell $*"\\n' >"$3/bin/runbell"
  chmod +x "$3/bin/runbell"
  exit 0
fi
echo "$*" >>"$PIP_LOG"
exit "${PIP_EXIT:-0}"
"""


def scratch_clone(tmp_path: Path) -> Path:
    clone = tmp_path / "clone"
    (clone / "deploy").mkdir(parents=True)
    shutil.copy(REPO / "deploy" / "serve", clone / "deploy" / "serve")
    shutil.copy(REPO / "pyproject.toml", clone / "pyproject.toml")
    python = tmp_path / "python3"
    python.write_text(FAKE_PYTHON)
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    return clone


def serve(clone: Path, tmp_path: Path, pip_exit: int = 0) -> tuple[subprocess.CompletedProcess, list[str]]:
    log = tmp_path / "pip.log"
    log.write_text("")
    env = {"PATH": "/usr/bin:/bin", "PYTHON": str(tmp_path / "python3"), "PIP_LOG": str(log), "PIP_EXIT": str(pip_exit)}
    done = subprocess.run([str(clone / "deploy" / "serve"), "--port", "9000"], env=env, capture_output=True, text=True, timeout=60)
    return done, log.read_text().splitlines()


def test_pip_runs_only_for_a_new_venv_or_a_changed_pyproject(tmp_path):
    clone = scratch_clone(tmp_path)
    first, pip = serve(clone, tmp_path)
    assert first.returncode == 0, first.stderr
    assert pip == ["-m pip install -q --disable-pip-version-check -e .[gateway]"]
    assert first.stdout == "runbell serve --host 127.0.0.1 --no-auth --port 9000\n"

    (clone / "service.py").write_text("# a source edit: the editable install needs no pip\n")
    again, pip = serve(clone, tmp_path)
    assert (again.returncode, pip, again.stdout) == (0, [], first.stdout)

    with open(clone / "pyproject.toml", "a") as pyproject:
        pyproject.write("# a new dependency, say\n")
    changed, pip = serve(clone, tmp_path)
    assert changed.returncode == 0 and len(pip) == 1


def test_a_failed_install_is_tried_again_next_time(tmp_path):
    clone = scratch_clone(tmp_path)
    failed, pip = serve(clone, tmp_path, pip_exit=1)
    assert failed.returncode == 1 and len(pip) == 1 and failed.stdout == ""  # and the gateway is not started
    retried, pip = serve(clone, tmp_path)
    assert retried.returncode == 0 and len(pip) == 1
