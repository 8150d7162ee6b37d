"""The service's runtime state, built in the lifespan and reached by handlers through `deps`."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import httpx

from nccr_guard.config import Settings
from nccr_guard.inputs import InputError, Limits, sniff_modality
from nccr_guard.server.logs import access_log_dropped
from nccr_guard.server.metrics import GcPauses, Metrics
from nccr_guard.server.runtime import ModelRuntime
from nccr_guard.server.workers import StartGate

log = logging.getLogger("nccr_guard")


@dataclass
class Service:
    settings: Settings
    metrics: Metrics
    runtimes: dict[str, ModelRuntime] = field(default_factory=dict)
    draining: bool = False
    active: int = 0  # requests being handled, health and metrics excluded
    last_arrival: float = 0.0  # time.monotonic() of the latest request's start (run.DrainingServer waits for a lull)
    upstream: httpx.AsyncClient | None = None
    gate: StartGate | None = None  # with --processes N: ready once every worker has started (workers.py)
    gc_pauses: GcPauses | None = None  # installed while serving (app.py)
    connections: set = field(default_factory=set)  # uvicorn's open connections (run.DrainingServer)
    demo_attacks: dict = field(default_factory=dict)  # model -> explain.DemoAttack, made on first use (--attack-demo)
    _next_shed: float = 0.0
    _access_dropped: int = 0  # access_log_dropped() at the last sample

    @property
    def ready(self) -> bool:
        return (
            bool(self.runtimes)
            and not self.draining
            and all(r.ready for r in self.runtimes.values())
            and (self.gate is None or self.gate.open())
        )

    def sample_gauges(self) -> None:
        """Gauges of the moment, the garbage-collection pauses and access-log drops recorded since the last call,
        and (one worker of several) the heartbeat the supervisor watches."""
        self.metrics.ready.set(int(self.ready))
        if self.gate is not None:
            self.gate.beat(len(self.connections))
        if self.gc_pauses is not None:
            self.gc_pauses.flush()
        if (dropped := access_log_dropped()) != self._access_dropped:
            self.metrics.access_log_dropped.inc(dropped - self._access_dropped)
            self._access_dropped = dropped
        for name, rt in self.runtimes.items():
            self.metrics.queue_depth.labels(name).set(rt.batcher.depth)

    def shed_connection(self) -> bool:
        """Whether to close the connection of the response being sent, because this worker holds more than its
        share of the server's connections (workers.StartGate.over_share). At most one per 0.2 s: the other
        workers' counts are sampled every 0.1 s, and a closed client needs a moment to reconnect elsewhere."""
        if self.gate is None or not self.settings.rebalance_connections:
            return False
        now = time.monotonic()
        if now < self._next_shed or not self.gate.over_share(len(self.connections)):
            return False
        self._next_shed = now + 0.2
        self.metrics.connections_rebalanced.inc()
        return True

    @property
    def limits(self) -> Limits:
        s = self.settings
        return Limits(s.max_upload_bytes, s.max_pixels, s.max_audio_s)

    def refuse_if_full(self, name: str | None, content_type: str) -> None:
        """Refuse an upload from its headers alone (503, its body neither read nor parsed) when every model it
        could go to has a full queue: a client that ignores Retry-After would otherwise cost the overloaded
        event loop a body read and a multipart parse per refusal. The candidates are the named model, or those
        of a raw body's declared modality (image/*, audio/*), or else every model (a multipart body's files are
        known only once parsed); a model with room admits the request to the full path and its queue check."""
        if name:
            candidates = [self.runtime(name)]
        else:
            kind = content_type.split("/", 1)[0].strip().lower()
            everyone = list(self.runtimes.values())
            candidates = [rt for rt in everyone if rt.detector.manifest.modality == kind] or everyone
        if candidates and all(rt.batcher.free() <= 0 for rt in candidates):
            raise candidates[0].at_capacity()

    def runtime(self, name: str | None, data: bytes | None = None) -> ModelRuntime:
        """The named model, or the first model of the upload's modality."""
        if name:
            if name not in self.runtimes:
                raise InputError(f"no model named {name!r}; serving {', '.join(self.runtimes)}", 404, "not_found")
            return self.runtimes[name]
        modality = sniff_modality(data or b"")
        for rt in self.runtimes.values():
            if rt.detector.manifest.modality == modality:
                return rt
        raise InputError(f"no {modality} model is served here", 415)
