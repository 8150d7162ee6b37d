"""Logging for the server: service logs on stderr, the JSON access log (one line per request) on stdout.

The access log is written by a background thread (a QueueHandler in front of the stream): a profile under
load showed the stream write at 6 % of the event-loop thread, the server's bottleneck, and a slow stdout (a
pipe to a log shipper) would stall every request. (Throughput with stdout to a file did not change measurably:
wrk -c16, 3 runs each, within this machine's ±20 % noise.) Every
worker process of `--processes N` calls this itself (they are spawned, not forked, and inherit no handlers).
"""

from __future__ import annotations

import atexit
import logging
import queue
import sys
from logging.handlers import QueueHandler, QueueListener

_listener: QueueListener | None = None


class _AsIs(QueueHandler):
    """Queues a record unchanged: an access-log record is already its final line (no args, no exception), and
    QueueHandler's default copy-and-format would run on the event loop."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record


def configure_logging(json_logs: bool) -> None:
    global _listener
    fmt = (
        '{"ts":"%(asctime)s","level":"%(levelname)s","logger":"%(name)s","msg":"%(message)s"}'
        if json_logs
        else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.basicConfig(level=logging.INFO, format=fmt, stream=sys.stderr)
    if _listener is not None:  # configured already in this process
        return
    out = logging.StreamHandler(sys.stdout)
    out.setFormatter(logging.Formatter("%(message)s"))
    q: queue.SimpleQueue = queue.SimpleQueue()
    _listener = QueueListener(q, out)
    _listener.start()
    atexit.register(_listener.stop)  # flushes what is queued at exit
    access = logging.getLogger("nccr_guard.access")
    access.handlers = [_AsIs(q)]
    access.setLevel(logging.INFO)
    access.propagate = False
