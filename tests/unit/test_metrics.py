"""observe_many against prometheus_client's own per-value observe: the same exposition, in one process and in
multiprocess mode (values in files, as with --processes N)."""

from __future__ import annotations

import math
import os
import subprocess
import sys

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from nccr_guard.server.metrics import SCORE, observe_many

# on a bucket bound, between bounds, below the first, above the last finite one, repeated, negative zero
VALUES = [-2.0, -2.5, 0.0, -0.0, 0.25, 0.5, 0.5, 1.0, 7.9, 8.0, 50.0, 51.0, 1e9, 3.3]


def exposition(values: list[float], many: bool) -> bytes:
    r = CollectorRegistry()
    h = Histogram("s", "scores", ["model"], buckets=SCORE, registry=r).labels("m")
    if many:
        observe_many(h, values)
    else:
        for v in values:
            h.observe(v)
    return without_created(generate_latest(r))


def without_created(text: bytes) -> bytes:
    """The exposition without its `_created` timestamps (when each histogram was made)."""
    return b"\n".join(line for line in text.splitlines() if b"_created" not in line)


def test_observe_many_exposes_what_per_value_observes_do():
    assert exposition(VALUES, many=True) == exposition(VALUES, many=False)
    assert b's_bucket{le="-2.0",model="m"} 2.0' in exposition(VALUES, many=True)  # -2.5 and -2 (on the bound)
    assert exposition([], many=True) == exposition([], many=False)


def test_observe_many_puts_nan_in_no_bucket_as_observe_does():
    got = exposition([1.0, math.nan], many=True)
    assert got == exposition([1.0, math.nan], many=False) and b's_count{model="m"} 1.0' in got


MULTIPROCESS = """
import sys
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from nccr_guard.server.metrics import SCORE, observe_many
values = [float(v) for v in sys.argv[2:]]
h = Histogram("s", "scores", ["model"], buckets=SCORE).labels("m")
if sys.argv[1] == "many":
    observe_many(h, values)
else:
    for v in values:
        h.observe(v)
r = CollectorRegistry()
MultiProcessCollector(r)
sys.stdout.buffer.write(generate_latest(r))
"""


def test_observe_many_in_multiprocess_mode(tmp_path):
    out = {}
    for how in ("many", "each"):
        d = tmp_path / how
        d.mkdir()
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(d)}
        cmd = [sys.executable, "-c", MULTIPROCESS, how, *map(str, VALUES)]
        out[how] = without_created(subprocess.run(cmd, env=env, capture_output=True, check=True).stdout)
    assert out["many"] == out["each"]
    assert b's_bucket{le="+Inf",model="m"} 14.0' in out["many"]


def test_verdict_metrics_count_as_three_updates_per_verdict_would():
    from types import SimpleNamespace

    from nccr_guard.server.metrics import Metrics, VerdictMetrics

    kinds = ("clean", "adversarial")
    parts = [[SimpleNamespace(verdict=kinds[i % 3 == 0], score=v, passes=4 + i % 2) for i, v in enumerate(VALUES)]]
    parts += [[SimpleNamespace(verdict="adversarial", score=2.5, passes=4)]]  # a single upload's part
    out = []
    for grouped in (True, False):
        m = Metrics()
        vm = VerdictMetrics.of(m, "mnist", kinds)
        for part in parts:
            if grouped:
                vm.count(part)
            else:
                for v in part:
                    vm.counts[v.verdict].inc()
                    vm.scores.observe(v.score)
                    vm.passes.observe(v.passes)
        out.append(without_created(generate_latest(m.registry)))
    assert out[0] == out[1]
    assert b'nccr_guard_verdicts_total{model="mnist",verdict="adversarial"} 6.0' in out[0]
