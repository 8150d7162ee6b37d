"""Start uvicorn for `nccr-guard serve`. On SIGTERM/SIGINT readiness goes false and new requests get 503 at
once; queued and in-flight requests finish and arrivals pause for `drain_quiet_s` (within `drain_s`), then the
process exits 0."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from pathlib import Path

import uvicorn

from nccr_guard.config import Settings
from nccr_guard.server.app import create_app
from nccr_guard.server.logs import configure_logging
from nccr_guard.server.metrics import clear_stale_metrics
from nccr_guard.server.workers import StartGate, Supervisor

log = logging.getLogger("nccr_guard")


class DrainingServer(uvicorn.Server):
    """SIGTERM: readiness false and 503 for new requests at once, while the listener stays open (so connections
    already in the backlog get an answer, not a reset) until queued and in-flight work is done and no new
    connection or request came for `drain_quiet_s`, or `drain_s` passes; then uvicorn's own graceful shutdown.
    A second signal exits at once. A drained exit is 0 (uvicorn would re-raise SIGTERM and exit -15)."""

    _draining_task: asyncio.Task | None = None  # held so the drain task is not garbage-collected mid-way
    _drain_requested = False  # set by the signal handler; the drain starts on the event loop

    def __init__(self, config: uvicorn.Config, gate: StartGate | None = None) -> None:
        super().__init__(config)
        self.gate = gate  # one worker of several: counts itself in once listening (workers.StartGate)

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        service = _find_service(getattr(self.config, "loaded_app", None))
        if service is not None:
            service.connections = self.server_state.connections  # counted for --rebalance-connections
        if self.gate is not None and self.started:
            self.gate.arrive()  # listening now: the kernel may give this worker connections

    @contextlib.contextmanager
    def capture_signals(self):
        with super().capture_signals():
            yield
            self._captured_signals.clear()

    def handle_exit(self, sig: int, frame) -> None:
        """Runs as a signal handler: in the main thread between any two bytecodes, possibly inside a metric update
        that holds prometheus_client's lock (not reentrant; with --processes N one lock for all of a process's
        metrics). Taking that lock here deadlocks (`ready.set(0)`: a worker that never drains and is killed, the
        likely cause of a CI failure). So the handler only sets a flag and wakes the event loop, which starts the
        drain."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not serving yet
            loop = None
        if loop is None or self._drain_requested:  # a second signal exits at once
            super().handle_exit(sig, frame)
            return
        self._drain_requested = True
        loop.call_soon_threadsafe(self._start_drain, sig, frame)

    def _start_drain(self, sig: int, frame) -> None:
        service = _find_service(getattr(self.config, "loaded_app", None))  # None: a signal before the app loaded
        if service is None:
            super().handle_exit(sig, frame)
            return
        service.draining = True
        service.metrics.ready.set(0)
        self._draining_task = asyncio.get_running_loop().create_task(self._drain_then_exit(service, sig, frame))

    async def _drain_then_exit(self, service, sig: int, frame) -> None:
        """Wait for queued and in-flight work and for a lull of `drain_quiet_s` without a new connection or
        request (within `drain_s`). Closing the listener resets the connections still in its backlog, and a client
        whose connect completes just then loses its request (seen in CI: a starved client connected a burst of
        requests 40 ms after the server went idle); a lull makes that need a pause and then a connect at that
        instant."""
        start = time.monotonic()
        deadline = start + service.settings.drain_s
        quiet = service.settings.drain_quiet_s
        seen, last = set(self.server_state.connections), start
        while (now := time.monotonic()) < deadline:
            current = set(self.server_state.connections)
            if current - seen:
                last = now
            seen, last = current, max(last, service.last_arrival)
            busy = service.active or any(rt.batcher.depth or rt.batcher.in_flight for rt in service.runtimes.values())
            if not busy and now - last >= quiet:
                break
            await asyncio.sleep(0.05)
        super().handle_exit(sig, frame)


def _find_service(app):
    while app is not None:
        state = getattr(app, "state", None)
        if state is not None and hasattr(state, "service"):
            return state.service
        app = getattr(app, "app", None)
    return None


def serve_on(settings: Settings, sockets: list[socket.socket] | None = None, gate: StartGate | None = None) -> bool:
    """Run the app under the draining server until it exits, on `sockets` or on settings.host:port; whether it
    started (False: the address was taken; a model that fails to load exits with uvicorn's STARTUP_FAILURE).
    A worker of several passes its start gate: its readiness waits for the others (workers.StartGate)."""
    server = DrainingServer(
        uvicorn.Config(
            create_app(settings, gate),
            host=settings.host,
            port=settings.port,
            root_path=settings.root_path,
            forwarded_allow_ips=settings.forwarded_allow_ips,
            ssl_certfile=settings.ssl_certfile,
            ssl_keyfile=settings.ssl_keyfile,
            access_log=False,
            log_config=None,
            timeout_keep_alive=5,
            timeout_graceful_shutdown=max(1, int(settings.drain_s)),
            limit_concurrency=settings.max_connections,
        ),
        gate,
    )
    server.run(sockets=sockets)
    return server.started


def run(settings: Settings) -> int:
    configure_logging(settings.log_json, settings.access_log, settings.access_log_max_lines)
    # Set by the user (else --processes N makes a fresh one): values left by an earlier run would be counted again.
    shared = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if shared and (n := clear_stale_metrics(Path(shared))):
        log.info("removed %d metric files of an earlier run from %s", n, shared)
    if settings.processes > 1:
        return Supervisor(settings).run()
    return 0 if serve_on(settings) else 1
