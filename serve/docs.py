"""`/docs` without the internet: the Swagger UI page and its JS/CSS served by the app itself.

FastAPI's default `/docs` page loads Swagger UI from a CDN, which a cluster without internet
access cannot reach. The assets come from the `swagger-ui-bundle` package instead.
"""
from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from swagger_ui_bundle import swagger_ui_path

ASSETS = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css", "favicon-32x32.png": "image/png"}


def add_offline_docs(api: FastAPI, path: str = "/docs") -> None:
    """Routes `path` (the page) and `path/assets/<file>` (its files) on `api`.

    Create `api` with `docs_url=None`; the page's links honour the ASGI `root_path`, so an app
    mounted under a route prefix still finds its assets.
    """

    @api.get(path, include_in_schema=False)
    async def swagger_page(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        assets = f"{root}{path}/assets"
        return get_swagger_ui_html(openapi_url=f"{root}{api.openapi_url}", title=f"{api.title} - API docs",
                                   swagger_js_url=f"{assets}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{assets}/swagger-ui.css",
                                   swagger_favicon_url=f"{assets}/favicon-32x32.png")

    @api.get(f"{path}/assets/{{name}}", include_in_schema=False)
    async def swagger_asset(name: str) -> FileResponse:
        if name not in ASSETS:  # only the named files: no path ever comes from the request
            raise HTTPException(status_code=404, detail=f"no docs asset {name!r}")
        return FileResponse(Path(swagger_ui_path) / name, media_type=ASSETS[name],
                            headers={"Cache-Control": "public, max-age=86400"})
