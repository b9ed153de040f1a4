"""Checks that run before anything heavy is imported or any port is bound, so a wrong path, a
swapped flag or a port another process holds fails at once with one line (the CLI exits 2).

Reads only directory entries and config.json; everything deeper (tensors, dtypes, shapes) is
the loader's `CheckpointError`, reported once the model loads.
"""

from __future__ import annotations

import errno
import json
import socket
from pathlib import Path

from server.settings import ServerSettings

FLAG_OF = {"causal-lm": "--model", "classifier": "--classifier"}


def preflight(settings: ServerSettings) -> None:
    """Cheap checks of --model/--classifier before the port is bound (ValueError, one line):
    the directory exists and holds a config.json, and the checkpoint is of the kind its flag
    serves. Everything deeper (tensors, dtypes) is the loader's CheckpointError."""
    for flag, path, kind in (("--model", settings.model, "causal-lm"),
                             ("--classifier", settings.classifier, "classifier")):
        if path is None:
            continue
        where = Path(path)
        if not where.exists():
            raise ValueError(f"{flag} {path}: no such directory")
        if not where.is_dir():
            raise ValueError(f"{flag} {path}: not a directory (give the checkpoint directory "
                             "that holds config.json)")
        config = where / "config.json"
        if not config.is_file():
            raise ValueError(f"{flag} {path}: no config.json (is this a checkpoint directory?)")
        try:
            archs = json.loads(config.read_text()).get("architectures") or []
        except (OSError, ValueError, AttributeError) as exc:
            raise ValueError(f"{flag} {path}: unreadable config.json ({exc})") from None
        found = kind_of_architecture(archs[0]) if archs else None
        if found is not None and found != kind:
            raise ValueError(f"{flag} {path} is a {found} checkpoint ({archs[0]}): pass it "
                             f"with {FLAG_OF[found]}")


def kind_of_architecture(name: str) -> str | None:
    """`...ForCausalLM` -> causal-lm, `...ForSequenceClassification` -> classifier."""
    if name.endswith("ForCausalLM"):
        return "causal-lm"
    if name.endswith("ForSequenceClassification"):
        return "classifier"
    return None


def check_port(host: str, port: int) -> None:
    """Can this process listen on host:port? A trial bind of every address the host resolves
    to, as uvicorn then binds them (SO_REUSEADDR; IPv6 sockets IPv6-only), released at once.
    ValueError, one line, when one fails. Without it a taken port is found only once the
    model has loaded: seconds to minutes of loading for uvicorn's one log line and exit 3."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ValueError(f"--host {host}: cannot resolve it ({exc.strerror})") from None
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                reason = (exc.strerror or str(exc)).lower()
                hint = " (another process is listening there)" \
                    if exc.errno == errno.EADDRINUSE else ""
                raise ValueError(f"--port {port}: cannot listen on {address[0]}: "
                                 f"{reason}{hint}") from None

