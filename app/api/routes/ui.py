"""The pages the API serves itself: the dashboard (static files from app/ui/static at /ui/) and ReDoc."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response
from starlette.types import Scope

STATIC = Path(__file__).resolve().parents[2] / "ui" / "static"
DOCS_ASSETS = "/docs-assets"  # fastapi-offline's Swagger UI and ReDoc files (app.main)
# The dashboard loads nothing from elsewhere, and the browser holds it to that.
DASHBOARD_CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
                 "object-src 'none'; base-uri 'none'; frame-ancestors 'none'")
# ReDoc's bundle shows Redocly's logo from their CDN in its menu; on an offline network that request hangs
# or fails, so the page forbids it (the logo hides itself when it cannot load).
REDOC_CSP = "img-src 'self' data:"
NO_CACHE = {"Cache-Control": "no-cache"}  # revalidate (ETag): after an upgrade, no mix of old and new modules


class _RevalidatedFiles(StaticFiles):
    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(NO_CACHE)
        return response


def install(app: FastAPI) -> None:
    """`/` and `/ui` lead to `/ui/`; `/ui/` is the page, `/ui/static/...` its scripts, styles and vendored files."""

    @app.get("/", include_in_schema=False)
    @app.get("/ui", include_in_schema=False)
    def to_dashboard() -> RedirectResponse:
        return RedirectResponse("/ui/", status_code=307)

    @app.get("/ui/", include_in_schema=False)
    def dashboard() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={**NO_CACHE, "Content-Security-Policy": DASHBOARD_CSP})

    @app.get("/redoc", include_in_schema=False)
    def redoc() -> HTMLResponse:
        page = get_redoc_html(openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title} - ReDoc",
                              redoc_js_url=f"{DOCS_ASSETS}/redoc.standalone.js",
                              redoc_favicon_url=f"{DOCS_ASSETS}/favicon.png", with_google_fonts=False)
        page.headers["Content-Security-Policy"] = REDOC_CSP
        return page

    app.mount("/ui/static", _RevalidatedFiles(directory=STATIC, check_dir=False), name="ui-static")
