"""FastAPI dependencies: the service state and the API-key check, as `Annotated` aliases. All are `async def`
although none awaits: FastAPI runs a plain `def` dependency in a worker thread, and those hops took ~8 % of
the event loop per MNIST request (py-spy)."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from nccr_guard.inputs import InputError
from nccr_guard.server.state import Service


async def get_service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]


def deadline(request: Request) -> float:
    """The request's deadline on `time.monotonic()`, set by the middleware when the request reached the app."""
    return request.scope["state"]["deadline"]


def check_key(request: Request, service: Service) -> None:
    """Bearer token or X-API-Key, compared in constant time; no key configured means open."""
    key = service.settings.api_key
    if not key:
        return
    auth = request.headers.get("authorization", "")
    given = auth[7:] if auth.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
    if not hmac.compare_digest(given.encode(), key.encode()):
        raise InputError("missing or wrong API key", 401, "unauthorized")


async def require_key(request: Request) -> None:
    """check_key as a dependency. The service comes from the app, not from a sub-dependency: each dependency
    FastAPI solves costs the event loop per request."""
    check_key(request, request.app.state.service)


async def require_key_unless_open(request: Request) -> None:
    service = request.app.state.service
    if not service.settings.open_health:
        check_key(request, service)


Authorized = Depends(require_key)
OpenOrAuthorized = Depends(require_key_unless_open)
