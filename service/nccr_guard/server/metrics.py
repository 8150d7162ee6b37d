"""Prometheus metrics, one registry per app (so tests can build many apps). Base units, `_total` counters,
low-cardinality labels (model, endpoint template, status code, reason).

With `--processes N` each worker is its own process with its own registry, and a scrape reaches one of them;
the supervisor then sets PROMETHEUS_MULTIPROC_DIR, so prometheus_client keeps every value in a shared file per
process and `exposition()` answers for all workers together (counters and histograms summed; each gauge by the
`multiprocess_mode` given here)."""

from __future__ import annotations

import asyncio
import gc
import os
import time
from bisect import bisect_left
from collections import Counter as Tally
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
SCORE = (-2, -1, 0, 0.5, 1, 1.5, 2, 3, 4, 6, 8, 12, 20, 50)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "nccr_guard_requests_total", "HTTP requests answered", ["model", "endpoint", "code"], registry=r
        )
        self.duration = Histogram(
            "nccr_guard_request_duration_seconds",
            "request latency, receipt to response",
            ["endpoint"],
            buckets=LATENCY,
            registry=r,
        )
        self.queue_wait = Histogram(
            "nccr_guard_queue_wait_seconds",
            "time a request waited for its batch; a request of several inputs counts once per part (a forward's "
            "worth of its inputs, submitted together)",
            ["model"],
            buckets=LATENCY,
            registry=r,
        )
        self.compute = Histogram(
            "nccr_guard_compute_seconds",
            "time of one batch: rows, forward, scoring",
            ["model"],
            buckets=LATENCY,
            registry=r,
        )
        self.batch_requests = Histogram(
            "nccr_guard_batch_requests",
            "inputs per batch (a single-input request is one; a part of a larger request counts its inputs)",
            ["model"],
            buckets=BATCH,
            registry=r,
        )
        self.batch_rows = Histogram(
            "nccr_guard_batch_rows",
            "rows (forward passes) per batch; a batch that is one part of a many-input request may run as several "
            "forwards of at most --max-batch rows",
            ["model"],
            buckets=BATCH,
            registry=r,
        )
        self.passes = Histogram(
            "nccr_guard_verdict_passes",
            "rows (forward passes) one verdict used; below the fixed-K rows when sequential testing stops early",
            ["model"],
            buckets=BATCH,
            registry=r,
        )
        self.queue_depth = Gauge(
            "nccr_guard_queue_depth",
            "requests waiting for a batch",
            ["model"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.in_flight = Gauge(
            "nccr_guard_in_flight_requests", "HTTP requests being handled", registry=r, multiprocess_mode="livesum"
        )
        self.verdicts = Counter("nccr_guard_verdicts_total", "verdicts given", ["model", "verdict"], registry=r)
        self.scores = Histogram("nccr_guard_score", "NCCR scores given", ["model"], buckets=SCORE, registry=r)
        self.rejections = Counter("nccr_guard_rejections_total", "requests refused", ["reason"], registry=r)
        self.connections_rebalanced = Counter(
            "nccr_guard_connections_rebalanced_total",
            "keep-alive connections closed after their response because this worker held more than its share "
            "(--processes N): the client reconnects and may be hashed to another worker",
            registry=r,
        )
        self.access_log_dropped = Counter(
            "nccr_guard_access_log_dropped_total",
            "access-log lines dropped because stdout did not take them (a stalled log shipper): beyond "
            "--access-log-max-lines waiting lines (default 100,000) new ones go; the access log then has a gap",
            registry=r,
        )
        self.upstream = Histogram(
            "nccr_guard_upstream_duration_seconds", "sidecar upstream call latency", buckets=LATENCY, registry=r
        )
        self.model_info = Gauge(
            "nccr_guard_model_info",
            "served models",
            ["model", "modality", "backend", "device", "variant", "k"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.loop_lag = Histogram(
            "nccr_guard_event_loop_lag_seconds",
            "how late the event loop woke for a timer due every 0.1 s: HTTP work waiting for a busy loop, which "
            "no request's own timings (Server-Timing, the request duration) can show",
            buckets=LATENCY,
            registry=r,
        )
        self.gc_pause = Histogram(
            "nccr_guard_gc_pause_seconds",
            "Python garbage-collection pauses by generation: a full (generation 2) collection stops the event loop "
            "and the batch workers alike",
            ["generation"],
            buckets=LATENCY,
            registry=r,
        )
        self.ready = Gauge(
            "nccr_guard_ready",
            "1 when every model is warm and the service takes work (every worker, with --processes N)",
            registry=r,
            multiprocess_mode="livemin",
        )
        for reason in (
            "queue_full",
            "timeout",
            "too_large",
            "bad_input",
            "too_short",
            "unauthorized",
            "draining",
            "not_found",
            "client_gone",
            "backend_error",
        ):
            self.rejections.labels(reason)

    def exposition(self) -> bytes:
        """The text a scrape gets: this registry, or every worker's values when they share a directory."""
        if path := os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            merged = CollectorRegistry()
            MultiProcessCollector(merged, path)
            return generate_latest(merged)
        return generate_latest(self.registry)


def observe_many(child: Histogram, values: Sequence[float]) -> None:
    """`child.observe(v)` for each of `values` (a labelled histogram child), in one update of its sum and one of
    each bucket hit. Why: a request's verdicts are observed together, and prometheus_client's per-value
    `observe` (a lock and a bucket scan, a file write per update in multiprocess mode) cost the event loop
    ~4 µs a verdict with `--processes 2`, three metric updates each (python -m bench.metric_updates). It uses
    the child's `_sum`, `_buckets` and `_upper_bounds`, which `observe` itself uses; tests/unit/test_metrics.py
    checks the exposition is the same as per-value observes."""
    bounds = child._upper_bounds
    hits = Tally(bisect_left(bounds, v) for v in values if v == v)  # NaN: no bucket, as `observe` (sum: NaN)
    child._sum.inc(sum(values))
    for i, n in hits.items():
        child._buckets[i].inc(n)


@dataclass(frozen=True)
class VerdictMetrics:
    """One model's verdict metrics (labelled children, looked up once: `labels()` costs ~2.5 µs a call)."""

    counts: dict[str, Counter]  # by verdict
    scores: Histogram
    passes: Histogram

    @classmethod
    def of(cls, metrics: Metrics, model: str, kinds: Sequence[str]) -> VerdictMetrics:
        children = (metrics.scores.labels(model), metrics.passes.labels(model))
        return cls({k: metrics.verdicts.labels(model, k) for k in kinds}, *children)

    def count(self, verdicts: Sequence) -> None:
        """The metrics of verdicts given together (a part of a request): grouped (`observe_many`), or with
        prometheus_client's own calls for a single verdict, cheaper for one value than grouping (python -m
        bench.metric_updates)."""
        if len(verdicts) == 1:
            [v] = verdicts
            self.counts[v.verdict].inc()
            self.scores.observe(v.score)
            self.passes.observe(v.passes)
            return
        for kind, n in Tally(v.verdict for v in verdicts).items():
            self.counts[kind].inc(n)
        observe_many(self.scores, [v.score for v in verdicts])
        observe_many(self.passes, [v.passes for v in verdicts])


def clear_stale_metrics(path: Path) -> int:
    """Delete the value files a previous run left in a multiprocess directory; how many. prometheus_client keeps
    each process's values in `<kind>_<pid>.db` files that outlive the process, so a restart into the same
    directory would count the last run's requests again (its docs: wipe the directory between runs)."""
    path.mkdir(parents=True, exist_ok=True)
    stale = list(path.glob("*.db"))
    for f in stale:
        f.unlink(missing_ok=True)
    return len(stale)


class GcPauses:
    """Times every garbage collection (`gc.callbacks`, ~1 µs each) while installed; `flush` moves the pauses into
    `Metrics.gc_pause`. The callback itself touches no metric: a collection can start inside a metric update
    that holds prometheus_client's lock (in multiprocess mode one lock for every metric of the process), and
    observing from the callback then deadlocked a worker of `--processes 2` (tests/unit/test_gc_pauses.py)."""

    def __init__(self, pause: Histogram) -> None:
        self.started = 0.0
        self.children = {g: pause.labels(str(g)) for g in (0, 1, 2)}
        self.pending: deque[tuple[int, float]] = deque(maxlen=100_000)

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self.started = time.perf_counter()
        else:
            self.pending.append((info["generation"], time.perf_counter() - self.started))

    def flush(self) -> None:
        for _ in range(len(self.pending)):  # not `while`: a collection during `observe` appends more
            generation, seconds = self.pending.popleft()
            self.children[generation].observe(seconds)

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *_) -> None:
        gc.callbacks.remove(self)
        self.flush()


async def watch_event_loop(lag: Histogram, sample: Callable[[], None], every_s: float = 0.1) -> None:
    """Sample the event loop's lateness, and call `sample` (gauges of the moment, such as queue depths), every
    `every_s` until cancelled. A request waits for a busy loop before the app sees it (accept, header parsing)
    and after it answers (writing the response): time outside the request metrics. Gauges are sampled here
    rather than at scrape time because with several workers a scrape runs in only one of them."""
    while True:
        due = time.monotonic() + every_s
        await asyncio.sleep(every_s)
        lag.observe(max(0.0, time.monotonic() - due))
        sample()
