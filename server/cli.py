"""`camex-server`: parse settings (flags > CAMEX_* env > defaults), run uvicorn, drain on SIGTERM.

On SIGTERM/SIGINT uvicorn stops accepting connections and lets in-flight requests finish for
`--grace-s` seconds; then the engines stop and the process exits 0. A model that fails to load
exits 1. Run: `python -m server.cli --model DIR --port 8080`.
"""

from __future__ import annotations

import logging
import signal
import sys
from typing import Optional, Sequence

import uvicorn

from server.app import create_app
from server.logs import configure_logging
from server.settings import ServerSettings

log = logging.getLogger("camex.server")


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        settings = ServerSettings.from_sources(argv)
    except ValueError as exc:
        print(f"camex-server: error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    fatal: list[str] = []
    server: Optional[uvicorn.Server] = None

    def on_fatal(message: str) -> None:
        fatal.append(message)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_fatal=on_fatal)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, access_log=False,
                            log_config=None, timeout_graceful_shutdown=int(settings.grace_s) or 1,
                            lifespan="on")
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal it caught once shut down; with a Python-level handler in
    # place that re-raise is a no-op, so a graceful drain exits 0 instead of dying by SIGTERM.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: None)
    log.info("starting", extra={"host": settings.host, "port": settings.port,
                                "model": settings.model, "classifier": settings.classifier})
    server.run()
    if fatal:
        log.error("exiting: model failed to load", extra={"error": fatal[0]})
        return 1
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
