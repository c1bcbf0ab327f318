"""The access log, written in one write per 0.1 s instead of one per request.

One line per request is a guarantee (fronts/gate.py: the request ID reaches the log), but written as
logging does it (a write and a flush per line, to a pipe that BentoML's process manager reads and
copies) it cost ~60 µs of CPU per LeNet request, 14 % of the worker's, and ~20 % of the req/s
(A/B under wrk, 1 worker, /classify: 445 vs 383 µs per request; BENCHMARKS.md, "The lean hot path").
Buffered, each line is formatted as the server's other lines are and written within `interval_s`;
a warning or worse, a full buffer, and exit write at once, so a crash loses no error line.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time


class Buffered(logging.Handler):
    def __init__(self, target: logging.StreamHandler, interval_s: float = 0.1, capacity: int = 1024) -> None:
        super().__init__()
        self.stream, self.interval_s, self.capacity = target.stream, interval_s, capacity
        self.setFormatter(target.formatter)
        self.lines: list[str] = []
        threading.Thread(target=self._every_interval, name="access-log", daemon=True).start()
        atexit.register(self.flush)

    def emit(self, record: logging.LogRecord) -> None:  # called with self.lock held (Handler.handle)
        try:
            self.lines.append(self.format(record))
            if record.levelno >= logging.WARNING or len(self.lines) >= self.capacity:
                self.flush()
        except Exception:  # noqa: BLE001 - logging's own contract: report, never raise
            self.handleError(record)

    def flush(self) -> None:
        with self.lock:
            lines, self.lines = self.lines, []
            if lines:
                self.stream.write("\n".join(lines) + "\n")
                self.stream.flush()

    def _every_interval(self) -> None:
        while True:
            time.sleep(self.interval_s)
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - a closed stream at exit; the next flush tries again
                pass


def install(target: logging.StreamHandler, name: str = "convserve.access") -> None:
    """Route `name`'s lines through a Buffered copy of `target` (instead of propagating to it)."""
    logger = logging.getLogger(name)
    if not any(isinstance(h, Buffered) for h in logger.handlers):
        logger.addHandler(Buffered(target))
        logger.propagate = False
