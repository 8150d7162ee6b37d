"""What a server's SIGTERM handler may do: it runs between any two bytecodes of the main thread."""

from __future__ import annotations

import os
import subprocess
import sys

SCRIPT = """
import asyncio, signal
import uvicorn
from nccr_guard.config import Settings
from nccr_guard.server.app import create_app
from nccr_guard.server.run import DrainingServer

app = create_app(Settings(drain_quiet_s=0.1))
server = DrainingServer(uvicorn.Config(app, log_config=None))
server.config.load()
service = app.state.service
service.metrics.ready.set(1)

async def main():
    signal.signal(signal.SIGTERM, server.handle_exit)
    with service.metrics.ready._value._lock:  # the main thread inside a metric update
        signal.raise_signal(signal.SIGTERM)
    for _ in range(100):
        await asyncio.sleep(0.05)
        if server.should_exit:
            break
    print(service.draining, service.metrics.ready._value.get(), server.should_exit)

asyncio.run(main())
"""


def test_sigterm_inside_a_metric_update_drains_instead_of_deadlocking():
    """prometheus_client's locks are not reentrant (with --processes N one lock guards all of a process's
    metrics). A handler that set the readiness gauge itself waited forever on the lock its own thread held when
    the signal came: the worker never drained and the supervisor killed it. The handler now only wakes the event
    loop, which starts the drain: readiness 0, then exit once idle."""
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    try:
        r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired as e:
        raise AssertionError("the SIGTERM handler deadlocked on the metric lock") from e
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["True", "0.0", "True"]
