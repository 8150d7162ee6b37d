"""Logging for the server: service logs on stderr, the JSON access log (one line per request) on stdout.

The access log is written by a background thread: a profile under load showed the stream write at 6 % of the
event-loop thread, the server's bottleneck, and a slow stdout (a pipe to a log shipper) would stall every
request. That thread wakes on a clock and writes what gathered since its last turn in one write
(`LineBuffer`), instead of being woken for every record: with logging's QueueHandler each line cost the
event loop a semaphore post that woke the writer (a futex call, often a context switch onto the core the
server needed), ~5 % of a busy worker process's samples, and the writer then took the GIL once per line
(docs/performance.md, "The access log's writer"). Every worker process of `--processes N` calls this itself
(they are spawned, not forked, and inherit no handlers).
"""

from __future__ import annotations

import atexit
import json
import logging
import sys
import threading
import time
from collections import deque
from typing import TextIO

FLUSH_S = 0.05  # how stale an access-log line may be before it reaches stdout
CLOSE_S = 5.0
MAX_LINES = 100_000  # lines held while stdout does not keep up (~30 MB of access lines); older ones are dropped
_access: LineBuffer | None = None


class LineBuffer(logging.Handler):
    """Collects records for a writer thread that, every `interval_s`, writes the messages gathered since its
    last turn in one write. Records are taken unformatted (an access-log record is already its final line: no
    args, no exception), so nothing but an append runs on the caller's thread, and without the handler lock:
    `deque.append` and `popleft` are atomic. `close` (also at exit) stops the thread and writes what is left.
    A process killed outright loses at most the last `interval_s` of lines. A stdout that stops draining (a
    stuck log shipper) must not grow the server's memory without bound: beyond `max_lines` waiting, the oldest
    are dropped, and the next write starts with one JSON line that says how many (`access_log_dropped`)."""

    def __init__(self, stream: TextIO, interval_s: float = FLUSH_S, max_lines: int = MAX_LINES) -> None:
        super().__init__()
        self.stream, self.interval_s = stream, interval_s
        self._records: deque[logging.LogRecord] = deque(maxlen=max_lines)
        self.dropped_total = 0  # since start; only the caller's thread counts (the metric reads it)
        self._reported = 0  # of those, told in an access_log_dropped line; only the writer counts
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="access-log", daemon=True)
        self._thread.start()

    def handle(self, record: logging.LogRecord) -> bool:
        if self.filters and not self.filter(record):
            return False
        self.emit(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        if len(self._records) == self._records.maxlen:
            self.dropped_total += 1  # the append below pushes the oldest out
        self._records.append(record)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._write_gathered()
        self._write_gathered()  # what came before close

    def flush(self) -> None:
        """Writes what is gathered only once the writer has stopped; until then the writer's next turn does.
        Two writers at once could reorder lines, and logging's own flush at exit must not hang on a stdout the
        writer is stuck in."""
        if not self._thread.is_alive():
            self._write_gathered()

    def _write_gathered(self) -> None:
        lines, record = [], None
        if dropped := self.dropped_total - self._reported:
            self._reported += dropped
            lines.append(json.dumps({"ts": round(time.time(), 3), "access_log_dropped": dropped}))
        while self._records:
            record = self._records.popleft()
            lines.append(record.getMessage())
        if not lines:
            return
        try:
            self.stream.write("\n".join(lines) + "\n")
            self.stream.flush()
        except Exception:  # a closed or broken stdout: logging's own report, as StreamHandler would
            if record is not None:
                self.handleError(record)

    def close(self) -> None:
        """Stops the writer, which writes what is left; one stuck in a hanging stdout is given `CLOSE_S` and
        then left behind (a daemon thread), so that the process can still exit."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(CLOSE_S)
        self.flush()
        super().close()


def access_log_dropped() -> int:
    """Access-log lines this process has dropped because stdout did not keep up (0 without an access log)."""
    return _access.dropped_total if _access is not None else 0


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
    """Service logs on stderr in `json_logs`' format; with `access_log`, the access log's writer on stdout, holding
    at most `max_lines` unwritten. Without it no writer thread runs (it would wake every `FLUSH_S` for nothing)."""
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
    _access = LineBuffer(sys.stdout, max_lines=max_lines)
    atexit.register(_access.close)  # writes what is gathered at exit
    access = logging.getLogger("nccr_guard.access")
    access.handlers = [_access]
    access.setLevel(logging.INFO)
    access.propagate = False
