"""The API documentation pages (/docs, /redoc) and the page's favicon, served from this machine.

FastAPI's own pages load Swagger UI and ReDoc from a CDN, so ``/docs`` was blank wherever the
service runs without internet access. The same assets come here from the ``fastapi-offline``
package (MIT, Swagger UI 5 and ReDoc 2 files), mounted under ``/docs-assets``: nothing is
fetched at run time.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

__all__ = ["DOCS_ASSETS", "add_local_docs"]

DOCS_ASSETS = "/docs-assets"
_ASSETS_DIR = Path(str(files("fastapi_offline") / "static"))


def add_local_docs(app: FastAPI, favicon: Path) -> None:
    """Serve ``/docs``, ``/redoc`` and ``/favicon.ico`` for ``app``, which must be built with
    ``docs_url=None, redoc_url=None`` (so FastAPI adds no CDN-backed pages of its own)."""
    title = f"{app.title} - API"
    favicon_url = "/favicon.ico"
    redirect_url = "/docs/oauth2-redirect"
    openapi_url = app.openapi_url or "/openapi.json"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi_url,
            title=title,
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=favicon_url,
            oauth2_redirect_url=redirect_url,
        )

    @app.get(redirect_url, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url=openapi_url,
            title=title,
            redoc_js_url=f"{DOCS_ASSETS}/redoc.standalone.js",
            redoc_favicon_url=favicon_url,
            with_google_fonts=False,
        )

    @app.get(favicon_url, include_in_schema=False)
    async def favicon_ico() -> FileResponse:
        return FileResponse(favicon, media_type="image/svg+xml")

    app.mount(DOCS_ASSETS, StaticFiles(directory=_ASSETS_DIR), name="docs-assets")
