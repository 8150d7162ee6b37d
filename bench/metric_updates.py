"""What a part's verdict metrics cost the event loop: per-verdict updates against `observe_many`.

    python -m bench.metric_updates [--verdicts 8] [--calls 20000]   ->  reports/bench/metric-updates.json

Every verdict a request gets counts in `nccr_guard_verdicts_total` and is observed in `nccr_guard_score` and
`nccr_guard_verdict_passes` (ModelRuntime.detect_part), on the event loop. A part of a KServe v2 or batch request
holds up to 8 MNIST verdicts (32 rows). Timed here in microseconds per part, both ways, on the metrics the server
builds (server/metrics.py), in one process and in prometheus_client's multiprocess mode (each value in a file,
as `--processes N` runs), each in its own subprocess since prometheus_client picks its value class at import.
Scores are seeded (seed 0) draws over the score buckets' range; passes are the fixed-K rows (4).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from bench.common import write_report

TIMING = """
import json, random, sys, time
from collections import Counter
from nccr_guard.server.metrics import Metrics, observe_many
n, calls = int(sys.argv[1]), int(sys.argv[2])
m = Metrics()
scores, passes = m.scores.labels("mnist"), m.passes.labels("mnist")
verdicts = {k: m.verdicts.labels("mnist", k) for k in ("clean", "adversarial")}
rng = random.Random(0)
part = [(rng.uniform(-2, 6), 4, rng.choice(("clean", "clean", "clean", "adversarial"))) for _ in range(n)]

def each():
    for s, p, v in part:
        verdicts[v].inc()
        scores.observe(s)
        passes.observe(p)

def many():
    for v, k in Counter(v for _, _, v in part).items():
        verdicts[v].inc(k)
    observe_many(scores, [s for s, _, _ in part])
    observe_many(passes, [p for _, p, _ in part])

out = {}
for _ in range(3):  # alternated rounds, the best of each counts
    for name, fn in (("each", each), ("many", many)):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        us = (time.perf_counter() - t) / calls * 1e6
        out[name] = min(out.get(name, us), us)
print(json.dumps(out))
"""


def timed(verdicts: int, calls: int, multiprocess: bool) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as d:
        env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
        if multiprocess:
            env["PROMETHEUS_MULTIPROC_DIR"] = d
        cmd = [sys.executable, "-c", TIMING, str(verdicts), str(calls)]
        got = json.loads(subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout)
    return {
        "each_us": round(got["each"], 2),
        "many_us": round(got["many"], 2),
        "ratio": round(got["many"] / got["each"], 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--verdicts", type=int, default=8, help="verdicts per part")
    ap.add_argument("--calls", type=int, default=20000)
    args = ap.parse_args()
    results = {
        mode: timed(args.verdicts, args.calls, mode == "multiprocess") for mode in ("one_process", "multiprocess")
    }
    write_report(
        "metric-updates",
        {"verdicts_per_part": args.verdicts, "seed": 0, "results": results},
        "python -m bench.metric_updates " + " ".join(sys.argv[1:]),
    )
    print(
        "metric updates per part of "
        f"{args.verdicts}: "
        + "; ".join(f"{k} {r['each_us']} -> {r['many_us']} us ({r['ratio']}x)" for k, r in results.items())
    )


if __name__ == "__main__":
    main()
