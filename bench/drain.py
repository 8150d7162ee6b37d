"""SIGTERM under load, repeated: how often does a request get lost (reset mid-request, neither answered nor
refused at connect) while the server drains? A rare race needs many rounds and a loaded machine to show.

    python -m bench.drain --rounds 40 --busy 2                      # writes reports/bench/drain.json
    python -m bench.drain --rounds 40 --busy 2 --compare /tmp/old   # also another checkout's server, rounds alternate

Each round starts a server, sends 80 held-out digit PNGs 5 ms apart on their own connections (as
tests/load/test_load.py does), sends SIGTERM 0.25 s in, and counts the outcomes. `--busy K` runs K processes that
spin on the CPU throughout, so that the client and the server are starved as on a shared CI runner.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import sys
from pathlib import Path

import httpx

from bench.common import compare_suffix, compared_servers, free_port, start_server, write_report
from bench.serve import png_bytes


def _spin() -> None:
    while True:
        pass


async def one_round(url: str, proc, png: bytes, n: int = 80) -> dict[str, int]:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits, trust_env=False) as c:

        async def post(i: int) -> str:
            await asyncio.sleep(0.005 * i)
            try:
                r = await c.post("/v1/detect", content=png, headers={"content-type": "image/png"})
                return str(r.status_code)
            except httpx.ConnectError:
                return "refused"
            except httpx.HTTPError as e:
                return f"lost:{type(e).__name__}"

        async def terminate() -> None:
            await asyncio.sleep(0.25)
            proc.terminate()

        outcomes = (await asyncio.gather(terminate(), *(post(i) for i in range(n))))[1:]
    return {k: outcomes.count(k) for k in sorted(set(outcomes))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--busy", type=int, default=2, help="CPU-spinning processes alongside")
    ap.add_argument("--compare", type=Path, help="another checkout whose server runs the same rounds")
    args = ap.parse_args()
    png = png_bytes()
    servers = compared_servers(args.compare)
    tally = {str(s or "this checkout"): {"rounds": 0, "rounds_with_loss": 0, "outcomes": {}} for s in servers}
    spinners = [mp.get_context("spawn").Process(target=_spin, daemon=True) for _ in range(args.busy)]
    for p in spinners:
        p.start()
    try:
        for r in range(args.rounds):
            for service_dir in servers:
                port = free_port()
                proc = start_server(port, ["--drain-s", "20"], service_dir=service_dir)
                counts = asyncio.run(one_round(f"http://127.0.0.1:{port}", proc, png))
                exit_code = proc.wait(30)
                t = tally[str(service_dir or "this checkout")]
                t["rounds"] += 1
                t["rounds_with_loss"] += any(k.startswith("lost") for k in counts)
                for k, v in counts.items():
                    t["outcomes"][k] = t["outcomes"].get(k, 0) + v
                t.setdefault("exit_codes", []).append(exit_code)
                print(f"round {r} {service_dir or 'this checkout'}: {counts} exit {exit_code}", flush=True)
    finally:
        for p in spinners:
            p.terminate()
    for t in tally.values():
        t["exit_codes"] = sorted(set(t["exit_codes"]))
    cmd = f"python -m bench.drain --rounds {args.rounds} --busy {args.busy}" + (
        f" --compare {args.compare}" if args.compare else ""
    )
    write_report("drain" + compare_suffix(args.compare), {"rounds": args.rounds, "busy": args.busy, **tally}, cmd)
    for name, t in tally.items():
        lost = sum(v for k, v in t["outcomes"].items() if k.startswith("lost"))
        print(f"{name}: {t['rounds_with_loss']} of {t['rounds']} rounds lost requests ({lost} lost in all)")
    sys.exit(0 if tally["this checkout"]["rounds_with_loss"] == 0 else 1)  # a compared checkout may lose


if __name__ == "__main__":
    main()
