"""The dashboard as HTTP serves it: the page without a token, its files with their types and caching.

What the page does in a browser is tests/browser/test_dashboard_browser.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DASHBOARD = Path(__file__).resolve().parents[1] / "service" / "http" / "ui"


async def test_the_page_loads_without_a_token(gateway):
    async with gateway.client(token=None) as client:
        page = await client.get("/")
        data = await client.get("/v1/dags/d/runs/r/result", params={"timeout": 0})
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.headers["cache-control"] == "no-cache"
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["referrer-policy"] == "no-referrer"
    assert '<main id="view"' in page.text
    assert data.status_code == 401  # the shell is open; the data behind it is not


async def test_the_page_names_each_asset_by_its_content_hash(gateway):
    async with gateway.client(token=None) as client:
        page = (await client.get("/")).text
        refs = dict(re.findall(r'"(/ui/[a-z]+\.(?:js|css))\?v=([0-9a-f]{12})"', page))
        assert set(refs) == {"/ui/app.js", "/ui/style.css"}
        for path, version in refs.items():
            current = await client.get(path, params={"v": version})
            assert current.status_code == 200
            assert current.headers["cache-control"] == "public, max-age=31536000, immutable"
            assert current.content == (DASHBOARD / path.rsplit("/", 1)[1]).read_bytes()
            stale = await client.get(path, params={"v": "000000000000"})
            assert stale.headers["cache-control"] == "no-cache"  # an old page's link is revalidated
            plain = await client.get(path)
            assert plain.headers["cache-control"] == "no-cache"


@pytest.mark.parametrize(
    "name, content_type",
    [
        ("app.js", "text/javascript; charset=utf-8"),
        ("style.css", "text/css; charset=utf-8"),
    ],
)
async def test_assets_have_their_content_type_and_revalidate_with_the_etag(gateway, name, content_type):
    async with gateway.client(token=None) as client:
        first = await client.get(f"/ui/{name}")
        again = await client.get(f"/ui/{name}", headers={"If-None-Match": first.headers["etag"]})
        head = await client.head(f"/ui/{name}")
    assert first.status_code == 200 and first.headers["content-type"] == content_type
    assert first.headers["x-content-type-options"] == "nosniff"
    assert again.status_code == 304 and again.content == b""
    assert head.status_code == 200 and head.content == b""
    assert int(head.headers["content-length"]) == len(first.content)


async def test_the_page_revalidates_with_its_etag(gateway):
    async with gateway.client(token=None) as client:
        first = await client.get("/")
        again = await client.get("/", headers={"If-None-Match": f'W/{first.headers["etag"]}, "other"'})
    assert again.status_code == 304


@pytest.mark.parametrize(
    "path, status", [("/ui/index.html", 404), ("/ui/nope.js", 404), ("/ui/..%2Fdashboard.py", 400), ("/ui/../app.py", 404), ("/ui/", 404)]
)
async def test_only_the_dashboard_files_are_served(gateway, path, status):
    async with gateway.client(token=None) as client:
        response = await client.get(path)
    assert response.status_code == status  # 400: an encoded '/' names nothing on any route
    assert response.headers["content-type"] == "application/json"


def test_the_dashboard_files_are_package_data():
    """A wheel carries the page: pyproject's package-data names the folder."""
    package_data = (DASHBOARD.parents[2] / "pyproject.toml").read_text().split("[tool.setuptools.package-data]")[1]
    assert '"ui/*"' in package_data.split("\n[")[0]
    assert {p.name for p in DASHBOARD.iterdir()} >= {"index.html", "app.js", "style.css"}
