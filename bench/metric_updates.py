"""What a part's verdict metrics cost the event loop: three updates per verdict against `VerdictMetrics.count`.

    python -m bench.metric_updates [--verdicts 1 8] [--calls 20000]   ->  reports/bench/metric-updates.json

Every verdict a request gets counts in `nccr_guard_verdicts_total` and is observed in `nccr_guard_score` and
`nccr_guard_verdict_passes` (ModelRuntime.detect_part), on the event loop. A part of a KServe v2 or batch request
holds up to 8 MNIST verdicts (32 rows), a single upload's one. Timed here in microseconds per part, both ways, on
the metrics the server builds (server/metrics.py), in one process and in prometheus_client's multiprocess mode
(each value in a file, as `--processes N` runs), each in its own subprocess since prometheus_client picks its
value class at import. Scores are seeded (seed 0) draws over the score buckets' range; passes are the fixed-K
rows (4); verdicts one in four adversarial.
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
from types import SimpleNamespace
from nccr_guard.server.metrics import Metrics, VerdictMetrics
n, calls = int(sys.argv[1]), int(sys.argv[2])
vm = VerdictMetrics.of(Metrics(), "mnist", ("clean", "adversarial"))
rng = random.Random(0)
kinds = ("clean", "clean", "clean", "adversarial")
part = [SimpleNamespace(score=rng.uniform(-2, 6), passes=4, verdict=rng.choice(kinds)) for _ in range(n)]

def each():
    for v in part:
        vm.counts[v.verdict].inc()
        vm.scores.observe(v.score)
        vm.passes.observe(v.passes)

def many():
    vm.count(part)

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
    ap.add_argument("--verdicts", type=int, nargs="+", default=[1, 8], help="verdicts per part")
    ap.add_argument("--calls", type=int, default=20000)
    args = ap.parse_args()
    results = [
        {"verdicts_per_part": n, "mode": mode, **timed(n, args.calls, mode == "multiprocess")}
        for n in args.verdicts
        for mode in ("one_process", "multiprocess")
    ]
    write_report(
        "metric-updates", {"seed": 0, "results": results}, "python -m bench.metric_updates " + " ".join(sys.argv[1:])
    )
    print(
        "verdict metrics per part, per-verdict updates -> VerdictMetrics.count: "
        + "; ".join(
            f"{r['verdicts_per_part']} verdict(s), {r['mode']} {r['each_us']} -> {r['many_us']} us" for r in results
        )
    )


if __name__ == "__main__":
    main()
