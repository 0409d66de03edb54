"""The browser client (/v1/client/runbell.js, the npm package runbell-client) in a real headless Chromium
against a real `runbell serve`: a run followed through a gateway restart resumes with no gap and no
repeat, a run-scoped token that expired meanwhile is refreshed through the page's callback, and
result() resolves with the outcome. Its npm package and types are checked too."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from runbell.listeners.partial_output import emit_progress
from runbell.listeners.publisher import emit
from runbell.service.http.auth import issue_run_token
from tests.browser.test_dashboard_browser import no_script_errors, publisher, wait_for  # noqa: F401  # publisher: a fixture
from tests.conftest import IN_CI, TOKENS

CLIENT = Path(__file__).resolve().parents[2] / "service" / "http" / "client"
SECRET = "served-test-secret-of-at-least-32-bytes!"  # tests/conftest.py's served gateways sign with it
FOLLOW = """
const [runId, token, fresh] = arguments;
window.got = []; window.refreshes = 0; window.outcome = null;
import("/v1/client/runbell.js").then((m) => {
  const run = m.followRun({ dagId: "etl", runId, token, refreshToken: async () => { window.refreshes += 1; return fresh; } });
  for (const kind of ["task", "run", "progress", "outcome"]) run.on(kind, (data, id) => window.got.push([kind, id]));
  run.result().then((o) => { window.outcome = o; });
  window.run = run;
});
"""


def got(browser) -> list[tuple[str, str]]:
    return [tuple(item) for item in browser.execute_script("return window.got;")]


def test_a_run_followed_through_a_restart_resumes_once_each_with_a_refreshed_token(browser, served_gateway, publisher) -> None:  # noqa: F811
    gateway = served_gateway(auth=True, RUNBELL_TOKENS=TOKENS)
    run_id = "followed"
    emit("etl", run_id, "running", publisher=publisher)
    emit("etl", run_id, "running", task_id="answer", try_number=1, result_task=True, publisher=publisher)
    short, _ = issue_run_token(SECRET, "etl", run_id, 3.0)  # expires while the gateway is away
    fresh, _ = issue_run_token(SECRET, "etl", run_id, 600.0)
    browser.get(gateway.url + "/healthz")  # a page of the gateway's origin
    browser.execute_script(FOLLOW, run_id, short, fresh)
    wait_for(browser, "window.got.length", lambda n: n == 2, "the events so far")
    emit_progress("etl", run_id, "answer", "Hel", publisher=publisher)
    wait_for(browser, "window.got.length", lambda n: n == 3, "a progress event, live")

    assert gateway.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
    emit_progress("etl", run_id, "answer", "lo", publisher=publisher)  # published while it is away
    time.sleep(3.5)  # the short token expires
    gateway.start()
    wait_for(browser, "window.got.length", lambda n: n == 4, "the event missed while away, after the restart")
    assert browser.execute_script("return window.refreshes;") == 1
    emit("etl", run_id, "success", task_id="answer", try_number=1, result_task=True, result="Hello", publisher=publisher)
    emit("etl", run_id, "success", publisher=publisher)
    wait_for(browser, "window.outcome && window.outcome.status", lambda s: s == "success", "result() resolved")
    assert browser.execute_script("return window.outcome.result;") == "Hello"
    events = got(browser)
    seqs = [int(event_id.rpartition("-")[2]) for kind, event_id in events if kind != "outcome"]
    assert seqs == list(range(1, len(seqs) + 1)), events  # no gap, no repeat, in order
    assert [kind for kind, _ in events] == ["run", "task", "progress", "progress", "task", "outcome", "run"]
    stats = browser.execute_script("return window.run.stats;")
    assert stats["reopened"] >= 1 and stats["refreshed"] == 1
    no_script_errors(browser)


def test_the_module_is_served_to_any_origin_and_is_the_packages_file(served_gateway) -> None:
    import httpx

    gateway = served_gateway()
    response = httpx.get(gateway.url + "/v1/client/runbell.js")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/javascript")
    assert response.headers["access-control-allow-origin"] == "*"
    assert response.content == (CLIENT / "runbell.js").read_bytes()


def test_the_npm_package_holds_the_module_and_its_types(tmp_path) -> None:
    npm = shutil.which("npm")
    if npm is None:
        if IN_CI:
            pytest.fail("CI=true needs npm (the machine's Node.js)", pytrace=False)
        pytest.skip("npm is not installed")
    done = subprocess.run([npm, "pack", "--dry-run", "--json"], cwd=CLIENT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    (packed,) = json.loads(done.stdout)
    assert packed["name"] == "runbell-client"
    assert sorted(f["path"] for f in packed["files"]) == ["package.json", "runbell.d.ts", "runbell.js"]
    # Every export the types declare is one the module has (checked by Node.js, which loads the module).
    declared = {
        line.split("(")[0].split()[-1] for line in (CLIENT / "runbell.d.ts").read_text().splitlines() if line.startswith("export function")
    }
    script = "import(process.argv[1]).then(m => console.log(JSON.stringify(Object.keys(m).sort())))"
    node = subprocess.run(["node", "-e", script, str(CLIENT / "runbell.js")], capture_output=True, text=True, timeout=60)
    assert node.returncode == 0, node.stderr
    assert declared | {"RunbellStream"} == set(json.loads(node.stdout))


TYPESCRIPT = Path.home() / ".cache" / "runbell" / "typescript-5"  # installed once from the npm registry


def test_the_types_compile_for_a_consumer_with_strict_typescript(tmp_path) -> None:
    """tests/client_types/use.ts imports the package and uses each function and event; tsc --strict
    must accept it, including the @ts-expect-error of an event a run does not have."""
    npm = shutil.which("npm")
    if npm is None:
        if IN_CI:
            pytest.fail("CI=true needs npm (the machine's Node.js)", pytrace=False)
        pytest.skip("npm is not installed")
    tsc = TYPESCRIPT / "node_modules" / ".bin" / "tsc"
    if not tsc.exists():
        installed = subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", "--prefix", str(TYPESCRIPT), "typescript@5"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert installed.returncode == 0, installed.stderr[-2000:]
    package = tmp_path / "node_modules" / "runbell-client"
    package.mkdir(parents=True)
    for name in ("package.json", "runbell.js", "runbell.d.ts"):
        shutil.copy(CLIENT / name, package / name)
    consumer = tmp_path / "use.ts"
    shutil.copy(Path(__file__).resolve().parents[1] / "client_types" / "use.ts", consumer)
    options = [
        "--noEmit",
        "--strict",
        "--module",
        "nodenext",
        "--moduleResolution",
        "nodenext",
        "--target",
        "es2022",
        "--lib",
        "es2022,dom",
    ]
    done = subprocess.run([str(tsc), *options, str(consumer)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
