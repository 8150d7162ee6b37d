"""A closed-loop HTTP load generator in several processes, for machines without `wrk` (the GPU machine).

Why processes: one Python asyncio client tops out at a few hundred requests/s and then measures itself, not
the server (a first GPU run: throughput *fell* from 332 to ~115 requests/s as connections went from 16 to
256). Each process runs its own event loop with its share of the connections; latencies are merged.

    closed_loop(url, body, headers, connections=64, seconds=6, processes=4) -> summary dict
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import time

import httpx
import numpy as np


async def _one_process(url: str, body: bytes, headers: dict, conns: int, seconds: float, start_at: float) -> dict:
    done, errors, lat = 0, 0, []
    limits = httpx.Limits(max_connections=conns, max_keepalive_connections=conns)
    async with httpx.AsyncClient(timeout=30, limits=limits, trust_env=False) as c:

        async def worker(end: float) -> None:
            nonlocal done, errors
            while time.perf_counter() < end:
                t = time.perf_counter()
                try:
                    r = await c.post(url, content=body, headers=headers)
                except httpx.HTTPError:
                    errors += 1
                    continue
                lat.append(time.perf_counter() - t)
                done += r.status_code == 200

        await asyncio.sleep(max(0.0, start_at - time.time()))  # every process starts together
        end = time.perf_counter() + seconds
        await asyncio.gather(*(worker(end) for _ in range(conns)))
    return {"ok": done, "errors": errors, "latencies": lat}


def _run(args: tuple, out: mp.Queue) -> None:
    out.put(asyncio.run(_one_process(*args)))


def closed_loop(url: str, body: bytes, headers: dict, connections: int, seconds: float, processes: int = 4) -> dict:
    """`connections` back-to-back connections spread over `processes` client processes (at least one each)."""
    processes = max(1, min(processes, connections))
    ctx = mp.get_context("spawn")  # no inherited event loop or CUDA state
    out: mp.Queue = ctx.Queue()
    shares = [connections // processes + (i < connections % processes) for i in range(processes)]
    start_at = time.time() + 5  # past the client processes' start-up (imports)
    procs = [ctx.Process(target=_run, args=((url, body, headers, n, seconds, start_at), out)) for n in shares]
    for p in procs:
        p.start()
    parts = [out.get(timeout=seconds + 120) for _ in procs]
    for p in procs:
        p.join(30)
    lat = np.array([x for part in parts for x in part["latencies"]]) * 1e3
    ok = sum(part["ok"] for part in parts)
    return {
        "connections": connections,
        "client_processes": processes,
        "rps": ok / seconds,
        "non_200": len(lat) - ok,
        "transport_errors": sum(part["errors"] for part in parts),
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
    }
