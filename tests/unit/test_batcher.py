"""The micro-batcher with real threads and a real event loop: batching, fan-out of results and errors,
bounded queue, cancelled requests freeing their slot, draining."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from nccr_guard.batcher import Batcher, Draining, QueueFull


def run(coro):
    return asyncio.run(coro)


def gated():
    """An event and a batch function that holds every batch until the event is set (5 s at most)."""
    gate = threading.Event()

    def slow(xs):
        gate.wait(5)
        return xs

    return gate, slow


async def running_full_batch(slow) -> tuple[Batcher, asyncio.Future]:
    """A started batcher of 8 rows and 10 queue places whose worker runs a full batch ("first") held by `slow`:
    the queue is empty and stays as the test fills it."""
    b = Batcher(slow, max_rows=8, max_delay_s=0.0, max_queue=10)
    await b.start()
    first = asyncio.ensure_future(b.submit("first", rows=8))
    await asyncio.sleep(0.05)  # now running, queue empty
    return b, first


def test_requests_share_batches_and_get_their_own_results():
    sizes: list[int] = []

    def double(xs):
        sizes.append(len(xs))
        time.sleep(0.01)
        return [x * 2 for x in xs]

    async def main():
        b = Batcher(double, max_rows=8, max_delay_s=0.02, max_queue=100)
        await b.start()
        out = await asyncio.gather(*(b.submit(i) for i in range(20)))
        await b.stop()
        return out

    out = run(main())
    assert [r for r, _ in out] == [i * 2 for i in range(20)]
    assert max(sizes) > 1 and sum(sizes) == 20 and max(sizes) <= 8
    assert all(t.batch_requests >= 1 and t.compute_s > 0 for _, t in out)


def test_a_failing_batch_fails_only_its_own_requests():
    def fail_on_13(xs):
        if 13 in xs:
            raise RuntimeError("boom")
        return xs

    async def main():
        b = Batcher(fail_on_13, max_rows=2, max_delay_s=0.0, max_queue=100)
        await b.start()
        res = await asyncio.gather(*(b.submit(i) for i in range(20)), return_exceptions=True)
        again = await b.submit(99)
        await b.stop()
        return res, again

    res, again = run(main())
    failed = [i for i, r in enumerate(res) if isinstance(r, Exception)]
    assert 13 in failed and 1 <= len(failed) <= 2 and again[0] == 99


def test_full_queue_raises_at_once_and_cancelled_requests_free_slots():
    gate, slow = gated()

    async def main():
        b = Batcher(slow, max_rows=1, max_delay_s=0.0, max_queue=2)
        await b.start()
        first = asyncio.ensure_future(b.submit(0))
        await asyncio.sleep(0.05)  # now running, queue empty
        queued = [asyncio.ensure_future(b.submit(i)) for i in (1, 2)]
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull):
            await b.submit(3)
        queued[0].cancel()
        await asyncio.sleep(0.01)
        late = asyncio.ensure_future(b.submit(4))
        gate.set()
        results = [await first, await queued[1], await late]
        await b.stop()
        return [r for r, _ in results]

    assert run(main()) == [0, 2, 4]


def test_an_item_of_several_inputs_takes_as_many_queue_places():
    """One request's inputs submitted as one item (a forward's worth): one future, `slots` places in the
    queue, counted as that many inputs in the batch's timings; refused whole when they do not all fit."""
    gate, slow = gated()

    async def main():
        b, first = await running_full_batch(slow)
        part = asyncio.ensure_future(b.submit("part", rows=8, slots=6))
        await asyncio.sleep(0.01)
        assert (b.free(), b.depth) == (4, 6)
        with pytest.raises(QueueFull):
            await b.submit("too many", rows=8, slots=5)
        last = asyncio.ensure_future(b.submit("last", rows=4, slots=4))
        await asyncio.sleep(0.01)
        assert (b.free(), b.depth) == (0, 10)
        gate.set()
        out = [await first, await part, await last]
        assert (b.free(), b.depth) == (10, 0)
        await b.stop()
        return out

    (r0, _), (r1, t1), (r2, t2) = run(main())
    assert (r0, r1, r2) == ("first", "part", "last")
    assert (t1.batch_requests, t1.batch_rows) == (6, 8)  # its own batch: 8 rows fill max_rows
    assert (t2.batch_requests, t2.batch_rows) == (4, 4)


