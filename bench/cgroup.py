"""CPU and memory limits as a container sees them, for benches that run the server under them
(`bench.batch_size --cpu-quota`, `bench.soak --cpu-quota --memory-limit-mb`).

Why: the batching defaults count the CPUs a process may use (`--cpus`, which a pod sets from its CPU limit),
and a deployment's memory limit must hold the server under load; both are worth checking under a
real cgroup, not only on cgroup-shaped folders (the unit tests) or summed RSS. A Kubernetes limit or
`docker run --cpus/--memory` is a cgroup whose `cpu.max` / `memory.max` (v2) or `cpu.cfs_quota_us` /
`memory.limit_in_bytes` (v1) throttles the process once it has used its share of a period, and counts its
memory as the limit does (page cache and kernel memory included, which RSS leaves out). `Limits` makes such a
cgroup (v1: below this process's own) and a command prefix that joins it and then, like a container runtime, gives
the command a cgroup namespace rooted there and its own view of the cgroup file system, so that the server
reads the quota where a container finds it. Needs root and writable cgroup controllers (v1 `cpu` / `memory`,
or v2 with them enabled); Linux only.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")


class Limits:
    """A fresh cgroup allowing `cpus` CPUs' worth of time per `period_us` and `memory_mb` of memory (either may
    be None: no limit of that kind), removed on exit."""

    def __init__(
        self, cpus: float | None = None, memory_mb: int | None = None, period_us: int = 100_000, root: Path = ROOT
    ) -> None:
        if cpus is not None and cpus <= 0 or memory_mb is not None and memory_mb <= 0:
            raise ValueError("limits must be > 0")
        self.cpus, self.memory_mb, self.period_us = cpus, memory_mb, period_us
        wanted = [c for c, v in (("cpu", cpus), ("memory", memory_mb)) if v is not None]
        own = _own_cgroups()
        name = f"nccr-guard-bench-{os.getpid()}"
        if all((root / c / "tasks").exists() for c in wanted):  # v1: a hierarchy per controller
            self.version = 1
            self.mounts = {c: root / c for c in wanted}
            self.paths = {c: root / c / own.get(c, "").lstrip("/") / name for c in wanted}
        elif set(wanted) <= set(_read(root / "cgroup.controllers").split()):
            # v2: below the hierarchy's root, which alone may enable controllers for its children while holding
            # processes itself (not run on this project's machines, whose CPU and memory controllers are v1)
            self.version = 2
            self.mounts = {"": root}
            self.paths = {"": root / name}
        else:
            raise SystemExit(f"no writable cgroup controllers {wanted} under {root}")

    def _file(self, controller: str, v1: str, v2: str) -> Path:
        return self.paths[controller if self.version == 1 else ""] / (v1 if self.version == 1 else v2)

    def __enter__(self) -> Limits:
        if self.version == 2:
            wanted = " ".join(f"+{c}" for c, v in (("cpu", self.cpus), ("memory", self.memory_mb)) if v is not None)
            (self.mounts[""] / "cgroup.subtree_control").write_text(wanted)
        for path in self.paths.values():
            path.mkdir(parents=True)  # PermissionError unless root
        if self.cpus is not None:
            quota = round(self.cpus * self.period_us)
            if self.version == 1:
                (self.paths["cpu"] / "cpu.cfs_period_us").write_text(str(self.period_us))
                (self.paths["cpu"] / "cpu.cfs_quota_us").write_text(str(quota))
            else:
                (self.paths[""] / "cpu.max").write_text(f"{quota} {self.period_us}")
        if self.memory_mb is not None:
            self._file("memory", "memory.limit_in_bytes", "memory.max").write_text(str(self.memory_mb << 20))
        return self

    def prefix(self) -> list[str]:
        """Runs the command after it in this cgroup, in a cgroup and mount namespace where each controller's mount
        point shows this cgroup as its root (v1: a bind mount of it; v2: cgroup2 mounted afresh inside the
        namespace), as `docker run --cpus --memory` or a pod's limits would show it; with a CPU limit, the command
        gets NCCR_GUARD_CPUS (the quota rounded up), as deploy/k8s's downward API sets it."""
        procs = "tasks" if self.version == 1 else "cgroup.procs"
        join = " && ".join(f"echo $$ > {p / procs}" for p in self.paths.values())
        if self.version == 1:
            view = " && ".join(f"mount --bind {self.paths[c]} {m}" for c, m in self.mounts.items())
        else:
            view = f"mount -t cgroup2 cgroup2 {self.mounts['']}"
        # The server counts the CPUs its quota allows from NCCR_GUARD_CPUS, as a pod's downward API passes them.
        env = f"env NCCR_GUARD_CPUS={math.ceil(self.cpus)} " if self.cpus is not None else ""
        inner = f'{view} && exec {env}"$@"'
        return ["sh", "-c", f"{join} && exec unshare -C -m sh -c '{inner}' sh \"$@\"", "sh"]

    def throttled(self) -> dict[str, float]:
        """Periods in which the cgroup ran out of CPU quota so far, and the time its threads were held back (s)."""
        stat = _pairs(self._file("cpu", "cpu.stat", "cpu.stat"))
        held = stat["throttled_time"] / 1e9 if self.version == 1 else stat["throttled_usec"] / 1e6
        return {"periods": stat["nr_throttled"], "seconds": held}

    def memory(self) -> dict[str, float]:
        """The memory the limit counts (MB, now and at its peak) and the kills it has made."""
        now = int(_read(self._file("memory", "memory.usage_in_bytes", "memory.current")))
        peak = int(_read(self._file("memory", "memory.max_usage_in_bytes", "memory.peak")) or now)
        events = _pairs(self._file("memory", "memory.oom_control", "memory.events"))
        return {"mb": round(now / 2**20, 1), "peak_mb": round(peak / 2**20, 1), "oom_kills": events.get("oom_kill", 0)}

    def __exit__(self, *exc: object) -> None:
        for path in self.paths.values():
            for _ in range(50):  # the server's processes leave the cgroup as they exit
                try:
                    path.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)


def _own_cgroups() -> dict[str, str]:
    """This process's cgroup per v1 controller ('' for v2's), from /proc/self/cgroup."""
    out = {}
    for line in _read(Path("/proc/self/cgroup")).splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(","):
            out[c] = path
    return out


def _pairs(path: Path) -> dict[str, int]:
    """A flat keyed file ('name value' lines) as numbers."""
    out = {}
    for line in _read(path).splitlines():
        key, _, value = line.partition(" ")
        if value.strip().lstrip("-").isdigit():
            out[key] = int(value)
    return out


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""
