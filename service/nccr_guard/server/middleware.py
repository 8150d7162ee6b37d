"""Pure ASGI middleware (no BaseHTTPMiddleware, which hides client disconnects): request id, JSON access log,
request metrics, 503 for new work (and `Connection: close` on every response) while draining, the request's
deadline, and a Server-Timing header.

The deadline (`request_timeout_s` after the request reached the app) bounds everything the app does for a
request: reading the body, decoding it and waiting for the verdict. Server-Timing (`app;dur=<ms>`) lets a
client tell time spent in the app from time spent before it (connection, kernel queues, a busy event loop)."""

from __future__ import annotations

import json
import logging
import os
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nccr_guard.server.state import Service

access = logging.getLogger("nccr_guard.access")

ALWAYS_OPEN = ("/v2/health/live", "/metrics")


class ServiceMiddleware:
    def __init__(self, app: ASGIApp, service: Service) -> None:
        self.app, self.service = app, service
        self.pid = os.getpid()  # tells --processes N workers apart in the access log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        svc, start = self.service, time.monotonic()
        svc.last_arrival = start
        headers = dict(scope.get("headers") or [])
        rid = headers.get(b"x-request-id", b"").decode("latin-1")[:64] or uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"], state["deadline"] = rid, start + svc.settings.request_timeout_s
        status, sent_bytes = 500, 0

        async def send_wrapper(message: Message) -> None:
            nonlocal status, sent_bytes
            if message["type"] == "http.response.start":
                status = message["status"]
                app_ms = (time.monotonic() - start) * 1e3
                out = message.setdefault("headers", [])
                out.extend([(b"x-request-id", rid.encode()), (b"server-timing", f"app;dur={app_ms:.1f}".encode())])
                if svc.draining or svc.shed_connection():
                    # Close keep-alive connections while draining: a client's next request then opens a new
                    # connection (answered 503, or refused once the listener closes) instead of racing the
                    # server's final close of idle connections, which would lose it. With --processes N, also
                    # one of a worker's surplus connections: reconnecting, the client may land on another.
                    out.append((b"connection", b"close"))
            elif message["type"] == "http.response.body":
                sent_bytes += len(message.get("body", b""))
            await send(message)

        path = get_route_path(scope)  # without --root-path's prefix, as the routes match it
        counted = not path.startswith(("/v2/health", "/metrics"))
        svc.active += counted
        svc.metrics.in_flight.inc()
        try:
            if svc.draining and path not in ALWAYS_OPEN and not path.startswith("/v2/health"):
                svc.metrics.rejections.labels("draining").inc()
                await _json(send_wrapper, 503, {"error": "shutting down"}, [(b"retry-after", b"1")])
            else:
                await self.app(scope, receive, send_wrapper)
        finally:
            svc.active -= counted
            svc.metrics.in_flight.dec()
            route = scope.get("route")
            endpoint = getattr(route, "path", "unmatched")
            model = scope["state"].get("model", "-")
            elapsed = time.monotonic() - start
            svc.metrics.requests.labels(model, endpoint, str(status)).inc()
            svc.metrics.duration.labels(endpoint).observe(elapsed)
            if svc.settings.access_log:
                access.info(
                    json.dumps(
                        {
                            "ts": round(time.time(), 3),
                            "pid": self.pid,
                            "request_id": rid,
                            "client": (scope.get("client") or ("-",))[0],  # a trusted proxy's X-Forwarded-For
                            "method": scope["method"],
                            "path": scope["path"],
                            "status": status,
                            "ms": round(elapsed * 1000, 2),
                            "bytes_out": sent_bytes,
                            "model": model,
                            "verdict": scope["state"].get("verdict"),
                            "upload": scope["state"].get("upload"),
                        }
                    )
                )


def get_route_path(scope: Scope) -> str:
    """The path the routes match: without the `root_path` prefix (--root-path) where the path starts with it, as
    Starlette's router strips it."""
    path, root = scope["path"], scope.get("root_path", "")
    if not root or not path.startswith(root):
        return path
    rest = path[len(root) :]
    return rest if not rest or rest.startswith("/") else path


async def _json(send: Send, status: int, body: dict, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
                *(extra or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})
