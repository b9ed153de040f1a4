"""`camex-server`: parse settings (flags > CAMEX_* env > defaults), check them, run uvicorn,
drain on SIGTERM.

Before the port is bound: the API key is resolved (`--api-key`, `CAMEX_API_KEY` or
`--api-key-file`), a non-loopback bind without one is refused (unless
`--allow-unauthenticated`), the checkpoint paths are checked, and so is the port (another
process listening there). Each problem is one line on stderr and exit code 2. A model that then
fails to load logs one error line (the traceback only with `--log-level debug`) and exits 1, as
does a server uvicorn could not start. On SIGTERM/SIGINT the drain of `server.shutdown` runs
and the process exits 0. Run: `python -m server.cli --model DIR --port 8080`.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence

import uvicorn

# Only light modules up here: the checks below must fail in a second, before torch loads, and
# the engine process must start before this one imports anything heavy.
from server.engine_launch import launch
from server.preflight import check_port, preflight
from server.security import HostPolicy, api_key_of, check_exposure, is_loopback
from server.settings import ServerSettings

log = logging.getLogger("camex.server")


class DrainingServer(uvicorn.Server):
    """uvicorn, with our drain started as its shutdown begins (see server.shutdown)."""

    def __init__(self, config: uvicorn.Config, on_shutdown: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_shutdown = on_shutdown

    async def shutdown(self, sockets=None) -> None:
        self.on_shutdown()
        await super().shutdown(sockets)


def check(argv: Sequence[str] | None) -> ServerSettings:
    """Settings that passed every start-up check; ValueError with a one-line reason."""
    settings = ServerSettings.from_sources(argv)
    check_exposure(settings, api_key_of(settings))
    preflight(settings)
    check_port(settings.host, settings.port)
    return settings


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = check(argv)
    except ValueError as exc:
        print(f"camex-server: error: {exc}", file=sys.stderr)
        return 2
    # The engine process imports and loads while this one imports the app (server.engine_launch)
    launched = launch(settings)
    from server.app import create_app
    from server.connections import fit_fd_limit, guarded_protocol
    from server.logs import adopt_library_logging, configure_logging
    from server.shutdown import uvicorn_grace

    configure_logging(settings.log_level)
    max_connections = fit_fd_limit(settings.max_connections)
    fatal: list[str] = []
    server: uvicorn.Server | None = None

    def on_fatal(message: str) -> None:
        fatal.append(message)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_fatal=on_fatal,
                     hosts=HostPolicy.from_settings(settings, bound=True), launched=launched)
    adopt_library_logging()
    has_key = api_key_of(settings) is not None
    app.state.connections.max_connections = max_connections
    config = uvicorn.Config(app, host=settings.host, port=settings.port, access_log=False,
                            log_config=None, lifespan="on",
                            http=guarded_protocol(app.state.connections),
                            timeout_keep_alive=settings.keep_alive_s,
                            timeout_graceful_shutdown=uvicorn_grace(settings.grace_s))
    server = DrainingServer(config, on_shutdown=app.state.serving.begin_drain)
    # uvicorn re-raises the signal it caught once shut down; with a Python-level handler in
    # place that re-raise is a no-op, so a graceful drain exits 0 instead of dying by SIGTERM.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: None)
    log.info("starting", extra={"host": settings.host, "port": settings.port,
                                "model": settings.model, "classifier": settings.classifier,
                                "api_key": has_key, "max_connections": max_connections})
    if not has_key and not is_loopback(settings.host):
        log.warning("serving without an API key on a non-loopback address "
                    "(--allow-unauthenticated)", extra={"host": settings.host})
    try:
        server.run()
    except SystemExit as exc:  # uvicorn could not start (the port taken since check_port, ...)
        log.error("the HTTP server did not start (its error is logged above)",
                  extra={"uvicorn_exit": exc.code})
        fatal.append("uvicorn did not start")
    code = 1 if fatal else 0
    if not fatal:
        log.info("stopped")
    if app.state.serving.loading:
        # Stopped before the model was in: the loader thread is still inside torch (reading
        # weights, compiling the native kernels on a first start), and finalizing the
        # interpreter under it aborts the process (SIGABRT, "terminate called without an
        # active exception", exit 134). Leave without finalizing, the logs flushed.
        log.info("the model was still loading: exiting without waiting for it")
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
