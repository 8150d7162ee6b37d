"""What HTTP alone costs: the service's one-PNG-per-request peak against servers that do nothing but HTTP.

    python -m bench.http_floor [--seconds 5] [--rounds 2] [--processes 1 2]   ->  reports/bench/http-floor.json

The service goal of issue #7 (>= 0.90x of the best bare in-process loop) compares a server with a loop that does
no HTTP at all. For a model whose verdict costs ~0.1 ms of CPU, the HTTP work of a request costs several times
that, and no server can beat a server that skips the verdict. This bench measures that ceiling on the same
machine, under the same wrk load (one digit PNG per POST, closed loop, the best of 16 and 64 connections), with
the same uvicorn (httptools, uvloop, same keep-alive), at each process count:

- `asgi`: a bare ASGI app that reads the body and sends a fixed JSON answer of a verdict's size (uvicorn's floor);
- `fastapi`: a FastAPI route that reads the body and returns a fixed `Detection` (the response model the service
  uses): the framework's floor, with no middleware, decoding, batching, model or metrics;
- `service`: `nccr-guard serve` on the default models.

Servers run one at a time, in alternating rounds; each round's peak counts, with the server's CPU per request at
16 connections (all its processes and threads: what a request costs it, apart from the client's share of the
cores); the report keeps every round and the medians. `service / fastapi` is the share of the framework's floor
the service reaches, and the CPU per request of the two tells what our own code and the verdict add to the HTTP
stack's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from fastapi import FastAPI, Request

from bench.common import ROOT, cpu_ms_per_request, start_server, tree_cpu_s, write_report
from bench.serve import png_bytes, run_wrk
from nccr_guard.server.schemas import Detection

# A verdict as the service answers it (the body's size and the response model's validation are the same).
ANSWER = {
    "model": "mnist",
    "modality": "image",
    "verdict": "clean",
    "score": 0.796,
    "threshold": 1.7813,
    "p_value": 0.3271,
    "prediction": {"index": 0, "label": "0", "confidence": 1.0},
    "passes": 4,
    "timings_ms": {"queue": 1.138, "compute": 0.819, "total": 2.412},
}
BODY = Detection(**ANSWER).model_dump_json().encode()


async def asgi(scope, receive, send) -> None:
    """Reads the request's body, answers the fixed verdict; lifespan acknowledged."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": BODY})


app = FastAPI()


@app.post("/v1/detect", response_model=Detection)
async def detect(request: Request) -> Detection:
    await request.body()
    return Detection(**ANSWER)


def start_floor(name: str, port: int, processes: int) -> subprocess.Popen:
    """uvicorn with bench.http_floor's `asgi` or `app` (FastAPI) on 127.0.0.1:`port`, once it answers."""
    target = {"asgi": "bench.http_floor:asgi", "fastapi": "bench.http_floor:app"}[name]
    cmd = [sys.executable, "-m", "uvicorn", target, "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--no-access-log", "--log-level", "warning", "--timeout-keep-alive", "5", "--workers", str(processes)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(150):
        try:
            if httpx.post(f"http://127.0.0.1:{port}/v1/detect", content=b"x", trust_env=False).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{name} floor did not start")


def peak(port: int, pid: int, body: Path, seconds: float) -> dict:
    """Best requests/s of wrk at 16 and 64 connections (after a 1 s warm-up) and the server's CPU per request
    at 16 (all processes and threads, and event loops alone); non-2xx answers fail the bench."""
    url = f"http://127.0.0.1:{port}/v1/detect"
    run_wrk(url, body, 8, 1)
    before = tree_cpu_s(pid)
    runs = [run_wrk(url, body, 16, seconds)]
    used = cpu_ms_per_request(pid, before, runs[0]["rps"] * int(seconds))
    runs.append(run_wrk(url, body, 64, seconds))
    if bad := sum(r["non_2xx"] for r in runs):
        raise RuntimeError(f"{bad} non-2xx answers on port {port}")
    best = max(runs, key=lambda r: r["rps"])
    return {
        "rps": best["rps"],
        "connections": best["connections"],
        "p50_ms": best.get("p50_ms"),
        "cpu_ms_per_request": used,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk not found: apt-get install wrk")
    port = 19000 + os.getpid() % 1000
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        body = Path(tmp) / "digit.png"
        body.write_bytes(png_bytes())
        for r in range(args.rounds):
            for n in args.processes:
                for name in ("asgi", "fastapi", "service"):
                    if name == "service":
                        proc = start_server(port, ["--processes", str(n)])
                    else:
                        proc = start_floor(name, port, n)
                    try:
                        got = peak(port, proc.pid, body, args.seconds)
                    finally:
                        proc.terminate()
                        proc.wait(60)
                    runs.setdefault(f"{name}-{n}p", []).append({"round": r, **got})
                    cpu = got["cpu_ms_per_request"]
                    print(
                        f"round {r} {name} x{n}: {got['rps']:.0f} requests/s, CPU ms per request {cpu['all']:.3f} "
                        f"(event loops {cpu['event_loops']:.3f})",
                        flush=True,
                    )
    med = {k: statistics.median(x["rps"] for x in v) for k, v in runs.items()}
    cpu = {k: statistics.median(x["cpu_ms_per_request"]["all"] for x in v) for k, v in runs.items()}
    ratios = {
        f"{n}p": {
            "service_over_fastapi": round(med[f"service-{n}p"] / med[f"fastapi-{n}p"], 3),
            "service_over_asgi": round(med[f"service-{n}p"] / med[f"asgi-{n}p"], 3),
            "fastapi_over_asgi": round(med[f"fastapi-{n}p"] / med[f"asgi-{n}p"], 3),
        }
        for n in args.processes
    }
    write_report(
        "http-floor",
        {"seconds": args.seconds, "runs": runs, "median_rps": med, "median_cpu_ms_per_request": cpu, "ratios": ratios},
        "python -m bench.http_floor " + " ".join(sys.argv[1:]),
    )
    print(
        "http floor (requests/s, medians of "
        f"{args.rounds} rounds): "
        + "; ".join(
            f"{n} process(es) asgi {med[f'asgi-{n}p']:.0f}, fastapi {med[f'fastapi-{n}p']:.0f}, service "
            f"{med[f'service-{n}p']:.0f} = {ratios[f'{n}p']['service_over_fastapi']:.2f}x the framework's floor "
            f"(CPU ms per request {cpu[f'asgi-{n}p']:.3f} / {cpu[f'fastapi-{n}p']:.3f} / {cpu[f'service-{n}p']:.3f})"
            for n in args.processes
        )
    )


if __name__ == "__main__":
    main()
