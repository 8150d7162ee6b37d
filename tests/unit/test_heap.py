"""keep_heap (nccr_guard/heap.py): after it, a large buffer freed and taken again comes back without page faults,
as a torch forward's activation buffers do; glibc's defaults fault it in afresh. Each case runs in a fresh
interpreter, whose heap has no history."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import resource, sys
import numpy as np
{setup}
faults = []
for _ in range(2):  # a 16 MiB buffer, freed each time, as a forward's activations are
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = np.empty(4 << 20, np.float32)
    a.fill(1.0)
    del a
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(faults[0], faults[1])
"""


# 16 MiB is 4,096 pages, ~500 faults with transparent huge pages on first touch; a reused buffer needs none
FAULTED, KEPT = 100, 25


def _faults(setup: str) -> tuple[int, int]:
    """Page faults of the buffer's first and second use."""
    out = subprocess.run([sys.executable, "-c", PROBE.format(setup=setup)], capture_output=True, text=True, check=True)
    first, second = map(int, out.stdout.split())
    return first, second


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_a_freed_buffer_comes_back_without_faults_after_keep_heap():
    assert _faults("")[1] > FAULTED  # glibc's defaults: mapped the first time, then from a heap grown anew
    assert _faults("from nccr_guard.heap import keep_heap; assert keep_heap()")[1] < KEPT


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_the_torch_backend_on_the_cpu_keeps_the_heap():
    setup = (
        "from nccr_guard.backends import make_backend; from nccr_guard.manifest import load_manifest; "
        "from tests.conftest import MNIST; make_backend('torch', load_manifest(MNIST), device='cpu')"
    )
    assert _faults(setup)[1] < KEPT
