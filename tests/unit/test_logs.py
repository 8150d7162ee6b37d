"""The access log's writer (server/logs.LineBuffer): every line, in order, written in few writes off the
caller's thread, and what is left at close written too."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import threading
import time

from nccr_guard.server.logs import LineBuffer


class _Stdout(io.StringIO):
    """A stdout that counts its writes and can be made to hang, as a full pipe to a log shipper does."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self.open = threading.Event()
        self.open.set()
        self.stuck = threading.Event()  # set once a write hangs

    def write(self, s: str) -> int:
        if not self.open.is_set():
            self.stuck.set()
        self.open.wait()
        self.writes += 1
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


def test_every_line_in_order_in_few_writes():
    out = _Stdout()
    handler = LineBuffer(out, interval_s=0.05)
    log = _logger(handler, "order")
    try:
        for i in range(2000):
            log.info(f'{{"n": {i}}}')
        lines = _wait_lines(out, 2000)
    finally:
        handler.close()
    assert lines == [f'{{"n": {i}}}' for i in range(2000)]
    assert out.writes < 20  # per turn of the writer, not per line


def test_a_hanging_stdout_does_not_hold_the_caller():
    out = _Stdout()
    handler = LineBuffer(out, interval_s=0.01)
    log = _logger(handler, "hang")
    try:
        log.info("first")
        assert _wait_lines(out, 1) == ["first"]
        out.open.clear()  # the next write hangs
        log.info("second")
        assert out.stuck.wait(5)  # the writer is now stuck in write()
        start = time.monotonic()
        for i in range(500):
            log.info(f"more {i}")
        assert time.monotonic() - start < 0.5
        out.open.set()
        lines = _wait_lines(out, 502)
    finally:
        handler.close()
    assert lines == ["first", "second", *(f"more {i}" for i in range(500))]


def test_close_writes_what_is_left():
    out = _Stdout()
    handler = LineBuffer(out, interval_s=60)  # the writer would not turn within the test
    log = _logger(handler, "close")
    log.info("a")
    log.info("b")
    assert out.getvalue() == ""
    handler.close()
    assert out.getvalue() == "a\nb\n"


def test_filters_still_apply():
    out = _Stdout()
    handler = LineBuffer(out, interval_s=60)
    handler.addFilter(lambda record: "secret" not in record.getMessage())
    log = _logger(handler, "filters")
    log.info("kept")
    log.info("a secret")
    handler.close()
    assert out.getvalue() == "kept\n"


def test_close_gives_up_on_a_hanging_stdout(monkeypatch):
    """A stdout that never drains must not keep the process from exiting: close waits CLOSE_S for the writer,
    and logging's own flush at exit does not write beside a writer stuck in write()."""
    from nccr_guard.server import logs

    monkeypatch.setattr(logs, "CLOSE_S", 0.2)
    out = _Stdout()
    handler = LineBuffer(out, interval_s=0.01)
    log = _logger(handler, "stuck")
    out.open.clear()
    log.info("stuck line")
    assert out.stuck.wait(5)  # the writer is in write() now
    log.info("later line")
    start = time.monotonic()
    handler.flush()  # as logging.shutdown calls it
    handler.close()
    assert time.monotonic() - start < 2
    out.open.set()  # the writer finishes its write and, stopped, writes the rest
    assert _wait_lines(out, 2) == ["stuck line", "later line"]


def test_a_stdout_that_stops_draining_costs_bounded_memory():
    """Beyond max_lines waiting the oldest go, and the next write says how many, as a JSON line."""
    out = _Stdout()
    handler = LineBuffer(out, interval_s=0.01, max_lines=100)
    log = _logger(handler, "bounded")
    try:
        log.info("first")
        assert _wait_lines(out, 1) == ["first"]
        out.open.clear()
        log.info("in flight")
        assert out.stuck.wait(5)  # the writer holds "in flight" and hangs in write()
        for i in range(500):
            log.info(f"more {i}")
        assert len(handler._records) == 100
        out.open.set()
        lines = _wait_lines(out, 103)
    finally:
        handler.close()
    assert lines[:2] == ["first", "in flight"]
    assert json.loads(lines[2])["access_log_dropped"] == 400
    assert lines[3:] == [f"more {i}" for i in range(400, 500)]


def test_no_access_log_starts_no_writer_thread():
    """configure_logging is process-wide, so each case runs in a fresh interpreter."""
    code = (
        "import sys, threading; from nccr_guard.server.logs import configure_logging, access_log_dropped; "
        "configure_logging(True, access_log=sys.argv[1] == 'on'); "
        "print(sorted(t.name for t in threading.enumerate()), access_log_dropped())"
    )
    on, off = (subprocess.run([sys.executable, "-c", code, a], capture_output=True, text=True) for a in ("on", "off"))
    assert on.stdout.strip() == "['MainThread', 'access-log'] 0", on.stderr
    assert off.stdout.strip() == "['MainThread'] 0", off.stderr


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
