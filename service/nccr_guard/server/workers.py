"""`--processes N`: N worker processes, each a whole server (its own models, batchers and draining uvicorn server)
on its own SO_REUSEPORT listener for the same address.

Why not uvicorn's `--workers` supervisor: its workers run uvicorn's plain `Server`, whose shutdown closes the
listener and idle keep-alive connections at once, so a request sent on one just then was lost (a CI failure);
here each worker drains like the single-process server (503 + `Connection: close` for new requests while queued
work finishes). And its workers share one accept socket, where the first worker to wake takes every connection
of a burst; with SO_REUSEPORT the kernel spreads connections over the workers' listeners by hash, not by load,
so a worker holding more than its share of the open connections closes one after its response (`Connection:
close`, at most one per 0.2 s) and the client's reconnection is hashed again (`--rebalance-connections`).

The parent binds the address without listening, which holds the port (and resolves port 0) and reports
"address in use" before any worker starts; only the workers listen. SIGTERM/SIGINT to the parent is forwarded
to every worker; the parent exits 0 when all workers drained and exited 0. A worker that dies while serving is
replaced, and so is one whose event loop stops its heartbeat for `worker_timeout_s` (hung); one that fails to
start (exit code STARTUP_FAILURE) stops the whole server. Metrics: the workers
share a PROMETHEUS_MULTIPROC_DIR (a temporary directory unless the variable is set; a set one is cleared of an
earlier run's files at start, run.run), so a scrape of any worker counts all of them (metrics.py)."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from typing import Any

from prometheus_client import multiprocess

from nccr_guard.config import Settings

log = logging.getLogger("nccr_guard")

STARTUP_FAILURE = 3  # uvicorn's exit code for a server that never started
_spawn = mp.get_context("spawn")  # workers load torch/ONNX Runtime themselves; a fork would copy thread state


def listener(host: str, port: int, share: bool = True) -> socket.socket:
    """A socket bound to (host, port), not yet listening; with SO_REUSEPORT if `share`."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if share:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind((host, port))
    return sock


@dataclass
class StartGate:
    """A worker's link to the supervisor. Readiness waits until every worker has started serving once: until a
    worker listens, the kernel gives all new connections to the others, and keep-alive clients (wrk, a
    sidecar's pool) keep them, so readiness during a slow start would leave the load on one worker. A worker
    that is replaced later counts again, so a crash does not make the others unready. And each worker's event
    loop writes a heartbeat into its slot (every 0.1 s, `Service.sample_gauges`): the supervisor replaces a
    worker that is alive but silent, as a hung one keeps its share of the connections."""

    started: Any  # a multiprocessing.Value("i"): workers that reached listening
    workers: int
    beats: Any  # a multiprocessing.Array("d"): each slot's last heartbeat, time.monotonic()
    slot: int
    conns: Any  # a multiprocessing.Array("i"): each slot's open connections, written with the heartbeat

    def arrive(self) -> None:
        with self.started.get_lock():
            self.started.value += 1

    def open(self) -> bool:
        return self.started.value >= self.workers

    def beat(self, connections: int) -> None:
        self.beats[self.slot] = time.monotonic()
        self.conns[self.slot] = connections

    def over_share(self, connections: int) -> bool:
        """Whether this worker holds more than its fair share (rounded up) of all workers' open connections.
        SO_REUSEPORT hashes each new connection to a worker regardless of load, so a few long-lived keep-alive
        connections can all land on one; closing a surplus one after its response makes the client reconnect
        and be hashed again, until the counts even out (2 connections: 2/0 -> 1/1; 3 stay 2/1)."""
        total = sum(self.conns) - self.conns[self.slot] + connections
        return connections * self.workers > total + self.workers - 1


