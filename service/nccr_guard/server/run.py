"""Start uvicorn for `nccr-guard serve`. On SIGTERM/SIGINT readiness goes false and new requests get 503 at
once; queued and in-flight requests finish within `drain_s`, then the process exits 0."""

from __future__ import annotations

import logging
import sys

import uvicorn

from nccr_guard.config import Settings
from nccr_guard.server.app import create_app


class DrainingServer(uvicorn.Server):
    def handle_exit(self, sig: int, frame) -> None:
        app = self.config.loaded_app
        service = getattr(getattr(app, "state", None), "service", None) or _find_service(app)
        if service is not None:
            service.draining = True
            service.metrics.ready.set(0)
        super().handle_exit(sig, frame)


def _find_service(app):
    while app is not None:
        state = getattr(app, "state", None)
        if state is not None and hasattr(state, "service"):
            return state.service
        app = getattr(app, "app", None)
    return None


def configure_logging(json_logs: bool) -> None:
    fmt = (
        '{"ts":"%(asctime)s","level":"%(levelname)s","logger":"%(name)s","msg":"%(message)s"}'
        if json_logs
        else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.basicConfig(level=logging.INFO, format=fmt, stream=sys.stderr)
    logging.getLogger("nccr_guard.access").handlers = [h := logging.StreamHandler(sys.stdout)]
    h.setFormatter(logging.Formatter("%(message)s"))
    logging.getLogger("nccr_guard.access").propagate = False


def run(settings: Settings) -> int:
    configure_logging(settings.log_json)
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        access_log=False,
        timeout_graceful_shutdown=max(1, int(settings.drain_s)),
        log_config=None,
        timeout_keep_alive=5,
        limit_concurrency=settings.max_queue * 4 + 64,
    )
    server = DrainingServer(config)
    server.run()
    return 0 if server.started else 1
