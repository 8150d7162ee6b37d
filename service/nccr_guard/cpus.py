"""How many CPUs this process may use, for the per-device batching defaults.

`os.cpu_count()` counts the machine's CPUs. In a container it is the node's: a Kubernetes pod limited to 2 CPUs
(deploy/k8s/nccr-guard.yaml) on a 64-core node would start batch workers for 4 cores and have its quota
throttle them. The affinity mask covers `--cpuset-cpus`; a CPU quota (`docker --cpus`, a Kubernetes CPU limit)
lives only in the cgroup's files.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def usable_cpus(cgroup: Path = CGROUP, proc_cgroup: Path = Path("/proc/self/cgroup")) -> int:
    """The affinity mask's CPUs, capped by the cgroup's CPU quota rounded up (1.5 CPUs of quota: 2)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        n = os.cpu_count() or 1
    if (quota := cpu_quota(cgroup, proc_cgroup)) is not None:
        n = min(n, max(1, math.ceil(quota)))
    return n


def cpu_quota(cgroup: Path = CGROUP, proc_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """CPUs' worth of time per period the cgroup allows, or None without a quota. cgroup v2: the smallest
    `cpu.max` ("max 100000" or "200000 100000") from this process's cgroup (/proc/self/cgroup's "0::/path")
    up to the root, which in a container's cgroup namespace is the container's own; cgroup v1:
    cpu/cpu.cfs_quota_us (-1: none) over cpu/cpu.cfs_period_us."""
    path = ""
    with contextlib.suppress(OSError, StopIteration):
        path = next(ln[3:].strip() for ln in proc_cgroup.read_text().splitlines() if ln.startswith("0::"))
    parts = [p for p in path.split("/") if p]
    folders = [cgroup.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]  # own cgroup first, root last
    quotas, seen = [], False
    for folder in folders:
        try:
            quota, period = (folder / "cpu.max").read_text().split()[:2]
        except (OSError, ValueError):
            continue
        seen = True
        if quota != "max":
            with contextlib.suppress(ValueError, ZeroDivisionError):
                quotas.append(int(quota) / int(period))
    if seen:
        return min(quotas, default=None)
    try:
        quota_us = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None