def worker(settings_json: str, port: int, gate: StartGate) -> None:
    """One worker process: its own listener on the shared port, its own app, the draining server."""
    from nccr_guard.server.logs import configure_logging
    from nccr_guard.server.run import serve_on

    # Out of the terminal's process group: Ctrl-C reaches only the parent, which forwards one SIGTERM (a second
    # signal would cut a worker's drain short). If the parent dies, the worker drains and exits too.
    os.setpgrp()
    parent = mp.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()
    settings = Settings.model_validate_json(settings_json)
    configure_logging(settings.log_json, settings.access_log, settings.access_log_max_lines)
    sock = listener(settings.host, port)
    sys.exit(0 if serve_on(settings, [sock], gate) else STARTUP_FAILURE)


def _exit_with(parent: BaseProcess) -> None:
    wait([parent.sentinel])
    os.kill(os.getpid(), signal.SIGTERM)


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stop = threading.Event()
        self.procs: list[BaseProcess] = []
        self.started = _spawn.Value("i", 0)
        self.beats = _spawn.Array("d", settings.processes, lock=False)  # one writer per slot
        self.conns = _spawn.Array("i", settings.processes, lock=False)

    def _start(self, port: int, slot: int) -> BaseProcess:
        self.beats[slot] = 0.0  # not checked until the new worker's first heartbeat
        self.conns[slot] = 0  # a dead worker's connections are gone
        gate = StartGate(self.started, self.settings.processes, self.beats, slot, self.conns)
        p = _spawn.Process(target=worker, args=(self.settings.model_dump_json(), port, gate), name="nccr-guard-worker")
        p.start()
        return p

    def _silent(self, slot: int) -> bool:
        beat = self.beats[slot]
        return beat > 0 and time.monotonic() - beat > self.settings.worker_timeout_s

    def run(self) -> int:
        with tempfile.TemporaryDirectory(prefix="nccr-guard-metrics-") as shared:
            # Read by prometheus_client when each worker imports it (metrics.py): one value file per process.
            os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", shared)
            return self._run()

    def _run(self) -> int:
        # A first bind without SO_REUSEPORT fails if anything listens there, even another server with SO_REUSEPORT
        # (which this one would otherwise silently join); the second holds the port for the workers, never listening.
        with listener(self.settings.host, self.settings.port, share=False) as probe:
            port = probe.getsockname()[1]
        hold = listener(self.settings.host, port)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        self.procs = [self._start(port, i) for i in range(self.settings.processes)]
        log.info("supervisor: %d workers on %s:%d", len(self.procs), self.settings.host, port)
        failed = False
        while not self.stop.is_set():
            wait([p.sentinel for p in self.procs], timeout=0.2)
            for i, p in enumerate(self.procs):
                if self.stop.is_set():
                    break
                if p.is_alive() and self._silent(i):
                    log.error("worker %s: no heartbeat for %.0f s: killing it", p.pid, self.settings.worker_timeout_s)
                    p.kill()
                    p.join()
                if p.is_alive():
                    continue
                if p.exitcode == STARTUP_FAILURE:
                    log.error("worker %s failed to start: stopping", p.pid)
                    failed = True
                    self.stop.set()
                    break
                log.error("worker %s exited with %s: replacing it", p.pid, p.exitcode)
                multiprocess.mark_process_dead(p.pid)  # its live gauges (in flight, queue depth, ready) go
                self.procs[i] = self._start(port, i)
        codes = self._shut_down()
        hold.close()
        return 1 if failed or any(c != 0 for c in codes) else 0

    def _on_signal(self, *_) -> None:
        if self.stop.is_set():  # a second signal cuts the workers' drain short, as with one process
            for p in self.procs:
                if p.is_alive():
                    p.terminate()
        self.stop.set()

    def _shut_down(self) -> list[int | None]:
        """SIGTERM to every worker (each drains), then wait for them; past the drain period plus a grace, kill."""
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        give_up = time.monotonic() + self.settings.drain_s + 15
        for p in self.procs:
            p.join(max(0.0, give_up - time.monotonic()))
            if p.is_alive():
                log.error("worker %s did not stop in time: killing it", p.pid)
                p.kill()
                p.join()
        return [p.exitcode for p in self.procs]
