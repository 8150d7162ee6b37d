"""The service's error answers, `{"error": "..."}` with a 4xx/5xx: made here for the app's exception handlers and
for the direct routes (server/direct.py), which answer outside FastAPI's handlers."""

from __future__ import annotations

import logging

from fastapi import Request
from fastapi.responses import JSONResponse

from nccr_guard.inputs import InputError
from nccr_guard.server.state import Service

log = logging.getLogger("nccr_guard")


def input_error_response(service: Service, request: Request, e: InputError) -> JSONResponse:
    """An InputError's answer, counted as a rejection by its reason."""
    service.metrics.rejections.labels(e.reason).inc()
    headers = {"Retry-After": "1"} if e.status == 503 else None
    if e.status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    if e.reason in ("too_large", "timeout") and e.status in (408, 413):
        # The rest of the body is unread: close, or the server would go on receiving (and discarding) it.
        headers = {"Connection": "close"}
    if e.reason == "queue_full" and "chunked" in request.headers.get("transfer-encoding", "").lower():
        # Refused from its headers (Service.refuse_if_full), a chunked body of unknown length is unread.
        headers = {"Retry-After": "1", "Connection": "close"}
    return JSONResponse({"error": str(e)}, e.status, headers=headers)


def unexpected_response(request: Request) -> JSONResponse:
    """A bug's answer: logged with its traceback (call from an `except` block), no detail to the client."""
    log.exception("unexpected error on %s", request.url.path)
    return JSONResponse({"error": "internal error"}, 500)
