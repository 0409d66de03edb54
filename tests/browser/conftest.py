"""A real headless Chromium (Debian's chromium + chromedriver), driven by Selenium, and real gateways.

Without a browser the browser tests are skipped, except under CI=true, where they fail: tests/run
installs the packages there. Screenshots go to tests/browser/artifacts/ (gitignored): the dashboard
on every run, and the page at the moment of any failure, with its console and HTML.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import IN_CI

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM = os.environ.get("RUNBELL_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("RUNBELL_CHROMEDRIVER", "/usr/bin/chromedriver")
# As /work/.library/env/machines/python-svc.md says: without the background-networking flags
# Chromium keeps trying Google's hosts, which this closed network refuses.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1360,900",
    "--lang=en-US",
]
BROWSER_START_SECONDS = 30


def _missing_browser() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            return f"{path} not found (apt-get install chromium chromium-driver; tests/run does under CI)"
    return None


SAVED: list[Path] = []  # screenshots taken in this session, listed at the end of the run


def save_screenshot(driver, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    driver.save_screenshot(str(path))
    SAVED.append(path)
    return path


def pytest_terminal_summary(terminalreporter):
    if SAVED:
        terminalreporter.write_sep("-", "dashboard screenshots")
        for path in SAVED:
            terminalreporter.write_line(str(path))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"report_{report.when}", report)


@pytest.fixture
def browser(request):
    """A fresh headless Chromium with an empty profile; on failure, what the page showed is saved."""
    missing = _missing_browser()
    if missing:
        if IN_CI:
            pytest.fail(f"CI=true needs a real browser: {missing}", pytrace=False)
        pytest.skip(missing)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="rb-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(CHROMEDRIVER, log_output=str(Path(profile) / "chromedriver.log"))
    started = time.monotonic()
    driver = webdriver.Chrome(service=service, options=options)
    assert time.monotonic() - started < BROWSER_START_SECONDS
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(30)
    driver.console = []  # every console entry read so far, for the assertions and the failure report
    yield driver
    report = getattr(request.node, "report_call", None)
    try:
        if report is not None and report.failed:
            stem = ARTIFACTS / f"failure-{request.node.name}"
            save_screenshot(driver, f"{stem.name}.png")
            stem.with_suffix(".html").write_text(driver.page_source)
            read_console(driver)
            stem.with_suffix(".console.txt").write_text("\n".join(map(str, driver.console)))
            print(f"\nfailure screenshot: {stem}.png (page and console beside it)")
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def read_console(driver) -> list[dict]:
    entries = driver.get_log("browser")
    driver.console.extend(entries)
    return entries


@pytest.fixture
def threaded_stand_in_airflow():
    """The stand-in Airflow (tests/stand_in_airflow.py) served from a thread of its own: a browser test
    is synchronous, so the event loop of the async stand_in_airflow fixture would not run while the
    gateway calls it."""
    from tests.stand_in_airflow import StandInAirflow, serve_stand_in

    stand_in = StandInAirflow()
    ready, stop = threading.Event(), threading.Event()

    async def serve() -> None:
        async with serve_stand_in(stand_in):
            ready.set()
            while not stop.is_set():
                await asyncio.sleep(0.05)

    thread = threading.Thread(target=asyncio.run, args=(serve(),), name="stand-in-airflow", daemon=True)
    thread.start()
    assert ready.wait(BROWSER_START_SECONDS), "the stand-in Airflow did not start"
    yield stand_in
    stop.set()
    thread.join(BROWSER_START_SECONDS)
