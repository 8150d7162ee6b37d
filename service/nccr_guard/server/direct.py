"""The scoring routes served beside FastAPI's routing and request handling instead of through them.

Why: an MNIST verdict costs ~0.1 ms of CPU, and FastAPI's routing, dependency solving, body validation and
response handling cost the event loop about as much again per request, CPU the verdicts then lack on a small
machine (docs/decisions/003-direct-routes.md). `DirectRoutes` is a pure
ASGI middleware inside ServiceMiddleware (request id, deadline, draining, metrics and access log stay shared) that
answers POST /v1/detect, /v1/detect/batch and KServe v2 infer with binary tensors itself: the routes' own key
check, work, response models and error answers (server/errors.py). The routes stay declared for the OpenAPI
schema, serve whatever a handler hands back (`Delegate`), and serve everything with `--no-direct-routes`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from fastapi import Request, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nccr_guard.inputs import InputError
from nccr_guard.server.deps import check_key
from nccr_guard.server.errors import input_error_response, unexpected_response
from nccr_guard.server.state import Service

Handler = Callable[[Request, Service], Awaitable[BaseModel]]


class Delegate(Exception):  # noqa: N818 - not an error: a hand-over
    """Raised by a handler that leaves the request to its FastAPI route, which then answers as it always does
    (a KServe v2 body that fails validation gets FastAPI's own error). `body`: what the handler already read of
    the request, given to the route again; None if it read nothing."""

    def __init__(self, body: bytes | None = None) -> None:
        super().__init__()
        self.body = body


def replay(body: bytes, receive: Receive) -> Receive:
    """`receive` with `body` as the request's (already read) body, then the connection's later messages (a
    disconnect) as they come."""
    sent = False

    async def again() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return again


def route_of(routes: Sequence, path: str) -> APIRoute:
    """The declared route of `path` (its template, with the router's prefix)."""
    return next(r for r in routes if isinstance(r, APIRoute) and r.path == path)


class DirectRoutes:
    def __init__(self, app: ASGIApp, service: Service, handlers: Sequence[tuple[APIRoute, Handler]]) -> None:
        self.app, self.service, self.handlers = app, service, tuple(handlers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            for route, handler in self.handlers:
                match, child = route.matches(scope)  # the route's own path regex (root_path aware) and method
                if match is Match.FULL:
                    scope.update(child)  # path parameters and endpoint, as routing sets them
                    scope["route"] = route  # the metrics' and access log's endpoint
                    await self._serve(handler, scope, receive, send)
                    return
        await self.app(scope, receive, send)

    async def _serve(self, handler: Handler, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        try:
            check_key(request, self.service)
            found = await handler(request, self.service)
            response: Response = Response(found.model_dump_json(), media_type="application/json")
        except Delegate as d:
            await self.app(scope, receive if d.body is None else replay(d.body, receive), send)
            return
        except InputError as e:
            response = input_error_response(self.service, request, e)
        except Exception:  # noqa: BLE001 - what the app's handler for unexpected errors answers
            response = unexpected_response(request)
        await response(scope, receive, send)
