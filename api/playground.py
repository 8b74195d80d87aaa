"""The web playground: one static page at `/` on the native API, with its scripts and styles under `/playground/`.

The page and its files are open (no API key): they hold no data. The page itself asks for the key and sends it with
every API call, which is why it reads job events with fetch rather than `EventSource` (which cannot send headers).
Everything it loads comes from this server, and its Content-Security-Policy says so to the browser.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

PAGE_PATH = "/"
ASSETS_PATH = "/playground"
STATIC_DIR = Path(__file__).parent / "static" / "playground"

# Scripts, styles and API calls from this server only; images also from anywhere, since with S3 storage result
# URLs are presigned URLs of the bucket's host; `data:` for previews, `blob:` for images fetched with the API key.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data: blob: https: "
    "http:; base-uri 'none'; form-action 'none'; frame-ancestors 'self'; object-src 'none'"
)


def add_playground(app: FastAPI) -> None:
    """Serve the page at `/` and its files under `/playground/`."""
    index = STATIC_DIR / "index.html"
    if not index.is_file():
        raise RuntimeError(f"the playground page is missing from the installed package: {index}")
    app.mount(ASSETS_PATH, StaticFiles(directory=STATIC_DIR), name="playground-assets")

    @app.get(PAGE_PATH, include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(index, media_type="text/html", headers={
            "Content-Security-Policy": CONTENT_SECURITY_POLICY,
            "Cache-Control": "no-cache",  # revalidated, so an upgraded server's page is seen at once
        })
