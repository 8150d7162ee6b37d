"""Server settings or versions against throughput and latency, servers run alternately: the CPU batch size
(rows per forward), server processes, other serve flags, and with --compare the server code of another checkout.

    python -m bench.batch_size [--rows 8 32] [--processes 1] [--flags= --flags=--no-gc-freeze] [--rounds 2]
                               [--seconds 5] [--compare OTHER_CHECKOUT] [--cpu-quota CPUS]

For each round, each `--max-batch`, `--processes` and `--flags` value (and each checkout) a fresh
`nccr-guard serve --models models/mnist`:
/v1/detect/batch throughput with 32 PNGs per request (wrk, 4 and 8 connections: 8 x 32 fill the default
queue), KServe v2 throughput with 32 raw FP32 tensors per request (2 and 4 connections), single-image
throughput (wrk, 16 connections) with the server's CPU per request (all processes and threads, and event loops
alone: steadier than requests/s on a shared machine), all counted in verdicts the server gave, and latency
at 150 and 250 requests/s offered (wrk with Poisson think times; with the slowest request, and the server's
full garbage collections over the whole run where it exports them).
Alternating the servers lets the shared machine's drift hit every setting alike. With --cpu-quota each server
runs in a fresh cgroup allowing that many CPUs, which it sees as a container sees its own (bench/cgroup.py;
root only), and the report adds the batch workers the server chose, the time the quota held it back and the
p99 latency at saturation. Writes reports/bench/batch-size.json (batch-size-processes.json when more than one
process is asked for, batch-size-flags-<the flags>.json with --flags, e.g. -flags-no-fuse; -cpu-quota-<cpus>
with --cpu-quota; -compare-<commit> added with --compare).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import tempfile
from pathlib import Path

import httpx

from bench.cgroup import Limits
from bench.common import compare_suffix, compared_servers, cpu_ms_per_request, start_server, tree_cpu_s, write_report
from bench.serve import (
    BATCH_IMAGES,
    BOUNDARY,
    MODEL,
    binary_tensors,
    histogram_totals,
    multipart,
    paced,
    png_bytes,
    pngs,
    wrk,
)


def full_collections(port: int) -> dict | None:
    """Count and total seconds of the server's generation-2 garbage collections, if it exports them."""
    got = histogram_totals(port, "nccr_guard_gc_pause_seconds", 'generation="2"')
    return {"count": got[1], "seconds": got[0]} if got else None


def one_server(
    rows: int, processes: int, extra: str, seconds: float, tmp: Path, service_dir: Path | None, quota: float | None
) -> dict:
    port = 18900 + os.getpid() % 100
    flags = ["--models", str(MODEL), "--max-batch", str(rows), "--processes", str(processes), *extra.split()]
    with contextlib.ExitStack() as stack:
        cg = stack.enter_context(Limits(cpus=quota)) if quota else None
        proc = start_server(port, flags, service_dir=service_dir, prefix=cg.prefix() if cg else ())
        try:
            out = measure(port, proc.pid, cg, tmp, seconds)
        finally:
            proc.terminate()
            proc.wait(30)
    server = str(service_dir.parent) if service_dir else "this checkout"
    out = {"rows": rows, "processes": processes, "flags": extra, "server": server, "cpu_quota": quota, **out}
    lat = ", ".join(
        f"{p['offered_rps']:.0f}/s p50 {p['p50_ms']:.1f} p99 {p['p99_ms']:.1f} max {p['max_ms']:.0f} ms"
        for p in out["latency"]
    )
    if gc2 := out["full_collections"]:
        lat += f"; {gc2['count']:.0f} full collections, {1e3 * gc2['seconds']:.0f} ms in all"
    if cg:
        lat += (
            f"; quota {quota:g} CPUs: {out['batch_workers']} batch worker(s), held back "
            f"{out['throttled']['seconds']:.1f} s in {out['throttled']['periods']:.0f} periods, p99 at saturation "
            f"{out['tensor_p99_ms'][4]:.1f} ms (raw tensors), {out['batch_p99_ms'][4]:.1f} ms (batches)"
        )
    print(
        f"{server}, max-batch {rows:>4} rows, {processes} process(es) {extra}: "
        f"batch requests {max(out['batch_images_per_s'].values()):,.0f} images/s, "
        f"raw tensors {max(out['tensor_inputs_per_s'].values()):,.0f} inputs/s, "
        f"single {out['single_rps_c16']:.0f} req/s ({out['single_cpu_ms']['all']:.3f} CPU ms each, event loops "
        f"{out['single_cpu_ms']['event_loops']:.3f}), {lat}",
        flush=True,
    )
    return out


