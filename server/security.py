"""Secure defaults: where the API key comes from, when the server may run without one, which
Host headers it answers (DNS rebinding), and keeping file-system paths out of responses.

- The key comes from `--api-key` / `CAMEX_API_KEY` or from a file (`--api-key-file`, first
  line). A key on the command line is visible to every local user in `ps`; the environment
  and a file are not.
- Binding anything but a loopback address without a key is refused at start-up unless
  `--allow-unauthenticated` says the network is trusted.
- A server bound to loopback answers only Host headers that name loopback (`localhost`,
  `127.x.x.x`, `[::1]`) or this machine's host name: a web page whose DNS name is re-pointed
  at 127.0.0.1 (DNS rebinding) sends its own name and is refused. `--allowed-hosts` replaces
  that rule with a list.

Knows settings and strings only; the middleware applies the checks to requests.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from pathlib import Path

from server.settings import ServerSettings

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})
# A path with at least two components ("/a/b"), not part of a URL ("https://h/p") or a ratio.
ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~])/(?:[^\s/,;:'\"()\[\]]+/)+([^\s/,;:'\"()\[\]]+)")


class StartupError(ValueError):
    """A configuration the server refuses to start with; the message says what to do."""


def check_key(key: str, source: str) -> str:
    """The key if usable as a bearer token, else StartupError (empty keys authorise nothing)."""
    if not key.strip():
        raise StartupError(f"{source} is empty; an empty API key would let anyone in")
    if key != key.strip() or any(c.isspace() or not c.isprintable() or ord(c) > 126
                                 for c in key):
        raise StartupError(f"{source} contains spaces or non-ASCII/control characters; an API "
                           "key must be printable ASCII without spaces "
                           "(e.g. `openssl rand -hex 32`)")
    return key


def api_key_of(settings: ServerSettings) -> str | None:
    """The configured API key: `api_key` (flag or env), else the first line of `api_key_file`."""
    if settings.api_key is not None:
        return check_key(settings.api_key, "--api-key / CAMEX_API_KEY")
    if settings.api_key_file is None:
        return None
    path = Path(settings.api_key_file)
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise StartupError(f"--api-key-file {path}: cannot read it ({exc.strerror})") from None
    return check_key(lines[0] if lines else "", f"--api-key-file {path}")


def is_loopback(host: str) -> bool:
    """True when every address `host` names is a loopback address (127.0.0.0/8, ::1)."""
    name = host.strip("[]").lower()
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        pass
    if not name:  # "" binds every interface
        return False
    try:
        infos = socket.getaddrinfo(name, None)
    except OSError:
        return False  # uvicorn will fail to bind it and say so
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback
                               for i in infos)


def check_exposure(settings: ServerSettings, api_key: str | None) -> None:
    """Refuse to serve a non-loopback address without a key, unless explicitly allowed."""
    if api_key is not None or settings.allow_unauthenticated or is_loopback(settings.host):
        return
    raise StartupError(
        f"refusing to listen on {settings.host} without an API key: anyone who can reach this "
        "address could use the model. Set CAMEX_API_KEY or --api-key-file, or pass "
        "--allow-unauthenticated (CAMEX_ALLOW_UNAUTHENTICATED=1) on a network you trust")


class HostPolicy:
    """Which Host headers are answered. `names=None` means any."""

    def __init__(self, names: frozenset[str] | None, loopback_only: bool) -> None:
        self.names = names
        self.loopback_only = loopback_only

    @classmethod
    def from_settings(cls, settings: ServerSettings, bound: bool = False) -> HostPolicy:
        """`--allowed-hosts` when given; else, for a server `bound` to a loopback address
        (the CLI), loopback names only; else any (an in-process app has no address)."""
        if settings.allowed_hosts:
            names = frozenset(n.strip().lower().rstrip(".")
                              for n in settings.allowed_hosts.split(",") if n.strip())
            return cls(None if "*" in names else names, loopback_only=False)
        return cls(None, loopback_only=bound and is_loopback(settings.host))

    @property
    def enforced(self) -> bool:
        return self.loopback_only or self.names is not None

    def allows(self, host_header: str) -> bool:
        """`host_header` as sent (`name[:port]`, `[v6]:port`); a missing header is allowed
        (HTTP/1.0 clients; a browser always sends one)."""
        if not self.enforced or not host_header:
            return True
        name = host_name(host_header)
        if self.loopback_only:  # this machine's own name cannot be rebound by a web page
            return name in LOOPBACK_NAMES or name.endswith(".localhost") or \
                _loopback_ip(name) or name == socket.gethostname().lower()
        return name in self.names or any(  # ".example.com" / "*.example.com": subdomains
            n.lstrip("*").startswith(".") and name.endswith(n.lstrip("*")) for n in self.names)


def host_name(host_header: str) -> str:
    """`Example.com:8080` -> `example.com`; `[::1]:80` -> `::1`."""
    h = host_header.strip().lower()
    if h.startswith("["):
        return h[1:h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0].rstrip(".") if h.count(":") == 1 else h.rstrip(".")


def _loopback_ip(name: str) -> bool:
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def redact_paths(value):
    """Absolute file-system paths in strings (nested in dicts/lists too) -> their last
    component, so responses never reveal the server's directory layout."""
    if isinstance(value, str):
        return ABSOLUTE_PATH.sub(lambda m: m.group(1), value)
    if isinstance(value, dict):
        return {k: redact_paths(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_paths(v) for v in value)
    return value
