"""The supervisor's shared counters as a worker reads them (workers.StartGate)."""

from __future__ import annotations

import pytest

from nccr_guard.server.workers import StartGate


@pytest.mark.parametrize(
    ("mine", "others", "over"),
    [
        ((2,), (0,), True),  # two connections hashed to one of two workers
        ((1,), (1,), False),
        ((2,), (1,), False),  # three over two workers cannot be more even
        ((3,), (0,), True),
        ((36,), (28,), True),
        ((33,), (31,), True),  # 33 > ceil(64 / 2)
        ((32,), (32,), False),
        ((1,), (0, 0), False),  # one connection over three workers: someone has to hold it
        ((2,), (0, 1), True),
        ((0,), (5,), False),
    ],
)
def test_a_worker_is_over_its_share_only_above_the_rounded_up_mean(mine, others, over):
    conns = [*mine, *others]
    gate = StartGate(started=None, workers=len(conns), beats=[0.0] * len(conns), slot=0, conns=[0] * len(conns))
    gate.conns[1:] = list(others)
    gate.beat(mine[0])  # publishes this worker's count, as every heartbeat does
    assert gate.conns == conns
    assert gate.over_share(mine[0]) is over


def test_a_multiprocess_metrics_directory_is_created_and_cleared_of_value_files_only(tmp_path):
    from nccr_guard.server.metrics import clear_stale_metrics

    d = tmp_path / "not" / "there"
    assert clear_stale_metrics(d) == 0 and d.is_dir()  # prometheus_client cannot start in a missing directory
    for name in ("counter_123.db", "gauge_livesum_123.db", "notes.txt"):
        (d / name).write_text("x")
    assert clear_stale_metrics(d) == 2
    assert [p.name for p in d.iterdir()] == ["notes.txt"]
