"""Dynamic micro-batching across requests, one scheduler per model.

Each request carries its own future. A worker takes the oldest request, gathers more until the batch holds
`max_rows` rows or `max_delay_s` has passed since the first one's arrival, runs the batch off the event loop,
and fans the results (or the batch's exception) out to exactly the requests of that batch. The queue is
bounded: `submit` raises QueueFull at once when it is full. Requests whose future was cancelled (client gone,
timed out) are dropped before the forward and free their slot. Times use `time.monotonic()`.

A request of several inputs (a batch upload, a KServe v2 tensor of N inputs) may submit them as one item of
`slots` inputs: one future, one queue entry and one result for a forward's worth of them, where one item per
input cost the event loop more than an MNIST verdict's own scoring. Queue places count inputs either way.

A request whose inputs succeed or fail together is admitted with `reserve`: it holds their queue places from
admission until its parts are submitted, so requests arriving in between (the event loop runs them while the
parts' tasks start, or while uploads decode in a thread) are refused instead of the admitted request's later parts.

A request that needs several forwards (a sequential test's later rounds) resubmits with `resume=True`: it
goes to the head of the queue, never bounces off a full queue, and shares the next forward with whatever
requests, at whatever round, are waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class QueueFull(RuntimeError):
    """The model's queue holds `max_queue` requests: shed load now rather than queue without bound."""


class Draining(RuntimeError):
    """The service is shutting down and takes no new work."""


@dataclass
class Timings:
    queue_s: float = 0.0
    compute_s: float = 0.0
    batch_requests: int = 0
    batch_rows: int = 0


@dataclass
class _Item(Generic[T]):
    payload: T
    rows: int
    slots: int
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)


@dataclass
class BatchStats:
    """What one batch cost; handed to `on_batch` so the HTTP layer can export it."""

    requests: int  # inputs: an item of several inputs counts each
    rows: int
    compute_s: float
    queue_s: list[float]
    failed: bool


