"""CPUs a server process may use (server/runtime.usable_cpus): the CPUs it may run on, or --cpus where a container's
CPU quota (which the affinity mask does not show) caps the batch workers."""

from __future__ import annotations

import os

import pytest

from nccr_guard.config import Settings
from nccr_guard.server import runtime
from nccr_guard.server.runtime import batch_policy, usable_cpus


def test_the_cpus_the_process_may_run_on_unless_configured():
    assert usable_cpus() == len(os.sched_getaffinity(0))
    assert usable_cpus(3) == 3


def test_python_3_13s_process_cpu_count_where_there_is_one(monkeypatch):
    monkeypatch.setattr(runtime.os, "process_cpu_count", lambda: 5, raising=False)
    assert usable_cpus() == 5
    monkeypatch.setattr(runtime.os, "process_cpu_count", lambda: None)  # undeterminable: one
    assert usable_cpus() == 1


@pytest.mark.parametrize("cpus", [0, 1, 2, 8])
def test_batch_workers_follow_the_usable_cpus(cpus):
    """On the CPU one batch worker per usable core (at most 4), divided among --processes; on a GPU two."""
    n = usable_cpus(cpus)
    assert batch_policy(Settings(cpus=cpus), "cpu", 4).workers == max(1, min(n, 4))
    assert batch_policy(Settings(cpus=cpus, processes=2), "cpu", 4).workers == max(1, min(n, 4) // 2)
    assert batch_policy(Settings(cpus=cpus), "cuda", 4).workers == 2
