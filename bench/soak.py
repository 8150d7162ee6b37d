"""Soak: mixed image and audio traffic against one real server on 127.0.0.1 for a fixed time; the server's RSS is
sampled throughout. Pass: no error responses, RSS growth after warm-up below 5 %.

    python -m bench.soak --minutes 10          # writes reports/bench/soak.json, prints one summary line
    python -m bench.soak --serve-args "--processes 2"   # the same for another server configuration:
                                                        # reports/bench/soak-processes-2.json
    python -m bench.soak --serve-args "--processes 2" --cpu-quota 2 --memory-limit-mb 2048
        # the same under a pod's limits (root): reports/bench/soak-processes-2-cpu-quota-2-memory-limit-mb-2048.json

RSS is that of the server process and its descendants together (a `--processes N` server's supervisor and
workers). With --cpu-quota / --memory-limit-mb the server runs in a fresh cgroup with those limits, seen as a
container sees its own (bench/cgroup.py), and the report adds the memory that cgroup counts, which is what a
container's memory limit compares (RSS plus the page cache and kernel memory the server caused), its peak and
the kills the limit made; a kill fails the soak. A file page is charged to the cgroup that first reads it, so
libraries and models already in the page cache are not charged to the server's: --drop-caches (root) empties
the page cache before the server starts, so the cgroup pays for every file page the server reads, as a
container on a cold node does.

Traffic: a closed loop of `--clients` clients, each alternating held-out digit PNGs and synthesised speech WAVs
(the speaker corpus' test split), so both models, both decoders and the batcher see steady mixed load.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from bench.cgroup import Limits
from bench.common import ROOT, free_port, start_server, tree_rss_mb, write_report

LIMITS = ("cpu_quota", "memory_limit_mb")


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


async def traffic(
    url: str, items: list, seconds: float, clients: int, pid: int, samples: list, cg: Limits | None
) -> dict:
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
                sample = (round(time.monotonic() - t0, 1), round(tree_rss_mb(pid), 1))
                samples.append((*sample, cg.memory()["mb"]) if cg else sample)
                await asyncio.sleep(5)

        await asyncio.gather(sampler(), *(client(k) for k in range(clients)))
    return {"codes": codes, "per_type": per_type}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--warmup-s", type=float, default=60.0, help="RSS growth is measured from the end of warm-up")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--serve-args", default="", help="flags for nccr-guard serve, e.g. '--processes 2'")
    ap.add_argument("--cpu-quota", type=float, help="CPUs of cgroup quota for the server, as a container (root)")
    ap.add_argument("--memory-limit-mb", type=int, help="cgroup memory limit for the server, as a container (root)")
    ap.add_argument(
        "--drop-caches", action="store_true", help="empty the page cache before the server starts (root; see above)"
    )
    args = ap.parse_args()
    port = free_port()
    items = bodies()
    limited = args.cpu_quota is not None or args.memory_limit_mb is not None
    samples: list[tuple[float, ...]] = []
    with contextlib.ExitStack() as stack:
        cg = stack.enter_context(Limits(args.cpu_quota, args.memory_limit_mb)) if limited else None
        log = ROOT / "reports" / "bench" / "soak-server.log"
        if args.drop_caches:
            Path("/proc/sys/vm/drop_caches").write_text("3")
        proc = start_server(port, args.serve_args.split(), log, prefix=cg.prefix() if cg else ())
        try:
            counts = asyncio.run(
                traffic(f"http://127.0.0.1:{port}", items, args.minutes * 60, args.clients, proc.pid, samples, cg)
            )
        finally:
            proc.terminate()
            proc.wait(30)
        cgroup = cg and {
            "cpu_quota": args.cpu_quota,
            "memory_limit_mb": args.memory_limit_mb,
            **({"throttled": cg.throttled()} if args.cpu_quota else {}),
            **({"memory": cg.memory()} if args.memory_limit_mb else {}),
        }
    log.unlink(missing_ok=True)
    codes = counts["codes"]
    after = [s for s in samples if s[0] >= args.warmup_s] or samples
    warm = [s[1] for s in after]
    if cgroup and "memory" in cgroup:  # the cgroup's count after warm-up and at the last sample under load
        cgroup["memory"] |= {"mb_after_warmup": after[0][2], "mb_last_sample": after[-1][2]}
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
        "rss_mb_max": max(s[1] for s in samples),
        "rss_growth_after_warmup": round(growth, 4),
        "rss_samples": samples,  # (s, RSS MB[, cgroup memory MB])
        "cgroup": cgroup,
        "page_cache_dropped": args.drop_caches,
        "pass": errors == 0 and growth < 0.05 and not (cgroup and cgroup.get("memory", {}).get("oom_kills")),
    }
    cmd = f"python -m bench.soak --minutes {args.minutes:g} --clients {args.clients} --warmup-s {args.warmup_s:g}"
    limits = [f"--{k.replace('_', '-')} {v:g}" for k, v in vars(args).items() if k in LIMITS and v is not None]
    if args.serve_args:
        cmd += f" --serve-args '{args.serve_args}'"
    cmd += "".join(" " + a for a in limits) + (" --drop-caches" if args.drop_caches else "")
    result["serve_args"] = args.serve_args
    name = "soak" + "".join("-" + a.strip("-").replace(" ", "-") for a in [*args.serve_args.split(), *limits])
    write_report(name, result, cmd)
    seen = ""
    if cgroup and "memory" in cgroup:
        m = cgroup["memory"]
        seen = f", cgroup memory peak {m['peak_mb']:.0f} of {args.memory_limit_mb} MB, {m['oom_kills']} OOM kills"
    print(
        f"soak: {total} requests ({counts['per_type']}) in {args.minutes:g} min, {errors} errors, "
        f"RSS {warm[0]:.0f} -> {warm[-1]:.0f} MB "
        f"({100 * growth:+.1f} % after warm-up){seen}, {'PASS' if result['pass'] else 'FAIL'}"
    )
    sys.exit(0 if result["pass"] else 1)


if __name__ == "__main__":
    main()
