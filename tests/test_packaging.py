"""What `pip install` really gives: the wheel's contents, a hook-only install in a fresh virtualenv,
and the editable install of the repo's own .venv.

The wheel is built once per session from a copy of what the build reads (an in-tree build would
reuse whatever a previous build left in build/, so a deleted module could still be shipped). The fresh
virtualenv has no pip of its own: this .venv's pip installs into it (--python), so it holds nothing
but the wheel and its base dependencies.
"""

from __future__ import annotations

import configparser
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

import pytest

ROOT = Path(__file__).resolve().parent.parent
GATEWAY_DEPENDENCIES = ["starlette", "sse_starlette", "sqlalchemy", "uvicorn", "alembic", "httpx", "metaflow"]
HOOK_MODULES = [
    "runbell.listeners",
    "runbell.listeners.hook",
    "runbell.listeners.publisher",
    "runbell.listeners.spool",
    "runbell.listeners.config",
    "runbell.listeners.connect",
    "runbell.listeners.marks",
    "runbell.listeners.propagation",
    "runbell.listeners.metaflow_hook",
    "runbell.listeners.guard",
    "runbell.bus",
    "runbell.bus.keys",
    "runbell.bus.schema",
]


def run(args: list[str | Path], cwd: Path | str = "/", timeout: float = 300, **env_vars: str) -> subprocess.CompletedProcess[str]:
    """Run a command without this process's PYTHON* variables (no PYTHONPATH leading into the repo)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")} | env_vars
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def python_in(venv: Path, code: str) -> dict:
    """Run code with the virtualenv's Python from / and return the JSON it prints last."""
    out = run([venv / "bin" / "python", "-c", textwrap.dedent(code)]).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    source = work / "src"
    for folder in ("listeners", "service"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", source, "-w", work / "out"])
    (built,) = (work / "out").glob("runbell-*.whl")
    return built


@pytest.fixture(scope="session")
def wheel_names(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as zf:
        return set(zf.namelist())


@pytest.fixture(scope="session")
def hook_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with the wheel installed, no extras, and pluggy: the hook module imports it
    (Airflow ships it), so the hook can be imported as Airflow does."""
    venv = tmp_path_factory.mktemp("hook-venv") / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv])
    run([sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "-q", wheel, "pluggy"])
    return venv


def test_the_wheel_holds_the_hook_side_the_bus_contract_and_the_gateways_files(wheel_names: set[str]) -> None:
    expected = {f"runbell/listeners/{p.name}" for p in (ROOT / "listeners").glob("*.py")}
    expected |= {f"runbell/service/store/migrations/versions/{p.name}" for p in (ROOT / "service/store/migrations/versions").glob("*.py")}
    expected |= {
        "runbell/bus/publish.lua",
        "runbell/bus/schema.py",
        "runbell/bus/keys.py",
        "runbell/service/http/ui/index.html",
        "runbell/listeners/py.typed",
        "runbell/bus/py.typed",
        "runbell/service/py.typed",
    }
    assert expected - wheel_names == set()


def test_runbell_is_a_namespace_and_nothing_else_is_installed(wheel_names: set[str]) -> None:
    top_level = {name.split("/")[0] for name in wheel_names if not name.split("/")[0].endswith(".dist-info")}
    # no top-level service/ or listeners/ (or tests/); metaflow_extensions is where Metaflow looks
    assert top_level == {"runbell", "metaflow_extensions"}
    assert "runbell/__init__.py" not in wheel_names
    # listeners/bus/ is installed once, as runbell.bus: a runbell.listeners.bus would be a second copy
    assert not [name for name in wheel_names if name.startswith("runbell/listeners/bus/")]


def test_the_wheel_declares_the_cli_and_the_airflow_plugin(wheel: Path, wheel_names: set[str]) -> None:
    (entry_points,) = [name for name in wheel_names if name.endswith(".dist-info/entry_points.txt")]
    parser = configparser.ConfigParser()
    with zipfile.ZipFile(wheel) as zf:
        parser.read_string(zf.read(entry_points).decode())
    assert parser["console_scripts"]["runbell"] == "runbell.service.client.cli:main"
    assert parser["airflow.plugins"]["runbell"] == "runbell.listeners.plugin:RunbellPlugin"


def test_a_hook_only_install_imports_no_gateway_dependency(hook_venv: Path) -> None:
    found = python_in(
        hook_venv,
        f"""
        import importlib, importlib.util, json, sys
        for name in {HOOK_MODULES!r}:
            importlib.import_module(name)
        deps = {GATEWAY_DEPENDENCIES!r}
        print(json.dumps({{
            "imported": [d for d in deps if d in sys.modules],
            "installed": [d for d in deps if importlib.util.find_spec(d) is not None],
            "files": [sys.modules[name].__file__ for name in {HOOK_MODULES!r}],
        }}))
        """,
    )
    assert found["imported"] == []
    assert found["installed"] == []
    site_packages = str(hook_venv)
    assert all(f.startswith(site_packages) for f in found["files"]), found["files"]  # not the repo's folders


def test_the_bus_contract_alone_loads_no_redis_and_no_publisher(hook_venv: Path) -> None:
    loaded = python_in(
        hook_venv,
        """
        import json, sys
        import runbell.bus.schema
        print(json.dumps(sorted(m for m in sys.modules if m == "redis" or m.startswith(("redis.", "runbell.listeners")))))
        """,
    )
    assert loaded == []


def test_runbell_emit_works_in_a_hook_only_install(hook_venv: Path, tmp_path: Path) -> None:
    """The README promises `runbell emit` with the base install (here Redis is down: it spools)."""
    done = run(
        [hook_venv / "bin" / "runbell", "emit", "--dag", "d", "--run", "r", "--state", "running"],
        RUNBELL_REDIS_URL="redis://127.0.0.1:1/0",
        RUNBELL_SPOOL_DIR=str(tmp_path),
    )
    assert json.loads(done.stdout) == {"spooled": True}
    assert len(list((tmp_path / "runbell").glob("*.event.json"))) == 1


def test_there_is_no_top_level_service_or_listeners(hook_venv: Path) -> None:
    errors = python_in(
        hook_venv,
        """
        import json
        errors = {}
        for name in ("service", "listeners"):
            try:
                __import__(name)
                errors[name] = "imported"
            except ModuleNotFoundError as exc:
                errors[name] = exc.name
        print(json.dumps(errors))
        """,
    )
    assert errors == {"service": "service", "listeners": "listeners"}


def test_the_editable_install_imports_the_repos_folders_from_anywhere() -> None:
    """The repo's .venv (pip install -e): from another directory, the modules are the repo's files."""
    files = python_in(
        Path(sys.prefix),
        """
        import json
        import runbell.bus, runbell.service.http.app
        print(json.dumps([runbell.service.http.app.__file__, runbell.bus.__file__]))
        """,
    )
    assert files == [str(ROOT / "service/http/app.py"), str(ROOT / "listeners/bus/__init__.py")]


def test_the_metaflow_extension_is_a_namespace_package_metaflow_can_find(wheel: Path, wheel_names: set[str]) -> None:
    extension = {name for name in wheel_names if name.startswith("metaflow_extensions/")}
    assert extension == {"metaflow_extensions/runbell/plugins/__init__.py", "metaflow_extensions/runbell/plugins/runbell_decorator.py"}
    (top_level,) = [name for name in wheel_names if name.endswith(".dist-info/top_level.txt")]
    (metadata,) = [name for name in wheel_names if name.endswith(".dist-info/METADATA")]
    with zipfile.ZipFile(wheel) as zf:
        assert set(zf.read(top_level).decode().split()) == {"runbell", "metaflow_extensions"}
        requires = [line for line in zf.read(metadata).decode().splitlines() if line.startswith("Requires-Dist:")]
    # Metaflow orders extension distributions by their requirements, markers ignored: one that
    # requires itself (an extra naming runbell[...]) is refused, and Metaflow does not start.
    assert not [line for line in requires if line.split()[1].lower().startswith("runbell")], requires
    assert any(line.startswith("Requires-Dist: metaflow") and 'extra == "metaflow"' in line for line in requires), requires


def test_the_extras_that_stand_for_the_gateway_hold_its_whole_list() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    assert set(extras["gateway"]) <= set(extras["bench"]) <= set(extras["test"])
