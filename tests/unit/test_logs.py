"""The access log (server/logs): records queued by the caller, written by the stdlib QueueListener in order,
what is queued written at stop, and at most max_lines held while stdout does not drain."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import threading
import time

from nccr_guard.server.logs import access_logging


class _Stdout(io.StringIO):
    """A stdout that can be made to hang, as a full pipe to a log shipper does."""

    def __init__(self) -> None:
        super().__init__()
        self.open = threading.Event()
        self.open.set()
        self.stuck = threading.Event()  # set once a write hangs

    def write(self, s: str) -> int:
        if not self.open.is_set():
            self.stuck.set()
        self.open.wait()
        return super().write(s)


def _logger(handler: logging.Handler, name: str) -> logging.Logger:
    log = logging.getLogger(f"nccr_guard.test.{name}")
    log.handlers, log.propagate = [handler], False
    log.setLevel(logging.INFO)
    return log


def _wait_lines(out: _Stdout, n: int) -> list[str]:
    deadline = time.monotonic() + 5
    while len(lines := out.getvalue().splitlines()) < n and time.monotonic() < deadline:
        time.sleep(0.01)
    return lines


def test_every_line_in_order_and_what_is_queued_written_at_stop():
    out = _Stdout()
    handler, listener = access_logging(out)
    log = _logger(handler, "order")
    for i in range(2000):
        log.info(json.dumps({"n": i}))
    listener.stop()
    assert out.getvalue().splitlines() == [json.dumps({"n": i}) for i in range(2000)]


def test_a_hanging_stdout_does_not_hold_the_caller():
    out = _Stdout()
    handler, listener = access_logging(out)
    log = _logger(handler, "hang")
    try:
        log.info("first")
        assert _wait_lines(out, 1) == ["first"]
        out.open.clear()  # the next write hangs
        log.info("second")
        assert out.stuck.wait(5)  # the listener is now stuck in write()
        start = time.monotonic()
        for i in range(500):
            log.info(f"more {i}")
        assert time.monotonic() - start < 0.5
    finally:
        out.open.set()
        listener.stop()
    assert out.getvalue().splitlines() == ["first", "second", *(f"more {i}" for i in range(500))]


def test_a_stdout_that_stops_draining_costs_bounded_memory():
    """Beyond max_lines waiting the newer lines are dropped and counted (the metric reads the count)."""
    out = _Stdout()
    handler, listener = access_logging(out, max_lines=100)
    log = _logger(handler, "bounded")
    try:
        log.info("first")
        assert _wait_lines(out, 1) == ["first"]
        out.open.clear()
        log.info("in flight")
        assert out.stuck.wait(5)  # the listener holds "in flight" and hangs in write()
        for i in range(500):
            log.info(f"more {i}")
        assert handler.queue.qsize() == 100 and handler.dropped == 400
    finally:
        out.open.set()
        listener.stop()
    assert out.getvalue().splitlines() == ["first", "in flight", *(f"more {i}" for i in range(100))]


def test_no_access_log_starts_no_listener_thread():
    """configure_logging is process-wide, so each case runs in a fresh interpreter."""
    code = (
        "import sys, threading; from nccr_guard.server.logs import configure_logging, access_log_dropped; "
        "configure_logging(True, access_log=sys.argv[1] == 'on'); "
        "print(threading.active_count(), access_log_dropped())"
    )
    on, off = (subprocess.run([sys.executable, "-c", code, a], capture_output=True, text=True) for a in ("on", "off"))
    assert on.stdout.strip() == "2 0", on.stderr
    assert off.stdout.strip() == "1 0", off.stderr


def test_service_log_lines_are_json_whatever_the_message_holds():
    """A message with quotes, backslashes and a newline (a library's, a path's) and a traceback each stay one line
    that parses; before, the JSON was a format string, and such a message broke its line."""
    from nccr_guard.server.logs import JsonFormatter

    record = logging.LogRecord(
        "httpx", logging.INFO, __file__, 1, 'HTTP Request: POST %s "HTTP/1.1 200 OK"', ("u",), None
    )
    assert json.loads(JsonFormatter().format(record))["msg"] == 'HTTP Request: POST u "HTTP/1.1 200 OK"'
    try:
        raise ValueError('a "quoted"\nreason \\')
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    line = JsonFormatter().format(record)
    assert "\n" not in line
    out = json.loads(line)
    assert out["level"] == "ERROR" and out["logger"] == "x" and "ValueError" in out["exc"] and "ts" in out
