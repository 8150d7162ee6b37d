"""CPUs a server process may use (nccr_guard.cpus): a container's CPU quota caps the batch workers, not the
node's core count. Real cgroup-shaped folders under tmp_path."""

from __future__ import annotations

import os

from nccr_guard.cpus import cpu_quota, usable_cpus
from nccr_guard.server.runtime import batch_policy


def _cgroup(tmp_path, files: dict[str, str], own: str = "0::/\n"):
    root = tmp_path / "cgroup"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    root.mkdir(exist_ok=True)
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text(own)
    return root, proc


def test_cgroup_v2_quota_and_none(tmp_path):
    root, proc = _cgroup(tmp_path, {"cpu.max": "150000 100000\n"})
    assert cpu_quota(root, proc) == 1.5
    assert usable_cpus(root, proc) == min(len(os.sched_getaffinity(0)), 2)  # 1.5 CPUs of quota: 2 workers' worth
    root, proc = _cgroup(tmp_path / "none", {"cpu.max": "max 100000\n"})
    assert cpu_quota(root, proc) is None
    assert usable_cpus(root, proc) == len(os.sched_getaffinity(0))


def test_cgroup_v2_the_smallest_quota_on_the_way_to_the_root(tmp_path):
    """A process in a nested cgroup (no namespace): its own cpu.max, and its parents', the tightest counts."""
    files = {
        "kubepods/cpu.max": "400000 100000",
        "kubepods/pod1/cpu.max": "max 100000",
        "kubepods/pod1/c1/cpu.max": "50000 100000",
    }
    root, proc = _cgroup(tmp_path, files, own="0::/kubepods/pod1/c1\n")
    assert cpu_quota(root, proc) == 0.5
    assert usable_cpus(root, proc) == 1  # never 0


def test_cgroup_v1_quota(tmp_path):
    root, proc = _cgroup(tmp_path, {"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, own="")
    assert cpu_quota(root, proc) == 1.0
    root, proc = _cgroup(tmp_path / "none", {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"})
    assert cpu_quota(root, proc) is None


def test_no_cgroup_files_or_garbage_mean_no_quota(tmp_path):
    root, proc = _cgroup(tmp_path, {})
    assert cpu_quota(root, proc) is None
    root, proc = _cgroup(tmp_path / "bad", {"cpu.max": "lots\n"})
    assert cpu_quota(root, proc) is None


def test_batch_workers_follow_the_usable_cpus():
    """On the CPU one batch worker per usable core (at most 4), divided among --processes."""
    from nccr_guard.config import Settings

    n = usable_cpus()
    assert batch_policy(Settings(), "cpu", 4).workers == max(1, min(n, 4))
    assert batch_policy(Settings(processes=2), "cpu", 4).workers == max(1, min(n, 4) // 2)
