"""Shared benchmark helpers: machine description, report writing, bare in-process loops."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
REPORTS = ROOT / "reports" / "bench"


def machine() -> dict:
    import torch

    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    names = [line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")]
    cpu = names[0] if names else platform.processor()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """Resident memory of a process (`VmHWM`: its peak so far), from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} for pid {pid}")


def _stat_fields(stat: Path) -> list[str]:
    """A /proc stat file's fields after the command name (which may hold spaces): state, ppid, ..."""
    return stat.read_text().rsplit(")", 1)[1].split()


def _cpu_ticks(stat: Path) -> int:
    """utime + stime of a /proc stat file."""
    fields = _stat_fields(stat)
    return int(fields[11]) + int(fields[12])


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (a server's `--processes N` supervisor, workers and helpers), from /proc."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                children.setdefault(int(_stat_fields(d / "stat")[1]), []).append(int(d.name))
            except (OSError, IndexError, ValueError):
                continue
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def tree_cpu_s(pid: int) -> tuple[float, float]:
    """CPU seconds so far of process `pid` and its descendants (a server's `--processes N` workers), and of their
    main threads alone (the event loops), from /proc (Linux). Why: under a closed loop on a shared 2-core
    machine, the CPU a request costs the server moves far less from run to run than the requests per second."""
    total = main = 0
    for p in process_tree(pid):
        try:
            total += _cpu_ticks(Path(f"/proc/{p}/stat"))
            main += _cpu_ticks(Path(f"/proc/{p}/task/{p}/stat"))
        except OSError:  # gone meanwhile
            continue
    tick = os.sysconf("SC_CLK_TCK")
    return total / tick, main / tick


def tree_rss_mb(pid: int) -> float:
    """Resident memory of `pid` and its descendants together (a `--processes N` server's): pages shared between
    them count once per process, while the page cache and kernel memory a memory limit also counts are left out,
    so it is not what the limit sees (that is `bench.cgroup.Limits.memory`: `bench.soak --memory-limit-mb`)."""
    total = 0.0
    for p in process_tree(pid):
        try:
            total += rss_mb(p)
        except (OSError, RuntimeError):  # gone meanwhile, or a zombie without memory
            continue
    return total


def cpu_ms_per_request(pid: int, before: tuple[float, float], served: float) -> dict[str, float]:
    """The server `pid`'s CPU ms per request since `before` (its `tree_cpu_s` then) over `served` requests: all
    processes and threads, and event loops alone."""
    now = tree_cpu_s(pid)
    return {k: round(1e3 * (b - a) / served, 4) for k, a, b in zip(("all", "event_loops"), before, now, strict=True)}


def resnet_folder(tmp: Path, top: str = "", image: str = "") -> Path:
    """A ResNet-50-shaped model folder with seeded random weights (speed only), uncalibrated; `top` and `image`
    are extra model.toml lines for the top level and [input.image]."""
    import torch

    from nccr_guard.nets import ResNet50

    folder = tmp / "resnet50"
    folder.mkdir()
    torch.manual_seed(0)
    torch.save(ResNet50().eval().state_dict(), folder / "weights.pt")
    labels = ", ".join(f'"c{i}"' for i in range(1000))
    (folder / "model.toml").write_text(
        f'name = "resnet50"\nmodality = "image"\nlabels = [{labels}]\nwatch = ["layer4"]\n{top}'
        f'[input]\nshape = [3, 224, 224]\nrange = [0.0, 1.0]\n[input.image]\nmode = "RGB"\n{image}'
        '[weights]\ntorch_module = "nccr_guard.nets:ResNet50"\nstate_dict = "weights.pt"\n'
    )
    return folder


def median_ms(fn, reps: int) -> float:
    """Median wall time of `fn()` over `reps` calls, after one warm-up call."""
    import statistics

    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def write_report(name: str, data: dict, command: str) -> Path:
    REPORTS.mkdir(parents=True, exist_ok=True)
    path = REPORTS / f"{name}.json"
    path.write_text(json.dumps({"command": command, "machine": machine(), **data}, indent=1) + "\n")
    return path


def sample_inputs(model: Path, n: int = 64) -> np.ndarray:
    from nccr_guard.datasets import load_split
    from nccr_guard.manifest import load_manifest

    return load_split(load_manifest(model), "test")[0][:n]


def _bare_worker(args: tuple) -> int:
    model, threads, per_forward, seconds, backend, xs = args
    import torch

    from nccr_guard.detector import Detector
    from nccr_guard.inputs import Limits, decode

    torch.set_num_threads(threads)
    det = Detector.load(model, backend=backend, device="cpu", threads=threads)
    xs = sample_inputs(model) if xs is None else xs
    files, limits = (xs, Limits()) if isinstance(xs[0], bytes) else (None, None)

    def inputs(batch: list[int]) -> list[np.ndarray]:
        """Files are decoded in the loop, as the server decodes every upload."""
        return [decode(files[k], det.manifest, limits) for k in batch] if files else [xs[k] for k in batch]

    det.detect(inputs(list(range(per_forward))))  # warm-up
    done, i, end = 0, 0, time.monotonic() + seconds
    while time.monotonic() < end:
        det.detect(inputs([(i + j) % len(xs) for j in range(per_forward)]))
        done += per_forward
        i += per_forward
    return done


def bare_detections_per_s(
    model: Path,
    procs: int,
    threads: int,
    per_forward: int,
    seconds: float,
    backend: str = "torch",
    inputs: np.ndarray | list[bytes] | None = None,
) -> float:
    """Detections/s of `procs` processes each looping Detector.detect over `per_forward` inputs per forward,
    cycling through `inputs` (default: the model's first 64 test inputs; files as bytes: decoded in the loop,
    the server's whole work for them but HTTP, parsing and batching)."""
    ctx = mp.get_context("spawn")
    with ctx.Pool(procs) as pool:
        counts = pool.map(_bare_worker, [(model, threads, per_forward, seconds, backend, inputs)] * procs)
    return sum(counts) / seconds


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def checkout_env(service_dir: Path | None) -> dict[str, str]:
    """The environment that runs a checkout's code: its `service/` folder first on PYTHONPATH; None, this
    checkout's. This one's goes on PYTHONPATH too rather than through the installed (editable) package, so both
    sides of a comparison load alike: through the .pth entry this checkout ran 5-10 % fewer single-PNG
    requests/s than the same code through PYTHONPATH (`python -m bench.batch_size --compare` against itself,
    two pairs; docs/decisions/015-tried-and-dropped.md)."""
    service = service_dir or ROOT / "service"
    paths = [str(service), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def start_server(
    port: int,
    extra: list[str] | tuple[str, ...],
    log: Path | None = None,
    service_dir: Path | None = None,
    prefix: list[str] | tuple[str, ...] = (),
) -> subprocess.Popen:
    """`nccr-guard serve` on 127.0.0.1:`port` (via this interpreter), returned once ready; stderr to `log`.
    `service_dir`: run the server code of another checkout (its `service/` folder first on PYTHONPATH).
    `prefix`: a command that execs the server (bench.cgroup.Limits.prefix), so the pid is still the server's."""
    import httpx

    proc = subprocess.Popen(
        [*prefix, sys.executable, "-m", "nccr_guard.cli", "serve", "--port", str(port), "--no-log-json", *extra],
        stdout=subprocess.DEVNULL,
        stderr=log.open("w") if log else subprocess.DEVNULL,
        env=checkout_env(service_dir),
    )
    for _ in range(300):
        if proc.poll() is not None:
            tail = log.read_text()[-800:] if log else ""
            raise RuntimeError(f"server exited {proc.returncode}: {tail}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1, trust_env=False).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not become ready")


def compared_servers(checkout: Path | None) -> list[Path | None]:
    """The server code a --compare bench runs: this checkout's (None) and, given another checkout, its service/."""
    return [None] + ([checkout.resolve() / "service"] if checkout else [])


def compare_suffix(checkout: Path | None) -> str:
    """'-compare-<short commit>' for a --compare bench's report name (one report per compared commit), else ''."""
    if checkout is None:
        return ""
    rev = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return "-compare-" + (rev.stdout.strip() or checkout.name)
