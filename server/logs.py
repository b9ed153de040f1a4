"""Structured logging: one JSON object per line on stderr, for the server, uvicorn and the
libraries alike.

Fields passed with `extra=` (request_id, route, status, duration_ms, ...) become top-level keys.
Whatever else reaches stderr would break a log shipper that parses every line as JSON, so:
Python warnings go through logging (`captureWarnings`); transformers' own stderr handler is
replaced by propagation (`adopt_library_logging`, once transformers is imported); and
`sys.stderr` itself becomes a writer that wraps any other line (a library's print, a progress
bar) into a JSON record from logger `stderr`. Output written by C code straight to file
descriptor 2 cannot be caught here.
"""

from __future__ import annotations

import io
import json
import logging
import sys
import threading
import time

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "asctime", "color_message"}  # uvicorn adds color_message (ANSI) to its records


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
               + f".{int(record.msecs):03d}Z",
               "level": record.levelname.lower(), "logger": record.name,
               "msg": record.getMessage()}
        out.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class JsonLinesWriter(io.TextIOBase):
    """A text stream that turns each complete line written to it into a JSON log record
    (level warning, logger `stderr`); carriage-return redraws keep only their last state."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        self._pending = ""
        self._lock = threading.Lock()
        self._local = threading.local()  # a failing handler reports to sys.stderr: no loop

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if getattr(self._local, "writing", False):
            return sys.__stderr__.write(text)
        with self._lock:
            self._pending += text
            *lines, self._pending = self._pending.split("\n")
        self._local.writing = True
        try:
            for line in lines:
                line = line.rsplit("\r", 1)[-1].rstrip()
                if line:
                    self.logger.warning(line)
        finally:
            self._local.writing = False
        return len(text)

    def flush(self) -> None:
        pass

    def fileno(self) -> int:
        """The real stderr's descriptor, for code that needs one (e.g. faulthandler): what
        is written there directly bypasses the JSON wrapping."""
        return sys.__stderr__.fileno()


def configure_logging(level: str = "info") -> None:
    """JSON lines on stderr for our loggers, uvicorn's (its access log is replaced by ours),
    Python warnings and stray writes to sys.stderr."""
    real_stderr = sys.__stderr__ if sys.stderr is None or isinstance(
        sys.stderr, JsonLinesWriter) else sys.stderr
    handler = logging.StreamHandler(real_stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    logging.captureWarnings(True)
    sys.stderr = JsonLinesWriter(logging.getLogger("stderr"))


def adopt_library_logging() -> None:
    """Route transformers' logger through ours (it installs its own plain-text handler)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()


def configure_engine_process_logging(level: str = "info") -> None:
    """The engine process's logging (see camex_runtime.engine.process): our JSON lines, with
    transformers' logger routed through them, on the stderr it shares with the server."""
    configure_logging(level)
    adopt_library_logging()
