"""The HTTP layer without a model: auth, body limit, error bodies, request ids, probes, metrics.

The app is driven in-process through httpx's ASGI transport without running its lifespan, so
no engine is loaded: generation answers 503 (not ready), which is itself a behaviour to check.
"""

import asyncio

import httpx
import pytest

from server.app import create_app
from server.settings import ServerSettings


def call(settings: ServerSettings, method: str, path: str, app=None, **kw) -> httpx.Response:
    app = app or create_app(settings)

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            resp = await client.request(method, path, **kw)
            metrics = await client.get("/metrics")
            return resp, metrics.text
    resp, metrics = asyncio.run(go())
    resp.metrics_text = metrics
    return resp


def settings(**kw) -> ServerSettings:
    return ServerSettings.from_sources([], env={}).__class__(**kw)


def test_validation_error_is_json_with_field_names():
    r = call(settings(), "POST", "/generate", json={"inputs": "hi", "parameters": {"top_p": 2}})
    assert r.status_code == 422
    body = r.json()
    assert body["error_type"] == "validation" and "parameters.top_p" in body["error"]
    assert 'camex_failures_total{reason="validation"} 1.0' in r.metrics_text
    assert 'camex_requests_total{route="/generate",status="422"} 1.0' in r.metrics_text


@pytest.mark.parametrize("body", [b"{nope", b'{"inputs": "\xff\xfe"}', b"\xff\xfe\x00"],
                         ids=["malformed-json", "invalid-utf8-in-json", "binary"])
def test_unparsable_body_is_400_like_tgi_and_openai(body):
    r = call(settings(), "POST", "/generate", content=body,
             headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error_type"] == "validation"
    assert 'camex_failures_total{reason="validation"} 1.0' in r.metrics_text


def test_well_formed_json_against_the_schema_stays_422():
    r = call(settings(), "POST", "/generate", json={"inputs": 3})
    assert r.status_code == 422 and r.json()["error_type"] == "validation"


def test_not_ready_is_503_with_retry_after():
    r = call(settings(), "POST", "/generate", json={"inputs": "hi"})
    assert r.status_code == 503 and r.json()["error_type"] == "unavailable"
    assert "Retry-After" in r.headers
    assert call(settings(), "GET", "/ready").status_code == 503


def test_body_limit_is_413_before_parsing():
    r = call(settings(max_body_bytes=100), "POST", "/generate", json={"inputs": "x" * 200})
    assert r.status_code == 413
    assert r.json() == {"error": "request body exceeds the limit of 100 bytes",
                        "error_type": "payload_too_large"}


@pytest.mark.parametrize("auth,status", [(None, 401), ("Bearer wrong", 401),
                                         ("Basic secret", 401), ("Bearer secret", 503)])
def test_api_key(auth, status):
    headers = {"authorization": auth} if auth else {}
    r = call(settings(api_key="secret"), "POST", "/generate", json={"inputs": "hi"},
             headers=headers)
    assert r.status_code == status
    if status == 401:
        assert r.json()["error_type"] == "unauthorized"
        assert r.headers["WWW-Authenticate"] == "Bearer"
        assert 'camex_failures_total{reason="unauthorized"} 1.0' in r.metrics_text
        assert 'camex_requests_total{route="/generate",status="401"} 1.0' in r.metrics_text


def test_probes_and_metrics_need_no_key():
    assert call(settings(api_key="secret"), "GET", "/metrics").status_code == 200


def test_request_id_is_honoured_or_made():
    r = call(settings(), "GET", "/info", headers={"x-request-id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    r = call(settings(), "GET", "/info", headers={"x-request-id": "bad id with spaces"})
    assert len(r.headers["x-request-id"]) == 32


def test_unknown_route_is_json_404():
    r = call(settings(), "GET", "/nope")
    assert r.status_code == 404 and r.json()["error_type"] == "not_found"
    assert 'route="unmatched"' in r.metrics_text


@pytest.mark.parametrize("path,raw", [
    ("/classify", '{"inputs": "hi \\ud800"}'), ("/classify", '{"inputs": ["ok", "\\udc00"]}'),
    ("/v1/completions", '{"prompt": "hi \\ud800"}'),
    ("/v1/completions", '{"prompt": "hi", "stop": "\\ud800"}'),
    ("/generate", '{"inputs": "hi \\ud800"}'),
])
def test_lone_surrogate_is_422_not_500(path, raw):
    # a JSON \u escape can name half a UTF-16 pair, which no tokenizer accepts
    r = call(settings(), "POST", path, content=raw.encode(),
             headers={"content-type": "application/json"})
    body = r.json()
    assert r.status_code == 422
    message = body["error"]["message"] if path.startswith("/v1/") else body["error"]
    assert "unicode" in message.lower()


def test_unexpected_exception_is_opaque_500_with_the_request_id(caplog):
    app = create_app(settings())

    async def boom():
        raise RuntimeError("secret detail")
    app.add_api_route("/boom", boom)
    with caplog.at_level("ERROR", logger="camex.server"):
        r = call(settings(), "GET", "/boom", app=app, headers={"x-request-id": "req-500"})
    assert r.status_code == 500 and r.headers["x-request-id"] == "req-500"
    assert r.json() == {"error": "internal server error", "error_type": "internal"}
    assert 'camex_failures_total{reason="internal"} 1.0' in r.metrics_text
    assert 'camex_requests_total{route="/boom",status="500"} 1.0' in r.metrics_text
    assert [rec.getMessage() for rec in caplog.records if rec.exc_info] == ["unhandled error"]
