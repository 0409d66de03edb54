"""The live dashboard: one static page (service/http/ui/) served at `/`, its assets under `/ui/`.

Loading the page needs no token: it is the same for everyone and holds no data. Every data call
the page makes (`/v1/...`) is authorized as usual; the page asks for a token when one is refused.

Caching: the page itself is `no-cache` (revalidated with its ETag, so a new release shows at once)
and names each asset with `?v=<content hash>`; an asset asked for with its current hash is cached
for a year as immutable, any other request for it is `no-cache` with an ETag.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from runbell.service.http.errors import ApiError

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".json": "application/json",
}
IMMUTABLE = "public, max-age=31536000, immutable"
REVALIDATE = "no-cache"
# The page runs only its own script and style, and talks only to its own origin.
PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # ?token= must not leak to other sites
}
ASSET_REF = re.compile(r'(/ui/[A-Za-z0-9_.-]+)(")')


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: str
    etag: str
    version: str  # the first hex digits of the content hash


def _load_assets() -> dict[str, Asset]:
    assets: dict[str, Asset] = {}
    folder = resources.files("runbell.service.http") / "ui"
    for entry in folder.iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1] if "." in entry.name else ""
        if not entry.is_file() or suffix not in CONTENT_TYPES or entry.name.startswith("."):
            continue
        body = entry.read_bytes()
        digest = hashlib.sha256(body).hexdigest()
        assets[entry.name] = Asset(body, CONTENT_TYPES[suffix], f'"{digest[:32]}"', digest[:12])
    return assets


_ASSETS: dict[str, Asset] | None = None


def assets() -> dict[str, Asset]:
    global _ASSETS
    if _ASSETS is None:
        _ASSETS = _load_assets()
        page = _ASSETS["index.html"]
        # Point the page at the current version of each asset, so an asset can be cached forever.
        versioned = ASSET_REF.sub(lambda m: _versioned(m.group(1)) + m.group(2), page.body.decode()).encode()
        digest = hashlib.sha256(versioned).hexdigest()
        _ASSETS["index.html"] = Asset(versioned, page.content_type, f'"{digest[:32]}"', digest[:12])
    return _ASSETS


def _versioned(path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    asset = _ASSETS.get(name) if _ASSETS else None
    return f"{path}?v={asset.version}" if asset else path


def _not_modified(request: Request, asset: Asset) -> bool:
    tags = request.headers.get("if-none-match")
    if not tags:
        return False
    return tags.strip() == "*" or asset.etag in (t.strip().removeprefix("W/") for t in tags.split(","))


def _serve(request: Request, asset: Asset, cache_control: str, extra: dict | None = None) -> Response:
    headers = {"ETag": asset.etag, "Cache-Control": cache_control, **SECURITY_HEADERS, **(extra or {})}
    if _not_modified(request, asset):
        return Response(status_code=304, headers=headers)
    body = b"" if request.method == "HEAD" else asset.body
    response = Response(body, headers=headers, media_type=asset.content_type)
    if request.method == "HEAD":
        response.headers["content-length"] = str(len(asset.body))
    return response


async def index(request: Request) -> Response:
    """The page. Its routes live in the URL's fragment (#/runs/{dag}/{run}), so `/` serves them all."""
    return _serve(request, assets()["index.html"], REVALIDATE, {"Content-Security-Policy": PAGE_POLICY, "X-Frame-Options": "DENY"})


async def asset(request: Request) -> Response:
    name = request.path_params["name"]
    found = assets().get(name)
    if found is None or name == "index.html":
        raise ApiError(404, "not_found", f"no dashboard file {name!r}")
    current = request.query_params.get("v") == found.version
    return _serve(request, found, IMMUTABLE if current else REVALIDATE)


_CLIENT: Asset | None = None


def client_module() -> Asset:
    """The browser client (service/http/client/runbell.js, also the npm package runbell-client)."""
    global _CLIENT
    if _CLIENT is None:
        body = (resources.files("runbell.service.http") / "client" / "runbell.js").read_bytes()
        digest = hashlib.sha256(body).hexdigest()
        _CLIENT = Asset(body, CONTENT_TYPES[".js"], f'"{digest[:32]}"', digest[:12])
    return _CLIENT


async def browser_client(request: Request) -> Response:
    """The browser client as an ES module: any origin may import it (it holds no data, and a module
    script from another origin is fetched with CORS)."""
    return _serve(request, client_module(), REVALIDATE, {"Access-Control-Allow-Origin": "*"})


ROUTES = [
    Route("/", index, methods=["GET", "HEAD"], name="dashboard"),
    Route("/ui/{name}", asset, methods=["GET", "HEAD"], name="dashboard_asset"),
    Route("/v1/client/runbell.js", browser_client, methods=["GET", "HEAD"], name="browser_client"),
]
