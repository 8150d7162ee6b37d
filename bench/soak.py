"""Soak: mixed image and audio traffic against one real server on 127.0.0.1 for a fixed time; the server's RSS is
sampled throughout. Pass: no error responses, RSS growth after warm-up below 5 %.

    python -m bench.soak --minutes 10          # writes reports/bench/soak.json, prints one summary line
    python -m bench.soak --serve-args "--processes 2"   # the same for another server configuration:
                                                        # reports/bench/soak-processes-2.json

RSS is that of the server process and its descendants together (a `--processes N` server's supervisor and
workers: what a container's memory limit sees).

Traffic: a closed loop of `--clients` clients, each alternating held-out digit PNGs and synthesised speech WAVs
(the speaker corpus' test split), so both models, both decoders and the batcher see steady mixed load.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import sys
import time

import httpx
import numpy as np

from bench.common import ROOT, free_port, start_server, tree_rss_mb, write_report


def bodies() -> list[tuple[bytes, str]]:
    from PIL import Image

    from nccr_guard.datasets import load_split
    from nccr_guard.manifest import load_manifest
    from nccr_guard.speaker_corpus import corpus_files

    xs, _ = load_split(load_manifest(ROOT / "models" / "mnist"), "test")
    pngs = []
    for x in xs[::25]:
        buf = io.BytesIO()
        Image.fromarray((x[0] * 255).round().astype(np.uint8)).save(buf, format="PNG")
        pngs.append((buf.getvalue(), "image/png"))
    speaker = load_manifest(ROOT / "models" / "speaker")
    files, _ = corpus_files(speaker.split, "test", limit=20)
    wavs = [(f.read_bytes(), "audio/wav") for f in files]
    return [item for pair in zip(pngs, wavs, strict=False) for item in pair]


async def traffic(url: str, items: list, seconds: float, clients: int, pid: int, samples: list) -> dict:
    codes: dict[str, int] = {}
    per_type: dict[str, int] = {}
    stop = time.monotonic() + seconds
    async with httpx.AsyncClient(base_url=url, timeout=60, trust_env=False) as c:

        async def client(k: int) -> None:
            i = k
            while time.monotonic() < stop:
                body, ctype = items[i % len(items)]
                i += 1  # every client alternates image and audio
                try:
                    r = await c.post("/v1/detect", content=body, headers={"content-type": ctype})
                    key = str(r.status_code)
                except httpx.HTTPError as e:
                    key = type(e).__name__
                codes[key] = codes.get(key, 0) + 1
                per_type[ctype] = per_type.get(ctype, 0) + 1

        async def sampler() -> None:
            t0 = time.monotonic()
            while time.monotonic() < stop:
                samples.append((round(time.monotonic() - t0, 1), round(tree_rss_mb(pid), 1)))
                await asyncio.sleep(5)

        await asyncio.gather(sampler(), *(client(k) for k in range(clients)))
    return {"codes": codes, "per_type": per_type}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--warmup-s", type=float, default=60.0, help="RSS growth is measured from the end of warm-up")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--serve-args", default="", help="flags for nccr-guard serve, e.g. '--processes 2'")
    args = ap.parse_args()
    port = free_port()
    items = bodies()
    proc = start_server(port, args.serve_args.split(), ROOT / "reports" / "bench" / "soak-server.log")
    samples: list[tuple[float, float]] = []
    try:
        counts = asyncio.run(
            traffic(f"http://127.0.0.1:{port}", items, args.minutes * 60, args.clients, proc.pid, samples)
        )
    finally:
        proc.terminate()
        proc.wait(30)
    (ROOT / "reports" / "bench" / "soak-server.log").unlink(missing_ok=True)
    codes = counts["codes"]
    warm = [r for t, r in samples if t >= args.warmup_s] or [r for _, r in samples]
    growth = (warm[-1] - warm[0]) / warm[0]
    total = sum(codes.values())
    errors = total - codes.get("200", 0)
    result = {
        "minutes": args.minutes,
        "clients": args.clients,
        "requests": total,
        "responses": codes,
        "requests_by_type": counts["per_type"],
        "errors": errors,
        "rss_mb_after_warmup": warm[0],
        "rss_mb_end": warm[-1],
        "rss_mb_max": max(r for _, r in samples),
        "rss_growth_after_warmup": round(growth, 4),
        "rss_samples": samples,
        "pass": errors == 0 and growth < 0.05,
    }
    cmd = f"python -m bench.soak --minutes {args.minutes:g} --clients {args.clients} --warmup-s {args.warmup_s:g}"
    if args.serve_args:
        cmd += f" --serve-args '{args.serve_args}'"
    result["serve_args"] = args.serve_args
    write_report("soak" + "".join("-" + a.strip("-") for a in args.serve_args.split()), result, cmd)
    print(
        f"soak: {total} requests ({counts['per_type']}) in {args.minutes:g} min, {errors} errors, "
        f"RSS {warm[0]:.0f} -> {warm[-1]:.0f} MB "
        f"({100 * growth:+.1f} % after warm-up), {'PASS' if result['pass'] else 'FAIL'}"
    )
    sys.exit(0 if result["pass"] else 1)


if __name__ == "__main__":
    main()
