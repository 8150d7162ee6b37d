"""The garbage-collection pause metric times real collections, and only while installed."""

from __future__ import annotations

import gc

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
