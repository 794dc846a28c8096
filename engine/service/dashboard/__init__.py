"""The live dashboard: one page and its assets, shipped in the package, served at ``GET /``.

No build step and no CDN (the machines that run the service may have no
internet): plain HTML, CSS and JavaScript, charts drawn as SVG.  The page holds
no data; it reads ``/stats`` and ``/v1/dead-letters`` and listens on the
``/v1/live`` WebSocket (`engine.service.live`), sending the token the user
typed once (kept in sessionStorage) when the service has one.
"""

from __future__ import annotations

from importlib import resources

from aiohttp import web

ASSETS = {
    "index.html": "text/html",
    "app.js": "text/javascript",
    "charts.js": "text/javascript",
    "style.css": "text/css",
}


def asset(name: str) -> bytes:
    """The bytes of one shipped asset."""
    return resources.files(__name__).joinpath(name).read_bytes()


def add_dashboard_routes(app: web.Application) -> None:
    """``GET /`` (the page) and ``GET /dashboard/<asset>``; the assets are read once."""
    cache = {name: asset(name) for name in ASSETS}

    def serve(name: str) -> web.Response:
        return web.Response(
            body=cache[name],
            content_type=ASSETS[name],
            charset="utf-8",
            headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"},
        )

    async def index(request: web.Request) -> web.Response:
        return serve("index.html")

    async def static(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in ASSETS:
            raise web.HTTPNotFound()
        return serve(name)

    app.router.add_get("/", index)
    app.router.add_get("/dashboard/{name}", static)
