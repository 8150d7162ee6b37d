"""bench.cgroup.Limits on cgroup-shaped folders: the files it writes and reads for cgroup v2 (which the
project's machines lack: their CPU and memory controllers are v1, where `bench.batch_size --cpu-quota` and
`bench.soak --memory-limit-mb` ran for real) and v1, and the command prefix that joins the cgroup."""

from __future__ import annotations

from pathlib import Path

from bench.cgroup import Limits


def _empty(path: Path) -> None:
    """What the kernel does for a real cgroup: its files go with it."""
    for f in path.iterdir():
        f.unlink()


def test_v2_limits_are_written_and_read_back(tmp_path: Path):
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (tmp_path / "cgroup.subtree_control").write_text("")
    with Limits(cpus=1.5, memory_mb=256, root=tmp_path) as cg:
        [own] = cg.paths.values()
        assert own.parent == tmp_path
        assert (tmp_path / "cgroup.subtree_control").read_text() == "+cpu +memory"
        assert (own / "cpu.max").read_text() == "150000 100000"
        assert (own / "memory.max").read_text() == str(256 << 20)
        (own / "cpu.stat").write_text("usage_usec 9\nnr_periods 40\nnr_throttled 7\nthrottled_usec 2500000\n")
        assert cg.throttled() == {"periods": 7, "seconds": 2.5}
        (own / "memory.current").write_text(f"{100 << 20}\n")
        (own / "memory.peak").write_text(f"{300 << 20}\n")
        (own / "memory.events").write_text("low 0\nhigh 0\nmax 12\noom 2\noom_kill 1\n")
        assert cg.memory() == {"mb": 100.0, "peak_mb": 300.0, "oom_kills": 1}
        prefix = " ".join(cg.prefix())
        assert f"echo $$ > {own / 'cgroup.procs'}" in prefix
        assert "unshare -C -m" in prefix and f"mount -t cgroup2 cgroup2 {tmp_path}" in prefix
        assert 'exec env NCCR_GUARD_CPUS=2 "$@"' in prefix  # 1.5 CPUs of quota, as the downward API rounds them
        _empty(own)
    assert not own.exists()


def test_v1_limits_go_to_each_controllers_own_hierarchy(tmp_path: Path):
    for controller in ("cpu", "memory"):
        (tmp_path / controller).mkdir()
        (tmp_path / controller / "tasks").write_text("")
    with Limits(cpus=1, root=tmp_path) as cg:
        assert set(cg.paths) == {"cpu"}  # no memory limit asked: the memory hierarchy is left alone
        cpu = cg.paths["cpu"]
        assert cpu.is_relative_to(tmp_path / "cpu")
        assert (cpu / "cpu.cfs_quota_us").read_text() == "100000"
        assert (cpu / "cpu.cfs_period_us").read_text() == "100000"
        (cpu / "cpu.stat").write_text("nr_periods 40\nnr_throttled 3\nthrottled_time 1500000000\n")
        assert cg.throttled() == {"periods": 3, "seconds": 1.5}
        assert f"mount --bind {cpu} {tmp_path / 'cpu'}" in " ".join(cg.prefix())
        _empty(cpu)
    with Limits(memory_mb=64, root=tmp_path) as cg:
        mem = cg.paths["memory"]
        assert (mem / "memory.limit_in_bytes").read_text() == str(64 << 20)
        (mem / "memory.usage_in_bytes").write_text(f"{10 << 20}")
        (mem / "memory.max_usage_in_bytes").write_text(f"{64 << 20}")
        (mem / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n")
        assert cg.memory() == {"mb": 10.0, "peak_mb": 64.0, "oom_kills": 3}
        _empty(mem)


def test_no_controller_is_refused(tmp_path: Path):
    (tmp_path / "cgroup.controllers").write_text("io pids\n")
    try:
        Limits(cpus=1, root=tmp_path)
    except SystemExit as e:
        assert "cpu" in str(e)
    else:
        raise AssertionError("a hierarchy without the cpu controller was accepted")
