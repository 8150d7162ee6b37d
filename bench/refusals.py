"""What a refusal costs the server: answers per second and server CPU per answer while the model's queue is
full, for uploads of each kind, this checkout's server against another checkout's (alternately).

    python -m bench.refusals [--seconds 5] [--rounds 2] [--compare OTHER_CHECKOUT]

A fresh `nccr-guard serve` per round and server, serving the test suite's faulty MNIST model (tests/faulty.py:
a digit with a bright top-right pixel stalls its forward 3 s) with one input per forward and `--max-queue 1`.
Six holder clients keep stalled digits in every batch worker and the queue place; wrk then sends clean
digits back to back (16 connections): one PNG per request as a raw body and as multipart, and 32 PNGs per
/v1/detect/batch request. Nearly every answer is a refusal (a 503, or for batch requests of older servers a
200 holding 32 per-item 503s), so answers/s and the server's CPU ms per answer (utime + stime
from /proc) measure what refusing costs the event loop, which an overloaded server shares with its admitted
work. Writes reports/bench/refusals.json (-compare-<commit> added with --compare).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import threading
from pathlib import Path

import httpx

from bench.common import ROOT, compare_suffix, compared_servers, start_server, write_report
from bench.serve import BATCH_IMAGES, BOUNDARY, MODEL, multipart, png_bytes, pngs, run_wrk
from tests.faulty import faulty_folder, marked

HOLDERS = 6


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def hold(url: str, stall: bytes, stop: threading.Event) -> None:
    """Keep stalled uploads in every worker and the queue until `stop`: each holder resends at once when
    answered, 50 ms after a refusal."""

    async def holder(c: httpx.AsyncClient) -> None:
        while not stop.is_set():
            r = await c.post("/v1/detect", content=stall, headers={"content-type": "image/png"})
            if r.status_code == 503:
                await asyncio.sleep(0.05)

    async def main() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            await asyncio.gather(*(holder(c) for _ in range(HOLDERS)))

    asyncio.run(main())


def one_server(folder: Path, seconds: float, tmp: Path, service_dir: Path | None) -> dict:
    port = 18800 + os.getpid() % 100
    flags = ["--models", str(folder), "--max-batch", "4", "--max-queue", "1", "--request-timeout-s", "60"]
    proc = start_server(port, flags, service_dir=service_dir)
    url = f"http://127.0.0.1:{port}"
    stop = threading.Event()
    holders = threading.Thread(target=hold, args=(url, marked(png_bytes(), (0, -1)), stop))
    try:
        holders.start()
        single, batch, raw = tmp / "single.multipart", tmp / "batch.multipart", tmp / "digit.png"
        single.write_bytes(multipart(pngs(1)))
        batch.write_bytes(multipart(pngs(BATCH_IMAGES)))
        raw.write_bytes(png_bytes())
        ctype = f"multipart/form-data; boundary={BOUNDARY}"
        kinds = {
            "raw PNG": ("/v1/detect", raw, "image/png"),
            "multipart PNG": ("/v1/detect", single, ctype),
            f"multipart {BATCH_IMAGES} PNGs": ("/v1/detect/batch", batch, ctype),
        }
        out = {"server": str(service_dir.parent) if service_dir else "this checkout", "kinds": {}}
        for name, (path, body, kind) in kinds.items():
            cpu = cpu_s(proc.pid)
            r = run_wrk(url + path, body, 16, seconds, kind)
            answers = r["rps"] * int(seconds)
            out["kinds"][name] = {
                "answers_per_s": r["rps"],
                "non_2xx": r["non_2xx"],
                "server_cpu_ms_per_answer": 1e3 * (cpu_s(proc.pid) - cpu) / max(answers, 1),
                "p50_ms": r["p50_ms"],
            }
    finally:
        stop.set()
        proc.terminate()
        proc.wait(30)
        holders.join(70)
    print(
        f"{out['server']}: "
        + "; ".join(
            f"{k} {v['answers_per_s']:,.0f} answers/s, {v['server_cpu_ms_per_answer']:.3f} CPU ms each"
            for k, v in out["kinds"].items()
        ),
        flush=True,
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--compare", type=Path, help="another checkout whose server code runs alongside this one's")
    args = ap.parse_args()
    # The faulty model's module lives in tests/: the servers import it from this checkout.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    dirs = compared_servers(args.compare)
    with tempfile.TemporaryDirectory() as tmp:
        folder = faulty_folder(Path(tmp), MODEL)
        runs = [one_server(folder, args.seconds, Path(tmp), d) for _ in range(args.rounds) for d in dirs]
    summary = {
        server: {
            kind: {
                "answers_per_s": [x["kinds"][kind]["answers_per_s"] for x in runs if x["server"] == server],
                "server_cpu_ms_per_answer": [
                    round(x["kinds"][kind]["server_cpu_ms_per_answer"], 4) for x in runs if x["server"] == server
                ],
            }
            for kind in runs[0]["kinds"]
        }
        for server in dict.fromkeys(x["server"] for x in runs)
    }
    name = "refusals" + compare_suffix(args.compare)
    write_report(name, {"runs": runs, "summary": summary}, "python -m bench.refusals " + " ".join(sys.argv[1:]))
    print(
        "refusals: "
        + "; ".join(
            f"{server}: "
            + ", ".join(
                f"{k} {'/'.join(f'{v:,.0f}' for v in s['answers_per_s'])} answers/s "
                f"({'/'.join(f'{v:.3f}' for v in s['server_cpu_ms_per_answer'])} CPU ms)"
                for k, s in kinds.items()
            )
            for server, kinds in summary.items()
        )
    )


if __name__ == "__main__":
    main()