class Reservation:
    """Queue places held for one request between its admission and its parts' submits (`Batcher.reserve`): a
    submit given the reservation takes its places from it instead of checking the queue; places never taken
    (an input that failed to decode, a client gone) go back on `release`. A context manager releases on exit."""

    def __init__(self, batcher: Batcher, n: int) -> None:
        self._batcher, self.left = batcher, n

    def take(self, slots: int) -> bool:
        """Hand `slots` held places to an item being queued (the batcher moves them from held to queued); False,
        nothing handed, if fewer are left."""
        if slots > self.left:
            return False
        self.left -= slots
        return True

    def release(self) -> None:
        self._batcher._reserved -= self.left
        self.left = 0

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Batcher(Generic[T, R]):
    def __init__(
        self,
        run_batch: Callable[[list[T]], Sequence[R]],
        max_rows: int,
        max_delay_s: float,
        max_queue: int,
        workers: int = 1,
        on_batch: Callable[[BatchStats], Any] | None = None,
        name: str = "batcher",
    ) -> None:
        if max_rows < 1 or max_queue < 1 or workers < 1:
            raise ValueError("max_rows, max_queue and workers must be >= 1")
        self.run_batch, self.max_rows, self.max_delay_s = run_batch, max_rows, max_delay_s
        self.max_queue, self.workers, self.on_batch, self.name = max_queue, workers, on_batch, name
        self._queue: deque[_Item[T]] = deque()
        self._rows = 0  # rows of everything queued, cancelled items included until purged
        self._slots = 0  # inputs queued, counted alike
        self._reserved = 0  # places held by admitted requests not yet submitted (Reservation)
        self._wakeup: asyncio.Condition | None = None
        self._tasks: list[asyncio.Task] = []
        self._executor: ThreadPoolExecutor | None = None
        self._closing = False
        self.in_flight = 0
        self.sessions = 0  # multi-round requests between their rounds (see `session`)

    @property
    def depth(self) -> int:
        """Inputs waiting (an item of several inputs counts each)."""
        return self._slots

    async def start(self) -> None:
        self._wakeup = asyncio.Condition()
        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix=self.name)
        self._tasks = [asyncio.create_task(self._worker(), name=f"{self.name}-{i}") for i in range(self.workers)]

    async def submit(
        self, payload: T, rows: int = 1, resume: bool = False, slots: int = 1, held: Reservation | None = None
    ) -> tuple[R, Timings]:
        """Queue one request (or `slots` inputs of one request, as one item) and wait for its result. Raises
        QueueFull / Draining at once, or the batch's error.

        resume: a later round of an admitted request; it jumps the queue and is never refused (drain waits
        for it like any queued work). held: the request's reservation, which its places come from."""
        if self._closing and not resume:
            raise Draining("shutting down")
        moved = not resume and held is not None and held.left >= slots  # its places move from held to queued
        if not (resume or moved) and self.free() < slots:  # cancelled requests free their slot now
            raise QueueFull(f"{self.name}: {self._slots} inputs queued")
        item = _Item(payload, rows, slots, asyncio.get_running_loop().create_future())
        async with self._wakeup:
            if resume:
                self._queue.appendleft(item)
            else:
                self._queue.append(item)
            self._rows += rows
            self._slots += slots
            # Taken here, once queued: a reservation spent before a failed lock acquire would hold its places
            # for good. (A part of the same request that took them meanwhile: queued unchecked, never lost.)
            if moved and held.take(slots):
                self._reserved -= slots
            self._wakeup.notify()
        return await item.future

    def reserve(self, n: int) -> Reservation:
        """Hold `n` queue places for one request's inputs (see Reservation); QueueFull if fewer are free."""
        if self.free() < n:
            raise QueueFull(f"{self.name}: {self._slots} inputs queued")
        self._reserved += n
        return Reservation(self, n)

    @contextlib.contextmanager
    def session(self):
        """Mark a multi-round request as live from its first round to its last, so that `drain` waits for it
        even in the instant between one round's result and the next round's submit."""
        self.sessions += 1
        try:
            yield
        finally:
            self.sessions -= 1

    def free(self) -> int:
        """Places left in the queue now, less those held by reservations (cancelled requests purged first when
        it looks full)."""
        if self._slots + self._reserved >= self.max_queue:
            self._purge()
        return self.max_queue - self._slots - self._reserved

    def _purge(self) -> None:
        self._queue = deque(i for i in self._queue if not i.future.done())
        self._rows = sum(i.rows for i in self._queue)
        self._slots = sum(i.slots for i in self._queue)

    def _pop(self) -> _Item[T]:
        item = self._queue.popleft()
        self._rows -= item.rows
        self._slots -= item.slots
        return item

    def _drop_dead_head(self) -> None:
        while self._queue and self._queue[0].future.done():
            self._pop()

    def _take(self) -> list[_Item[T]]:
        """Pop live requests from the head until the row budget is used; the first one always fits."""
        batch, rows = [], 0
        while self._queue:
            item = self._queue[0]
            if item.future.done():  # cancelled by a timeout or a client that went away: frees its slot
                self._pop()
                continue
            if batch and rows + item.rows > self.max_rows:
                break
            batch.append(self._pop())
            rows += item.rows
        return batch

    async def _gather(self) -> list[_Item[T]]:
        async with self._wakeup:
            self._drop_dead_head()
            while not self._queue:
                await self._wakeup.wait()
                self._drop_dead_head()
            deadline = self._queue[0].enqueued + self.max_delay_s
            while self._rows < self.max_rows and (left := deadline - time.monotonic()) > 0:
                try:
                    await asyncio.wait_for(self._wakeup.wait(), left)
                except TimeoutError:
                    break
            return self._take()

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            if not batch:
                continue
            start = time.monotonic()
            inputs = sum(i.slots for i in batch)
            self.in_flight += len(batch)
            failed = False
            try:
                results = await loop.run_in_executor(self._executor, self.run_batch, [i.payload for i in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} requests")
            except Exception as e:  # fan the failure out to exactly this batch's requests
                failed, results = True, [e] * len(batch)
            finally:
                self.in_flight -= len(batch)
            compute = time.monotonic() - start
            rows = sum(i.rows for i in batch)
            waits = [start - i.enqueued for i in batch]
            for item, res, wait in zip(batch, results, waits, strict=True):
                if item.future.done():
                    continue
                if failed:
                    item.future.set_exception(res)
                else:
                    item.future.set_result((res, Timings(wait, compute, inputs, rows)))
            if self.on_batch:
                self.on_batch(BatchStats(inputs, rows, compute, waits, failed))

    async def drain(self, timeout_s: float) -> bool:
        """Refuse new work, then wait up to `timeout_s` for queued and running requests. True if all finished."""
        self._closing = True
        deadline = time.monotonic() + timeout_s
        while (self._live() or self.in_flight or self.sessions) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return not (self._live() or self.in_flight or self.sessions)

    def _live(self) -> bool:
        self._drop_dead_head()
        return bool(self._queue)

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for item in self._queue:
            if not item.future.done():
                item.future.set_exception(Draining("shutting down"))
        self._queue.clear()
        self._rows = self._slots = 0
        if self._executor:
            self._executor.shutdown(wait=True, cancel_futures=True)