def measure(port: int, pid: int, cg: Limits | None, tmp: Path, seconds: float) -> dict:
    """One server's loads: single PNGs (with its CPU per request), 32-PNG batches, 32 raw tensors, then paced
    single PNGs; under a quota also what the quota did from the warm-up's end to the last load."""
    url = f"http://127.0.0.1:{port}/v1/detect"
    single, batch, tensors = tmp / "digit.png", tmp / "digits.multipart", tmp / "digits.v2"
    single.write_bytes(png_bytes())
    batch.write_bytes(multipart(pngs(BATCH_IMAGES)))
    raw, hdrs = binary_tensors(BATCH_IMAGES)
    tensors.write_bytes(raw)
    v2 = f"http://127.0.0.1:{port}/v2/models/mnist/infer"
    ctype = f"multipart/form-data; boundary={BOUNDARY}"
    paced(url, single, 100, 2)  # warm
    held = cg.throttled() if cg else {}
    cpu_before = tree_cpu_s(pid)
    single_rps = wrk(url, single, 16, seconds)["verdicts_per_s"]
    single_cpu_ms = cpu_ms_per_request(pid, cpu_before, single_rps * int(seconds))
    batches = {c: wrk(url + "/batch", batch, c, seconds, ctype) for c in (4, 8)}
    raws = {c: wrk(v2, tensors, c, seconds, "application/octet-stream", hdrs) for c in (2, 4)}
    out = {
        "batch_images_per_s": {c: r["verdicts_per_s"] for c, r in batches.items()},
        "tensor_inputs_per_s": {c: r["verdicts_per_s"] for c, r in raws.items()},
        "single_rps_c16": single_rps,
        # the server's CPU per single-image request at saturation: all threads and processes, event loops only
        "single_cpu_ms": single_cpu_ms,
        "latency": [paced(url, single, r, seconds) for r in (150, 250)],
        "full_collections": full_collections(port),
    }
    if cg:
        after = cg.throttled()
        card = httpx.get(f"http://127.0.0.1:{port}/v1/models/mnist", trust_env=False).json()
        out |= {
            "batch_workers": card["calibration"]["batching"]["workers"],
            "throttled": {k: round(after[k] - held[k], 3) for k in after},
            "batch_p99_ms": {c: r["p99_ms"] for c, r in batches.items()},
            "tensor_p99_ms": {c: r["p99_ms"] for c, r in raws.items()},
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--processes", type=int, nargs="+", default=[1])
    ap.add_argument(
        "--flags",
        action="append",
        help="extra serve flags, one alternative per use: --flags= --flags=--no-gc-freeze (default: none)",
    )
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--compare", type=Path, help="another checkout whose server code runs alongside this one's")
    ap.add_argument(
        "--cpu-quota", type=float, help="run each server under this many CPUs of cgroup quota, as a container (root)"
    )
    args = ap.parse_args()
    args.flags = args.flags or [""]
    dirs = compared_servers(args.compare)
    with tempfile.TemporaryDirectory() as tmp:
        runs = [
            one_server(r, p, f, args.seconds, Path(tmp), d, args.cpu_quota)
            for i in range(args.rounds)
            for r in args.rows
            for p in args.processes
            for f in args.flags
            for d in (dirs if i % 2 == 0 else dirs[::-1])  # neither checkout always runs first
        ]
    summary = {}
    for key in dict.fromkeys((x["server"], x["rows"], x["processes"], x["flags"]) for x in runs):
        mine = [x for x in runs if (x["server"], x["rows"], x["processes"], x["flags"]) == key]
        summary[f"{key[0]}, {key[1]} rows, {key[2]} process(es) {key[3]}".rstrip()] = {
            "batch_images_per_s": [max(x["batch_images_per_s"].values()) for x in mine],
            "tensor_inputs_per_s": [max(x["tensor_inputs_per_s"].values()) for x in mine],
            "single_rps_c16": [x["single_rps_c16"] for x in mine],
            "single_cpu_ms": [x["single_cpu_ms"] for x in mine],
            "p50_ms_at_250": [x["latency"][1]["p50_ms"] for x in mine],
            "p99_ms_at_250": [x["latency"][1]["p99_ms"] for x in mine],
            "max_ms_at_250": [x["latency"][1]["max_ms"] for x in mine],
            "full_collections": [x["full_collections"] for x in mine],
        }
        if args.cpu_quota:
            summary[next(reversed(summary))] |= {
                k: [x[k] for x in mine] for k in ("batch_workers", "throttled", "batch_p99_ms", "tensor_p99_ms")
            }
    # the flags compared in the name, so that comparing other flags does not overwrite a kept report
    named = "-".join(re.sub(r"[^a-z0-9]+", "-", f.lower()).strip("-") for f in args.flags if f.strip())
    name = "batch-size" + ("-processes" if args.processes != [1] else "") + (f"-flags-{named}" if named else "")
    name += f"-cpu-quota-{args.cpu_quota:g}" if args.cpu_quota else ""
    name += compare_suffix(args.compare)
    write_report(name, {"runs": runs, "summary": summary}, "python -m bench.batch_size " + " ".join(sys.argv[1:]))

    def loops(s: dict) -> list[float]:
        return [v["event_loops"] for v in s["single_cpu_ms"]]

    print(
        "batch-size: "
        + "; ".join(
            f"{r}: batch requests {'/'.join(f'{v:,.0f}' for v in s['batch_images_per_s'])} images/s, "
            f"raw tensors {'/'.join(f'{v:,.0f}' for v in s['tensor_inputs_per_s'])} inputs/s, "
            f"single {'/'.join(f'{v:.0f}' for v in s['single_rps_c16'])} req/s "
            f"(event loops {'/'.join(f'{v:.3f}' for v in loops(s))} CPU ms each), "
            f"p50 at 250/s {'/'.join(f'{v:.1f}' for v in s['p50_ms_at_250'])} ms, "
            f"max {'/'.join(f'{v:.0f}' for v in s['max_ms_at_250'])} ms"
            for r, s in summary.items()
        )
    )


if __name__ == "__main__":
    main()
