"""One served model: its detector resident on the device, its batcher, and the per-device batching defaults."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from nccr_guard.batcher import Batcher, BatchStats, Draining, QueueFull, Reservation, Timings
from nccr_guard.config import Settings
from nccr_guard.detector import VERDICTS, Detector, Verdict
from nccr_guard.inputs import InputError
from nccr_guard.server.metrics import Metrics, VerdictMetrics

log = logging.getLogger("nccr_guard")
S = TypeVar("S", np.ndarray, list[int])


CPU_MIN_ROWS = 32  # MNIST (4 rows a verdict): 8 inputs per forward, +38-66 % images/s on batch requests


@dataclass(frozen=True)
class BatchPolicy:
    max_rows: int
    max_delay_s: float
    workers: int
    torch_threads: int


def usable_cpus(configured: int = 0) -> int:
    """`configured` (--cpus: a container's CPU quota, which the affinity mask does not show), else the CPUs this
    process may run on: `os.process_cpu_count()` on Python 3.13+, the affinity mask before."""
    if configured:
        return configured
    if count := getattr(os, "process_cpu_count", None):
        return count() or 1
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def batch_policy(settings: Settings, device: str, rows_per_input: int) -> BatchPolicy:
    """Per-device defaults, measured (docs/performance.md): on a small CPU, small batches on one-thread workers
    (one per core) win, but not below CPU_MIN_ROWS rows, under which the fixed cost of a forward call dominates a
    small model's rows; on a GPU, large batches and a short gathering window."""
    gpu = device.startswith("cuda")
    cores = usable_cpus(settings.cpus)  # a container's CPU limit, not the node's cores
    max_rows = settings.max_batch or (rows_per_input * 64 if gpu else max(2 * rows_per_input, CPU_MIN_ROWS))
    delay = settings.max_delay_ms / 1000 if settings.max_delay_ms >= 0 else (0.002 if gpu else 0.001)
    workers = 2 if gpu else max(1, min(cores, 4) // settings.processes)
    threads = settings.torch_threads or (0 if gpu else 1)
    return BatchPolicy(max(max_rows, rows_per_input), delay, workers, threads)


class ModelRuntime:
    def __init__(self, detector: Detector, policy: BatchPolicy, metrics: Metrics, max_queue: int) -> None:
        self.detector, self.policy, self.metrics = detector, policy, metrics
        self.name = detector.manifest.name
        self.ready = False
        # This model's labelled metric children, looked up once: labels() costs ~2.5 µs a call (a lock and a dict
        # under it), several calls per verdict on the hot path.
        m = metrics
        self._compute, self._batch_requests, self._batch_rows, self._queue_wait = (
            h.labels(self.name) for h in (m.compute, m.batch_requests, m.batch_rows, m.queue_wait)
        )
        self._verdict_metrics = VerdictMetrics.of(m, self.name, VERDICTS)
        # Sequential testing: the batcher runs rounds of jobs (Detector.advance), each request resubmitting its
        # job until it is settled; otherwise one fixed-K forward per batch of parts (`_detect_parts`).
        self.sequential = detector.schedule is not None
        self.batcher: Batcher = Batcher(
            detector.advance if self.sequential else self._detect_parts,
            policy.max_rows,
            policy.max_delay_s,
            max_queue,
            policy.workers,
            self._observe,
            f"model-{self.name}",
        )
        # Inputs per fixed-K forward: a batch larger than that (one part of a many-input request) runs in several.
        self.forward_inputs = max(1, policy.max_rows // detector.rows_per_input)

    def _detect_parts(self, parts: list[np.ndarray]) -> list[list[Verdict]]:
        """Fixed-K verdicts of every part (n_i, *shape) in a batch, in forwards of at most `forward_inputs`
        inputs; each part's verdicts, in order."""
        xs = parts[0] if len(parts) == 1 else np.concatenate(parts)
        verdicts = self.detector.detect(xs, chunk=self.forward_inputs)
        out, at = [], 0
        for p in parts:
            out.append(verdicts[at : at + len(p)])
            at += len(p)
        return out

    def _observe(self, s: BatchStats) -> None:
        self._compute.observe(s.compute_s)
        self._batch_requests.observe(s.requests)
        self._batch_rows.observe(s.rows)
        for w in s.queue_s:
            self._queue_wait.observe(w)

    async def start(self) -> None:
        await self.batcher.start()
        t = time.monotonic()
        x = np.zeros((1, *self.detector.manifest.input.shape), np.float32)
        for _ in range(3):  # warm-up: allocator, kernels, thread pools
            await self._run(x)
        self.ready = True
        log.info("model %s warm in %.2fs", self.name, time.monotonic() - t)

    async def _run(self, xs: np.ndarray, held: Reservation | None = None) -> tuple[list[Verdict], Timings]:
        """Verdicts of one part (see `parts`) and its batch's timings; `held`: its request's
        queue places (see `admit`)."""
        if not self.sequential:
            return await self.batcher.submit(xs, len(xs) * self.detector.rows_per_input, slots=len(xs), held=held)
        [x] = xs
        det, job, total = self.detector, self.detector.start(x), Timings()
        with self.batcher.session():
            while not job.done:
                resume = job.forwarded > 0
                _, t = await self.batcher.submit(job, len(det.pending(job)), resume=resume, held=held)
                total.queue_s += t.queue_s
                total.compute_s += t.compute_s
                total.batch_requests, total.batch_rows = t.batch_requests, t.batch_rows  # the last round's batch
        assert job.verdict is not None
        return [job.verdict], total

    def admit(self, n: int) -> Reservation:
        """Hold the queue places of a request of `n` inputs that all succeed or fail together (KServe v2 infer),
        or refuse it: admitted input by input, the verdicts of those that fit were computed and thrown away with
        the request's 503; admitted on a look at the free places, its later parts could still meet a queue
        filled meanwhile by requests that came after it. Pass the reservation to `detect_part`; release it
        (`with`) once the parts are submitted."""
        if n > self.batcher.max_queue:
            cap = self.batcher.max_queue
            raise InputError(f"{n} inputs exceed model {self.name}'s queue of {cap} (--max-queue)", 413, "too_large")
        try:
            return self.batcher.reserve(n)
        except QueueFull:
            raise self.at_capacity() from None

    def at_capacity(self) -> InputError:
        return InputError(f"model {self.name} is at capacity; retry shortly", 503, "queue_full")

    def parts(self, xs: S) -> list[S]:
        """`xs` (n, *shape), the inputs of one request, cut into the parts `detect_part` takes; a list indexed
        like them (their positions in the request) is cut alike. Fixed-K: one part per batch worker at most, each
        a whole number of forwards (`forward_inputs`) but the last; sequential: one per input (each runs its own
        rounds). Why: every part is a trip through the batcher, a worker-thread hop and a future on the event
        loop, CPU an MNIST verdict's ~0.1 ms cannot spare, while more parts than workers finish no sooner
        (docs/decisions/007-batching-policy.md)."""
        if self.sequential or not len(xs):
            return [xs[i : i + 1] for i in range(len(xs))]
        f = self.forward_inputs
        forwards = -(-len(xs) // f)
        size = f * -(-forwards // min(self.policy.workers, forwards))
        return [xs[i : i + size] for i in range(0, len(xs), size)]

    async def detect_part(self, xs: np.ndarray, held: Reservation | None = None) -> list[tuple[Verdict, Timings]]:
        """Verdicts of a part of one request (see `parts`), submitted as one batcher item: its inputs share one
        future and one queue-wait observation, and stand or fall together (queue full, backend error). `held`:
        the request's reserved queue places (`admit`), which the part's places come from."""
        try:
            verdicts, timings = await self._run(xs, held)
        except QueueFull:
            raise self.at_capacity() from None
        except Draining:
            raise InputError("shutting down", 503, "draining") from None
        except Exception as e:  # the batch failed in the backend: only its requests see this
            log.exception("batch failed on model %s", self.name)
            raise InputError(
                f"model {self.name} failed on this batch ({type(e).__name__}); retry", 503, "backend_error"
            ) from None
        self._verdict_metrics.count(verdicts)
        return [(v, timings) for v in verdicts]
