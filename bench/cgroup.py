"""A CPU quota as a container sees it, for benches that run the server under one (`bench.batch_size
--cpu-quota`).

Why: the batching defaults count the CPUs a process may use (`nccr_guard.cpus`), a container's CPU quota
included, and that is worth checking under a real quota, not only on cgroup-shaped folders (the unit tests):
a Kubernetes CPU limit or `docker run --cpus` is a cgroup whose `cpu.max` (v2) or `cpu.cfs_quota_us` (v1)
throttles the process once it has used its share of a period. `CpuQuota` makes such a cgroup and a command
prefix that joins it and then, like a container runtime, gives the command a cgroup namespace rooted there and
its own view of the cgroup file system (the cgroup mounted at the controller's mount point), so that the
server reads the quota where a container finds it. Needs root and a writable cgroup CPU controller (v1 `cpu`
or v2 with `cpu` enabled); Linux only.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")


class CpuQuota:
    """A fresh cgroup allowing `cpus` CPUs' worth of time per `period_us`, removed on exit."""

    def __init__(self, cpus: float, period_us: int = 100_000, root: Path = ROOT) -> None:
        if cpus <= 0:
            raise ValueError("cpus must be > 0")
        self.cpus, self.period_us = cpus, period_us
        v1 = root / "cpu"
        if (v1 / "cpu.cfs_quota_us").exists():
            self.version, self.mount = 1, v1
        elif "cpu" in _read(root / "cgroup.controllers").split():
            self.version, self.mount = 2, root
        else:
            raise SystemExit(f"no cgroup CPU controller under {root} (v1 cpu/ or v2 with cpu enabled)")
        if os.geteuid() != 0:
            raise SystemExit("a CPU quota needs root (to make a cgroup and mount its view)")
        self.path = self.mount / f"nccr-guard-bench-{os.getpid()}"

    def __enter__(self) -> CpuQuota:
        quota = round(self.cpus * self.period_us)
        if self.version == 2:
            (self.mount / "cgroup.subtree_control").write_text("+cpu")
        self.path.mkdir()
        if self.version == 1:
            (self.path / "cpu.cfs_period_us").write_text(str(self.period_us))
            (self.path / "cpu.cfs_quota_us").write_text(str(quota))
        else:
            (self.path / "cpu.max").write_text(f"{quota} {self.period_us}")
        return self

    def prefix(self) -> list[str]:
        """Runs the command after it in this cgroup, in a cgroup and mount namespace where the controller's mount
        point shows this cgroup as its root (v1: a bind mount of it; v2: cgroup2 mounted afresh inside the
        namespace), as `docker run --cpus` or a pod's CPU limit would show it."""
        procs = self.path / ("tasks" if self.version == 1 else "cgroup.procs")
        view = (
            f"mount --bind {self.path} {self.mount}" if self.version == 1 else f"mount -t cgroup2 cgroup2 {self.mount}"
        )
        inner = f'{view} && exec "$@"'
        return ["sh", "-c", f"echo $$ > {procs} && exec unshare -C -m sh -c '{inner}' sh \"$@\"", "sh"]

    def throttled(self) -> dict[str, float]:
        """Periods in which the cgroup ran out of quota so far, and the time its threads were held back (s)."""
        stat = dict(line.split() for line in _read(self.path / "cpu.stat").splitlines() if line.strip())
        held = int(stat["throttled_time"]) / 1e9 if self.version == 1 else int(stat["throttled_usec"]) / 1e6
        return {"periods": int(stat["nr_throttled"]), "seconds": held}

    def __exit__(self, *exc: object) -> None:
        for _ in range(50):  # the server's processes leave the cgroup as they exit
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""
