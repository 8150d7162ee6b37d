"""bench.common.tree_cpu_s, which the serving benches divide by the requests served: it must count a server's
worker processes (`--processes N` spawns them) and tell their main threads (the event loops) from the rest."""

from __future__ import annotations

import subprocess
import sys
import time

from bench.common import tree_cpu_s

# A parent whose second thread spins while a worker process spins in its main thread; the parent's main
# thread sleeps.
TREE = """
import subprocess, sys, threading, time
child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
def spin():
    while True: pass
threading.Thread(target=spin, daemon=True).start()
print(child.pid, flush=True)
time.sleep(30)
"""


def test_a_worker_process_and_a_busy_thread_are_counted_apart():
    proc = subprocess.Popen([sys.executable, "-c", TREE], stdout=subprocess.PIPE, text=True)
    child = 0
    try:
        child = int(proc.stdout.readline())
        before = tree_cpu_s(proc.pid)
        time.sleep(1.0)
        total, main = (b - a for a, b in zip(before, tree_cpu_s(proc.pid), strict=True))
    finally:
        proc.kill()
        proc.wait()
        if child:
            subprocess.run(["kill", "-9", str(child)], check=False)
    assert total >= 0.6, total  # two spinning threads for a second, on a shared 2-core machine
    assert main >= 0.3, (main, total)  # the worker's main thread (the parent's sleeps)
    assert total - main >= 0.3, (main, total)  # the parent's spinning thread: not a main thread
