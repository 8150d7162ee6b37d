"""Shared fixtures: the real default model, real PNG files, and a real `nccr-guard serve` on loopback; and the
check that a test session leaves the checkout as it found it (tests write only under their tmp paths)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT / "models" / "mnist"
BIN = Path(sys.executable).parent / "nccr-guard"
GIT_BEFORE = pytest.StashKey[list[str] | None]()  # the session's `git status` when it started


def git_status() -> list[str] | None:
    """`git status --porcelain` lines of the checkout the tests run from (untracked files each listed, ignored
    ones not); None outside a git checkout or without git."""
    try:
        r = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=all", "--", "."],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.splitlines() if r.returncode == 0 else None


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[GIT_BEFORE] = git_status()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the session if it changed `git status` of a checkout that was clean when it started (a fresh clone,
    CI): a test wrote into the checkout rather than its tmp path. In a tree with work in progress others may be
    editing at the same time, so there the changes are listed as a warning only."""
    before, after = session.config.stash.get(GIT_BEFORE, None), git_status()
    if before is None or after is None or after == before:
        return
    changed = sorted(set(after) - set(before)) + [f"no longer: {line}" for line in sorted(set(before) - set(after))]
    tr = session.config.pluginmanager.get_plugin("terminalreporter")
    clean = not before
    if tr is not None:
        title = "the tests changed the checkout" if clean else "git status changed during the session (by the tests?)"
        tr.write("\n")
        tr.write_sep("=", title, red=clean, yellow=not clean)
        for line in changed:
            tr.write_line(line)
        if clean:
            tr.write_line("the session fails: tests must write only under their tmp paths (tmp_path, tmp_path_factory)")
    if clean and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def mnist_test() -> tuple[np.ndarray, np.ndarray]:
    from nccr_guard.datasets import load_split
    from nccr_guard.manifest import load_manifest

    return load_split(load_manifest(MNIST), "test")


def as_v3(model: Path, tmp_path_factory) -> Path:
    """A copy of a shipped model folder (same name) served as `nccr-v3`, calibrated as `nccr-guard calibrate
    --variant nccr-v3` would."""
    from nccr_guard.calibrate import calibrate

    folder = tmp_path_factory.mktemp(f"{model.name}-v3") / model.name
    shutil.copytree(model, folder)
    toml = folder / "model.toml"
    toml.write_text(re.sub(r'^variant = "[^"]*"', 'variant = "nccr-v3"', toml.read_text(), count=1, flags=re.M))
    calibrate(folder, variant="nccr-v3", backend="onnx")
    return folder


@pytest.fixture(scope="session")
def mnist_v3(tmp_path_factory) -> Path:
    """models/mnist as `nccr-v3` (the max of three squeeze readings, 4 rows per input): the variant the one-graph
    verdict, its float tolerances and the 4-row batching and fault tests are about. The shipped model serves
    `nccr-v4` (78 rows, a weighted sum scored by the numpy engine)."""
    return as_v3(MNIST, tmp_path_factory)


@pytest.fixture(scope="session")
def detector_v3(mnist_v3):
    from nccr_guard.detector import Detector

    return Detector.load(mnist_v3, backend="torch", device="cpu")


@pytest.fixture(scope="session")
def detector():
    from nccr_guard.detector import Detector

    return Detector.load(MNIST, backend="torch", device="cpu")


def to_png(x: np.ndarray, path: Path) -> Path:
    from PIL import Image

    Image.fromarray((np.clip(x[0], 0, 1) * 255).round().astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="session")
def digit_pngs(tmp_path_factory, mnist_test) -> list[tuple[Path, int]]:
    """Every 5th held-out test digit as a real PNG file, with its label."""
    folder = tmp_path_factory.mktemp("digits")
    x, y = mnist_test
    return [(to_png(x[i], folder / f"digit_{i}_{y[i]}.png"), int(y[i])) for i in range(0, len(x), 5)]


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path
    verify: ssl.SSLContext | bool = True  # HTTPS: trusting only the CA that issued the server's certificate

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kw.pop("timeout", 30), verify=self.verify, **kw)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def stop_cleanly(self, timeout: float = 30) -> None:
        """SIGTERM, and the exit must be 0; a failure quotes the server's log, which a CI run keeps nowhere else."""
        code = self.stop(timeout=timeout)
        assert code == 0, f"the server exited {code}; its log ends:\n{self.log.read_text()[-4000:]}"


def request_parts(card: dict, n: int) -> list[int]:
    """Sizes of the parts a served model (its /v1/models card) cuts a request of `n` fixed-K inputs into:
    at most one per batch worker, each a whole number of forwards but the last (ModelRuntime.parts)."""
    batching = card["calibration"]["batching"]
    per_forward = max(1, batching["max_rows"] // card["passes"])
    forwards = -(-n // per_forward)
    size = per_forward * -(-forwards // min(batching["workers"], forwards))
    return [min(size, n - i) for i in range(0, n, size)]


def issue_tls(folder: Path) -> tuple[Path, Path, Path]:
    """A server certificate for 127.0.0.1 from a fresh test CA (trustme): certificate, key and CA files."""
    import trustme

    ca, files = trustme.CA(), (folder / "cert.pem", folder / "key.pem", folder / "ca.pem")
    issued = ca.issue_cert("127.0.0.1")
    issued.cert_chain_pems[0].write_to_path(files[0])
    issued.private_key_pem.write_to_path(files[1])
    ca.cert_pem.write_to_path(files[2])
    return files


def start_server(
    tmp_path: Path,
    *args: str,
    env: dict | None = None,
    ready_timeout: float = 60,
    ca: Path | None = None,
    stdout_pipe: bool = False,
) -> Server:
    """`ca`: the server speaks HTTPS (its --ssl-* flags among `args`) with a certificate this CA issued.
    `stdout_pipe`: the access log (stdout) goes to a pipe the test reads (or leaves unread), the log to stderr."""
    port = free_port()
    log = tmp_path / f"serve-{port}.log"
    cmd = [str(BIN), "serve", "--host", "127.0.0.1", "--port", str(port), *args]
    full_env = {**os.environ, **(env or {})}
    out, err = (subprocess.PIPE, log.open("w")) if stdout_pipe else (log.open("w"), subprocess.STDOUT)
    proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=full_env)
    verify = ssl.create_default_context(cafile=ca) if ca else True
    url = f"{'https' if ca else 'http'}://127.0.0.1:{port}"
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=1, verify=verify).status_code == 200:
                return Server(url, proc, log, verify)
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server not ready in {ready_timeout}s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    s = start_server(tmp_path_factory.mktemp("server"))
    yield s
    s.stop()
