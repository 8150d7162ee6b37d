"""What a browser gets: the try-it page at `/` (static HTML, CSS and one script from this package, no build step,
no CDN) and the API docs at `/docs` (Swagger UI) and `/redoc`, whose scripts and styles are served from the
`fastapi-offline` package instead of a CDN, so both work without internet. The OpenAPI schema declares the API
key (X-API-Key header, or a bearer token) as security schemes, which gives /docs its Authorize button; with
`--api-key` set, each operation that checks the key says so.

Every URL a page uses is relative to `--root-path` (the page's `<base href>`, the docs' script and schema
URLs), so all of it works behind a proxy that serves the API under a prefix."""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import fastapi_offline
from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from starlette.responses import HTMLResponse

from nccr_guard.server.deps import require_key, require_key_unless_open
from nccr_guard.server.state import Service

STATIC = Path(str(resources.files("nccr_guard.server") / "static"))
DOCS_ASSETS = Path(fastapi_offline.__file__).parent / "static"  # swagger-ui-bundle.js, swagger-ui.css, redoc
SCHEMES = {
    "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key", "description": "the server's --api-key"},
    "bearer": {"type": "http", "scheme": "bearer", "description": "the server's --api-key as a bearer token"},
}


def add_pages(app: FastAPI, service: Service, routers: Sequence[APIRouter]) -> None:
    """The page, its assets, the offline docs and the security schemes, on `app` (built with docs_url=None);
    `routers`: those the app includes, whose routes' dependencies tell which operations check the key."""
    app.mount("/assets", StaticFiles(directory=STATIC / "assets"), name="assets")
    app.mount("/docs-assets", StaticFiles(directory=DOCS_ASSETS), name="docs-assets")
    page = (STATIC / "index.html").read_text()

    @app.get("/", include_in_schema=False)
    async def index(request: Request) -> HTMLResponse:
        """The try-it page; its base URL is the public root (the root path), so its relative URLs resolve
        whether it was opened as `/guard` or `/guard/`."""
        return HTMLResponse(page.replace('<base href="/">', f'<base href="{_root(request)}/">', 1))

    @app.get("/docs", include_in_schema=False)
    async def swagger(request: Request) -> HTMLResponse:
        root = _root(request)
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - API",
            oauth2_redirect_url=f"{root}/docs/oauth2-redirect",
            swagger_js_url=f"{root}/docs-assets/swagger-ui-bundle.js",
            swagger_css_url=f"{root}/docs-assets/swagger-ui.css",
            swagger_favicon_url=f"{root}/docs-assets/favicon.png",
            swagger_ui_parameters={"persistAuthorization": True},
        )

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    async def swagger_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = _root(request)
        html = get_redoc_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - API",
            redoc_js_url=f"{root}/docs-assets/redoc.standalone.js",
            redoc_favicon_url=f"{root}/docs-assets/favicon.png",
            with_google_fonts=False,
        )
        # Redoc's side menu shows its maker's logo from their CDN: images from this server only.
        html.headers["content-security-policy"] = "img-src 'self' data: blob:"
        return html

    plain_openapi = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = plain_openapi()
            schema.setdefault("components", {})["securitySchemes"] = SCHEMES
            if service.settings.api_key:
                routes = [r for router in (*routers, app.router) for r in router.routes]
                for route in routes:
                    if isinstance(route, APIRoute) and route.include_in_schema and _checks_key(route, service):
                        for method in route.methods:
                            op = schema["paths"][route.path_format][method.lower()]
                            op["security"] = [{"apiKey": []}, {"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def _root(request: Request) -> str:
    return request.scope.get("root_path", "").rstrip("/")


def _checks_key(route: APIRoute, service: Service) -> bool:
    calls = {d.call for d in route.dependant.dependencies}
    return require_key in calls or (require_key_unless_open in calls and not service.settings.open_health)
