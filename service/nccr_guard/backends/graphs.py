"""CUDA graph replay of the torch forward, per batch-size bucket.

Why: on a GPU a small model's forward is mostly launch overhead (Python and one CUDA launch per layer and per
hook), not arithmetic; a captured graph replays every kernel of the forward with one launch. Batches are padded
up to the next bucket (at most 1.25x the rows) so that a handful of graphs serves every batch size up to
`max_rows`; bigger forwards run eagerly, where launches are amortised anyway (the torch one-function verdict,
whose many small operators are not, replays in graph-sized chunks instead: TorchBackend.fused_verdicts).

Every graph is checked once against the eager forward, on the batch that triggered its capture and on a scaled
copy of it; a capture that fails or disagrees turns graphs off for the backend (a warning, then eager
forwards), so a model that cannot be captured (host syncs, data-dependent shapes) still serves correctly. On a
GPU each new graph also races the eager forward of that batch, and a bucket where eager wins (a large model,
for which launches are a small part of the time and padding costs real arithmetic) stays eager.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

import torch

log = logging.getLogger("nccr_guard")

Outputs = tuple[torch.Tensor, ...]
# capture(fn, static_input) -> (replay, static outputs): replay() recomputes fn(static_input) into the outputs.
Capture = Callable[[Callable[[torch.Tensor], Outputs], torch.Tensor], tuple[Callable[[], None], Outputs]]


def buckets(max_rows: int) -> list[int]:
    """Padded batch sizes: each octave in four steps (1-8, 10, 12, 14, 16, 20, 24, ...) up to max_rows, so padding
    adds at most 25 % of rows (a ResNet verdict of 34 rows runs as 40) and a few graphs cover every size."""
    out, n = {max_rows}, 1
    while n < max_rows:
        out.add(n)
        n += max(1, (1 << (n.bit_length() - 1)) // 4)
    return sorted(out)


def cuda_capture(pool: object) -> Capture:
    """torch's recipe: warm up on a side stream (lazy initialisation, cuDNN autotuning), then capture into a
    memory pool shared by all of a backend's graphs (they never run at once: one lock; outputs are copied out
    before the lock is released)."""

    def capture(fn: Callable[[torch.Tensor], Outputs], static: torch.Tensor) -> tuple[Callable[[], None], Outputs]:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fn(static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            outs = fn(static)
        return graph.replay, outs

    return capture


class GraphedForward:
    """fn (a batch in, a tuple of batch-first tensors out) replayed from graphs captured lazily per (key, bucket).

    `key` separates forwards that compute different things from same-shaped input (the full network, or the
    copies truncated to some layers). `__call__` returns host-ready tensors sliced to the real batch, or None
    when the batch is too big or graphs are off: the caller then runs eagerly."""

    def __init__(
        self,
        capture: Capture,
        max_rows: int,
        rtol: float = 1e-3,
        atol: float = 1e-4,
        sync: Callable[[], None] | None = None,
    ) -> None:
        """`sync` (torch.cuda.synchronize on a GPU) turns on a race at capture: the padded replay against the
        eager forward of the real rows, best of three each; where eager wins (a big model, whose launches are a
        small part of its time, padded by up to 25 %), that bucket stays eager."""
        self.capture, self.sync = capture, sync
        self.sizes = buckets(max_rows)
        self.rtol, self.atol = rtol, atol
        self.active = True
        # (key, bucket, shape, dtype) -> (static input, replay, static outputs), or None: eager was faster there
        self.graphs: dict[tuple, tuple[torch.Tensor, Callable[[], None], Outputs] | None] = {}
        self._lock = threading.Lock()

    def bucket(self, n: int) -> int | None:
        return next((b for b in self.sizes if b >= n), None)

    def __call__(self, fn: Callable[[torch.Tensor], Outputs], x: torch.Tensor, key: Sequence = ()) -> Outputs | None:
        size = self.bucket(len(x))
        if not self.active or size is None:
            return None
        n, gkey = len(x), (tuple(key), size, tuple(x.shape[1:]), x.dtype)
        with self._lock:
            if not self.active:
                return None
            if gkey not in self.graphs:
                return self._capture(fn, x, gkey)
            if (graph := self.graphs[gkey]) is None:
                return None
            static, replay, outs = graph
            static[:n].copy_(x)
            replay()
            return tuple(o[:n].clone() for o in outs)

    def _capture(self, fn: Callable[[torch.Tensor], Outputs], x: torch.Tensor, gkey: tuple) -> Outputs | None:
        n, size = len(x), gkey[1]
        static = torch.zeros((size, *x.shape[1:]), dtype=x.dtype, device=x.device)
        static[:n].copy_(x)
        try:
            replay, outs = self.capture(fn, static)
            # Replayed on other data first, then on the batch: a graph that froze what it saw at capture (host-side
            # branches, values read back to Python) fails the first comparison.
            for probe in (x * 0.5, x):
                static[:n].copy_(probe)
                replay()
                got = tuple(o[:n].clone() for o in outs)
                want = fn(static)
                for g, w in zip(got, want, strict=True):
                    if not torch.allclose(g.float(), w[:n].float(), rtol=self.rtol, atol=self.atol):
                        err = float((g.float() - w[:n].float()).abs().max())
                        return self._off(f"replay of {size} rows differs from the eager forward by up to {err:.3g}")
            faster = self._faster(replay, lambda: fn(x))
        except Exception as e:  # noqa: BLE001 - any capture failure means: serve eagerly
            return self._off(f"capture of {size} rows failed ({type(e).__name__}: {e})")
        what = ",".join(gkey[0]) or "full network"
        self.graphs[gkey] = (static, replay, outs) if faster else None
        log.info("CUDA graph for %d rows (%s): %s", size, what, "captured" if faster else "eager is faster, dropped")
        return got

    def _faster(self, replay: Callable[[], None], eager: Callable[[], object]) -> bool:
        """Whether the (padded) replay beats the eager forward; True without a `sync` to time with."""
        if self.sync is None:
            return True

        def best(run: Callable[[], object]) -> float:
            times = []
            for _ in range(3):
                self.sync()
                t = time.perf_counter()
                run()
                self.sync()
                times.append(time.perf_counter() - t)
            return min(times)

        return best(replay) < best(eager)

    def _off(self, why: str) -> None:
        self.active = False
        self.graphs.clear()
        log.warning("CUDA graphs turned off, forwards run eagerly: %s", why)
        return None
