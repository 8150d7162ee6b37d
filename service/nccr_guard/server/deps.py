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
    """X-API-Key or a bearer token, either one, compared in constant time; no key configured means open. Either
    is enough, so a client of the sidecar can send this server's key as X-API-Key and its own bearer token for
    the upstream (routers/guard.py forwards the one that is not this server's key)."""
    key = service.settings.api_key
    if not key:
        return
    auth = request.headers.get("authorization", "")
    bearer = auth[7:] if auth[:7].lower() == "bearer " else ""
    given = request.headers.get("x-api-key", "")
    # Both compared, so the time taken does not tell which one matched.
    ok = hmac.compare_digest(given.encode(), key.encode()) | hmac.compare_digest(bearer.encode(), key.encode())
    if not ok:
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
