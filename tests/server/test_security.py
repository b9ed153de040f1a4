"""Secure defaults: key sources and their checks, refusing an exposed bind without a key, the
Host-header guard (DNS rebinding), CORS only when asked, and no file-system paths in /info."""

import asyncio
import os

import httpx
import pytest

from server.app import create_app
from server.security import (HostPolicy, StartupError, api_key_of, check_exposure, host_name,
                             is_loopback, redact_paths)
from server.settings import ServerSettings


def request(app, method: str, path: str, **kw) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:
            return await c.request(method, path, **kw)
    return asyncio.run(go())


def test_key_from_flag_env_or_file(tmp_path):
    assert api_key_of(ServerSettings()) is None
    assert api_key_of(ServerSettings.from_sources([], env={"CAMEX_API_KEY": "s3cret"})) == "s3cret"
    key_file = tmp_path / "key"
    key_file.write_text("from-a-file\n")
    os.chmod(key_file, 0o600)
    settings = ServerSettings.from_sources(["--api-key-file", str(key_file)], env={})
    assert api_key_of(settings) == "from-a-file"  # first line, newline dropped


@pytest.mark.parametrize("key,why", [("", "empty"), ("   ", "empty"),
                                     ("two words", "spaces"), ("tab\there", "spaces"),
                                     ("clé", "non-ASCII")])
def test_unusable_keys_are_refused(key, why):
    with pytest.raises(StartupError, match=why):
        api_key_of(ServerSettings(api_key=key))
    with pytest.raises(StartupError, match=why):
        create_app(ServerSettings(api_key=key))  # the app never starts with one either


def test_key_file_problems_say_which_file(tmp_path):
    with pytest.raises(StartupError, match="cannot read it"):
        api_key_of(ServerSettings(api_key_file=str(tmp_path / "missing")))
    empty = tmp_path / "empty"
    empty.write_text("")
    with pytest.raises(StartupError, match=f"--api-key-file {empty} is empty"):
        api_key_of(ServerSettings(api_key_file=str(empty)))


def test_an_empty_bearer_token_is_not_a_key():
    app = create_app(ServerSettings(api_key="k"))
    for header in ("Bearer ", "Bearer", "", "Basic k", "Bearer k2"):
        r = request(app, "GET", "/info", headers={"Authorization": header} if header else {})
        assert r.status_code == 401, header
    assert request(app, "GET", "/info", headers={"Authorization": "Bearer k"}).status_code == 200


@pytest.mark.parametrize("host,loopback", [("127.0.0.1", True), ("127.1.2.3", True),
                                           ("::1", True), ("localhost", True),
                                           ("0.0.0.0", False), ("::", False), ("", False),
                                           ("10.0.0.7", False)])
def test_loopback_addresses(host, loopback):
    assert is_loopback(host) is loopback


def test_exposed_bind_needs_a_key_or_an_explicit_opt_out():
    exposed = ServerSettings(host="0.0.0.0")
    with pytest.raises(StartupError, match="refusing to listen on 0.0.0.0 without an API key"):
        check_exposure(exposed, None)
    check_exposure(exposed, "a-key")
    check_exposure(ServerSettings(host="0.0.0.0", allow_unauthenticated=True), None)
    check_exposure(ServerSettings(host="127.0.0.1"), None)


def test_cli_refuses_in_one_line_before_binding(capsys):
    from server.cli import main

    assert main(["--host", "0.0.0.0", "--port", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--allow-unauthenticated" in err[0]
    assert main(["--api-key", "", "--port", "1"]) == 2
    assert "empty" in capsys.readouterr().err


def test_host_names_parse_like_browsers_send_them():
    assert host_name("Example.COM:8080") == "example.com"
    assert host_name("[::1]:80") == "::1"
    assert host_name("localhost.") == "localhost"


def test_loopback_server_answers_only_loopback_host_names():
    policy = HostPolicy.from_settings(ServerSettings(host="127.0.0.1"), bound=True)
    import socket

    for ok in ("127.0.0.1:8080", "localhost:8080", "[::1]:8080", "app.localhost", "",
               socket.gethostname() + ":8080"):
        assert policy.allows(ok), ok
    for rebound in ("attacker.example:8080", "127.0.0.1.nip.io", "localhost.evil.com"):
        assert not policy.allows(rebound), rebound
    # bound to every interface (behind a key), or an in-process app: any name
    assert HostPolicy.from_settings(ServerSettings(host="0.0.0.0"), bound=True).allows("x.y")
    assert HostPolicy.from_settings(ServerSettings()).allows("testserver")


def test_allowed_hosts_list_and_wildcards():
    policy = HostPolicy.from_settings(ServerSettings(allowed_hosts="api.example.com, .corp.net"))
    assert policy.allows("api.example.com:443") and policy.allows("a.b.corp.net")
    assert not policy.allows("example.com") and not policy.allows("corp.net.evil")
    assert HostPolicy.from_settings(ServerSettings(allowed_hosts="*")).allows("anything")


def test_disallowed_host_is_403_on_every_route_and_counted():
    app = create_app(ServerSettings(allowed_hosts="localhost"))
    r = request(app, "GET", "/health", headers={"Host": "rebind.example"})
    assert r.status_code == 403 and r.json()["error_type"] == "forbidden"
    assert "--allowed-hosts" in r.json()["error"]
    metrics = request(app, "GET", "/metrics", headers={"Host": "localhost"}).text
    assert 'camex_failures_total{reason="unauthorized"} 1.0' in metrics


def test_cors_is_off_by_default_and_opt_in_per_origin():
    preflight = {"Origin": "http://ui.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    off = create_app(ServerSettings())
    r = request(off, "OPTIONS", "/generate", headers=preflight)
    assert "access-control-allow-origin" not in r.headers
    on = create_app(ServerSettings(cors_origins="http://ui.example", api_key="k"))
    r = request(on, "OPTIONS", "/generate", headers=preflight)
    assert r.status_code == 200  # a preflight carries no key
    assert r.headers["access-control-allow-origin"] == "http://ui.example"
    r = request(on, "GET", "/info", headers={"Origin": "http://ui.example",
                                             "Authorization": "Bearer k"})
    assert r.headers["access-control-allow-origin"] == "http://ui.example"
    assert "x-request-id" in r.headers["access-control-expose-headers"]
    r = request(on, "OPTIONS", "/generate", headers={**preflight, "Origin": "http://evil"})
    assert r.headers.get("access-control-allow-origin") != "http://evil"


def test_paths_are_redacted_to_their_last_component():
    raw = {"trainer_out_dir": "/home/alice/runs/demo-lm",
           "training_data": "900 examples from /usr/share/games/fortunes/art, /srv/x/law",
           "url": "https://example.com/a/b", "ratio": "3/4 and/or", "n": 3,
           "nested": ["/opt/models/lm"]}
    assert redact_paths(raw) == {
        "trainer_out_dir": "demo-lm", "training_data": "900 examples from art, law",
        "url": "https://example.com/a/b", "ratio": "3/4 and/or", "n": 3, "nested": ["lm"]}


def test_info_shows_no_absolute_paths(tiny_lm_dir):
    from fastapi.testclient import TestClient

    from tests.server.test_health_inprocess import wait_ready

    app = create_app(ServerSettings(model=str(tiny_lm_dir), engine_process="off"))  # edited below
    with TestClient(app) as client:
        wait_ready(client)
        app.state.serving.lm.config.provenance["trainer_out_dir"] = "/home/alice/runs/demo-lm"
        text = client.get("/info").text
    assert "demo-lm" in text and "/home/alice" not in text and str(tiny_lm_dir) not in text
