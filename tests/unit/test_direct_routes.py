"""Which requests DirectRoutes answers itself and which it leaves to FastAPI's router."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import BaseModel

from nccr_guard.config import Settings
from nccr_guard.server.app import create_app
from nccr_guard.server.direct import DirectRoutes, route_of
from nccr_guard.server.routers import detect


class Answer(BaseModel):
    path: str


@pytest.mark.parametrize(
    ("path", "root_path", "method", "by"),
    [
        ("/v1/detect", "", "POST", "direct"),
        ("/guard/v1/detect", "/guard", "POST", "direct"),  # uvicorn --root-path: the prefix is in both
        ("/guard/v1/detect", "", "POST", "router"),
        ("/guard/guard/v1/detect", "/guard", "POST", "router"),
        ("/v1/detect", "", "GET", "router"),  # the router answers 405
        ("/v1/detect/batch", "", "POST", "router"),  # not one of these handlers
    ],
)
def test_direct_routes_match_as_the_router_does(path, root_path, method, by):
    """Behind a proxy that strips a prefix (`--root-path`), the direct routes answer the request FastAPI's
    router would send to their route, and leave it everything else."""
    app = create_app(Settings())
    took: list[str] = []

    async def handler(request, service) -> Answer:
        took.append("direct")
        return Answer(path=request.url.path)

    async def router(scope, receive, send) -> None:
        took.append("router")

    direct = DirectRoutes(router, app.state.service, [(route_of(detect.router.routes, "/v1/detect"), handler)])
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "root_path": root_path, "headers": [], "query_string": b""}
    asyncio.run(direct(scope, receive, send))
    assert took == [by]
    if by == "direct":
        assert sent[0]["status"] == 200 and Answer.model_validate_json(sent[1]["body"]).path == path
        assert scope["route"].path == "/v1/detect"  # what the metrics and the access log count it under
