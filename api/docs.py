"""The interactive API docs, `/docs` (Swagger UI) and `/redoc` (ReDoc), with every file served by the API itself.

FastAPI's own docs pages load Swagger UI, ReDoc, a favicon and fonts from CDNs, so on a machine without internet
they stay blank. The `fastapi-offline` package ships those files (Swagger UI 5, which reads OpenAPI 3.1, and ReDoc
2); only its static folder is used, mounted at `ASSETS_PATH` without auth like the pages and `/openapi.json`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

DOCS_PATH = "/docs"
REDOC_PATH = "/redoc"
ASSETS_PATH = "/docs/assets"
ASSET_FILES = ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png")

# `validatorUrl: null`: Swagger UI would otherwise send the spec's URL to an online validator for a badge.
_SWAGGER_PARAMETERS = {"validatorUrl": None, "displayOperationId": True}
# The pages may load from the API only. ReDoc's menu shows its vendor's logo from a CDN, unconditionally: the browser
# refuses that request instead of sending it. (Both pages start from an inline script and style themselves inline;
# Swagger UI shows a downloaded image from a blob: URL.)
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; worker-src 'self' blob:; base-uri 'none'; form-action 'none'; frame-ancestors 'self'"
)


def assets_dir() -> Path:
    """The folder of Swagger UI and ReDoc files that the `fastapi-offline` package installs."""
    spec = importlib.util.find_spec("fastapi_offline")  # located, not imported: only its files are needed
    locations = list(spec.submodule_search_locations or []) if spec else []
    folder = Path(locations[0], "static") if locations else None
    if folder is None or not all((folder / name).is_file() for name in ASSET_FILES):
        raise RuntimeError(
            f"the API docs need {', '.join(ASSET_FILES)} from the fastapi-offline package: pip install fastapi-offline"
        )
    return folder


def add_docs(app: FastAPI) -> None:
    """Serve the docs pages and their files; create the app with `docs_url=None, redoc_url=None`."""
    app.mount(ASSETS_PATH, StaticFiles(directory=assets_dir()), name="docs-assets")
    openapi_url = app.openapi_url or "/openapi.json"

    @app.get(DOCS_PATH, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")  # behind a proxy that serves the API under a path prefix
        return _self_contained(get_swagger_ui_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{ASSETS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_PATH}/favicon.png",
            oauth2_redirect_url=None,  # API keys are bearer tokens: no OAuth2 flow to come back from
            swagger_ui_parameters=_SWAGGER_PARAMETERS,
        ))

    @app.get(REDOC_PATH, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return _self_contained(get_redoc_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{ASSETS_PATH}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{ASSETS_PATH}/favicon.png",
            with_google_fonts=False,
        ))


def _self_contained(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    return page
