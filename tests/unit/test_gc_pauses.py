"""The garbage-collection pause metric times real collections, and only while installed."""

from __future__ import annotations

import gc
import os
import subprocess
import sys

from prometheus_client.parser import text_string_to_metric_families

from nccr_guard.server.metrics import GcPauses, Metrics


def pauses(m: Metrics, generation: str) -> tuple[float, float]:
    text = m.exposition().decode()
    got = {
        x.name: x.value
        for f in text_string_to_metric_families(text)
        for x in f.samples
        if x.name.startswith("nccr_guard_gc_pause_seconds_") and x.labels.get("generation") == generation
    }
    return got["nccr_guard_gc_pause_seconds_count"], got["nccr_guard_gc_pause_seconds_sum"]


def test_full_collections_are_timed_while_installed():
    m = Metrics()
    with GcPauses(m.gc_pause):
        gc.collect()
        gc.collect()
    count, total = pauses(m, "2")
    assert count == 2 and total > 0
    gc.collect()  # no longer installed
    assert pauses(m, "2") == (count, total)


SCRIPT = """
import gc
from nccr_guard.server.metrics import GcPauses, Metrics
m = Metrics()
pauses = GcPauses(m.gc_pause)
gc.collect()
gc.freeze()
with pauses:
    gc.set_threshold(10, 1000000, 1000000)  # a collection every few allocations, some inside a metric's lock
    for i in range(2000):
        m.requests.labels("mnist", "/v1/detect", "200").inc()
        m.duration.labels("/v1/detect").observe(0.003)
        pauses.flush()
print("done")
"""


def test_no_deadlock_when_a_collection_starts_inside_a_metric_update(tmp_path):
    """Multiprocess mode (what --processes N uses) guards every metric of a process with one lock. A collection
    can start while that lock is held; when the callback observed the pause itself it waited on the lock forever
    (a worker hung in CI). The callback now only records; `flush` observes outside any collection."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.strip() == "done", r.stderr[-2000:]