def test_reserved_places_stay_with_their_request_until_its_parts_are_submitted():
    """A request admitted with `reserve` (KServe v2 infer, upload batches) holds its places: requests that come
    after it are refused while they are held, its own parts never; places it never used come back on release."""
    gate, slow = gated()

    async def main():
        b, first = await running_full_batch(slow)
        held = b.reserve(6)
        assert (b.free(), b.depth) == (4, 0)
        with pytest.raises(QueueFull):
            b.reserve(5)
        other = asyncio.ensure_future(b.submit("other", rows=4, slots=4))  # takes the places not held
        await asyncio.sleep(0.01)
        assert (b.free(), b.depth) == (0, 4)
        with pytest.raises(QueueFull):
            await b.submit("later")
        parts = [asyncio.ensure_future(b.submit(p, rows=4, slots=2, held=held)) for p in ("p1", "p2")]
        await asyncio.sleep(0.01)
        assert (held.left, b.depth, b.free()) == (2, 8, 0)
        with pytest.raises(QueueFull):  # more than it holds: checked against the queue like any submit
            await b.submit("p3", slots=3, held=held)
        assert held.left == 2
        with held:  # released on exit
            pass
        assert (held.left, b.free()) == (0, 2)
        gate.set()
        out = [await f for f in (first, other, *parts)]
        assert (b.free(), b.depth) == (10, 0)
        await b.stop()
        return [r for r, _ in out]

    assert run(main()) == ["first", "other", "p1", "p2"]


def test_drain_finishes_queued_work_then_refuses():
    async def main():
        b = Batcher(lambda xs: (time.sleep(0.02), xs)[1], max_rows=1, max_delay_s=0.0, max_queue=10)
        await b.start()
        pending = [asyncio.ensure_future(b.submit(i)) for i in range(5)]
        await asyncio.sleep(0)
        assert await b.drain(5.0)
        with pytest.raises(Draining):
            await b.submit(9)
        await b.stop()
        return [p.result()[0] for p in pending]

    assert run(main()) == [0, 1, 2, 3, 4]


def test_bad_arguments_fail_at_construction():
    with pytest.raises(ValueError):
        Batcher(lambda xs: xs, max_rows=0, max_delay_s=0, max_queue=1)


def test_resumed_rounds_jump_the_queue_and_are_never_refused():
    """A sequential test's later round goes first and is admitted even when the queue is full."""
    order: list[str] = []
    gate = threading.Event()

    def run_batch(xs):
        gate.wait(5)
        order.extend(xs)
        return xs

    async def main():
        b = Batcher(run_batch, max_rows=1, max_delay_s=0.0, max_queue=2)
        await b.start()
        first = asyncio.ensure_future(b.submit("a"))  # taken by the worker, blocks on the gate
        await asyncio.sleep(0.05)
        queued = [asyncio.ensure_future(b.submit(x)) for x in ("b", "c")]
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFull):
            await b.submit("d")
        resumed = asyncio.ensure_future(b.submit("a2", resume=True))
        await asyncio.sleep(0.05)
        gate.set()
        await asyncio.gather(first, resumed, *queued)
        await b.stop()

    run(main())
    assert order == ["a", "a2", "b", "c"]


def test_drain_waits_for_a_multi_round_request_between_its_rounds():
    async def main():
        b = Batcher(lambda xs: xs, max_rows=4, max_delay_s=0.0, max_queue=10)
        await b.start()

        async def two_rounds():
            with b.session():
                await b.submit("round 1")
                await asyncio.sleep(0.2)  # between rounds: nothing queued, nothing in flight
                return await b.submit("round 2", resume=True)

        job = asyncio.ensure_future(two_rounds())
        await asyncio.sleep(0.05)
        t = time.monotonic()
        drained = await b.drain(5.0)
        waited = time.monotonic() - t
        result, _ = await job
        await b.stop()
        return drained, waited, result

    drained, waited, result = run(main())
    assert drained and result == "round 2" and waited >= 0.1
