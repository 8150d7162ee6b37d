"""Logging for the server: service logs on stderr, the JSON access log (one line per request) on stdout.

The access log goes through the standard library's `QueueHandler` and `QueueListener`: the event loop only
puts the record on a queue, and the listener's thread writes it, so a slow stdout (a pipe to a log shipper)
does not stall requests (docs/decisions/010-access-log-writer.md). At exit the listener writes what is queued;
a stdout that never drains then holds the exit until the process is killed (as an orchestrator does after its
grace period). Every worker process of `--processes N` calls this itself (they are spawned, not forked, and
inherit no handlers).
"""

from __future__ import annotations

import atexit
import json
import logging
import queue
import sys
from logging.handlers import QueueHandler, QueueListener
from typing import TextIO

MAX_LINES = 100_000  # lines held while stdout does not keep up (~30 MB of access lines); newer ones are dropped
_access: BoundedQueueHandler | None = None


class BoundedQueueHandler(QueueHandler):
    """A `QueueHandler` that holds at most `max_lines` records: a stdout that stops draining (a stuck log
    shipper) must not grow the server's memory without bound. Beyond them a record is dropped and counted in
    `dropped` (exported as nccr_guard_access_log_dropped_total) instead of raising queue.Full."""

    def __init__(self, q: queue.SimpleQueue, max_lines: int = MAX_LINES) -> None:
        super().__init__(q)
        self.max_lines = max_lines
        self.dropped = 0  # since start; only the caller's thread counts (the metric reads it)

    def enqueue(self, record: logging.LogRecord) -> None:
        if self.queue.qsize() >= self.max_lines:
            self.dropped += 1
        else:
            self.queue.put_nowait(record)


def access_log_dropped() -> int:
    """Access-log lines this process has dropped because stdout did not keep up (0 without an access log)."""
    return _access.dropped if _access is not None else 0


def access_logging(stream: TextIO, max_lines: int = MAX_LINES) -> tuple[BoundedQueueHandler, QueueListener]:
    """The access log's handler (for the event loop) and its started listener, which writes each record's message
    (already its JSON line) to `stream`."""
    q: queue.SimpleQueue = queue.SimpleQueue()
    listener = QueueListener(q, logging.StreamHandler(stream))  # formats as "%(message)s"
    listener.start()
    return BoundedQueueHandler(q, max_lines), listener


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, msg, and `exc` with the traceback if there is one. Every
    line parses whatever the message holds (quotes, newlines: a library's message, a path), and a traceback stays
    inside its record's line instead of following it as plain text."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        return json.dumps(out)


# Libraries whose INFO lines would repeat the access log: httpx writes one per upstream request of the sidecar.
QUIET = ("httpx", "httpcore")


def configure_logging(json_logs: bool, access_log: bool = True, max_lines: int = MAX_LINES) -> None:
    """Service logs on stderr in `json_logs`' format; with `access_log`, the access log's listener on stdout,
    holding at most `max_lines` unwritten. Without it no listener thread runs."""
    global _access
    handler = logging.StreamHandler(sys.stderr)
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler.setFormatter(JsonFormatter() if json_logs else logging.Formatter(fmt))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    for name in QUIET:  # their warnings and errors still come through
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.captureWarnings(True)  # a library's warnings.warn as a record of the log (py.warnings), not raw stderr
    if _access is not None or not access_log:  # configured already in this process, or not wanted
        return
    _access, listener = access_logging(sys.stdout, max_lines)
    atexit.register(listener.stop)  # writes what is queued, before logging.shutdown (atexit runs in reverse)
    access = logging.getLogger("nccr_guard.access")
    access.handlers = [_access]
    access.setLevel(logging.INFO)
    access.propagate = False
