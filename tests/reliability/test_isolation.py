"""A /classify flood must not starve anything else: probes, scrapes, /info and generation
answer while every classify worker is stuck and the classify queue is full.

In-process (lifespan + httpx's ASGI transport) with the tiny models. The classifier's model
lock is held by the test (a hack standing for a forward that does not end), so the flood is
deterministic: before the classify queue had its own threads, 40 such calls took every thread
of anyio's shared pool and /health never answered.
"""

import asyncio

import httpx
import pytest

from server.app import create_app
from server.settings import ServerSettings

pytestmark = pytest.mark.reliability
PROBE_TIMEOUT_S = 5.0  # what a Kubernetes liveness probe in deploy/k8s waits


async def wait_ready(client: httpx.AsyncClient) -> None:
    for _ in range(600):
        if (await client.get("/ready")).status_code == 200:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("never ready")


async def until(predicate, timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.02)


def test_classify_flood_leaves_probes_metrics_and_generation_alone(tiny_lm_dir,
                                                                   tiny_classifier_dir):
    settings = ServerSettings(model=str(tiny_lm_dir), classifier=str(tiny_classifier_dir),
                              max_waiting=60, queue_timeout_s=60)
    app = create_app(settings)
    state = app.state.serving

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=transport, base_url="http://127.0.0.1", timeout=120) as client:
            await wait_ready(client)
            lock = state.classifier._model_lock
            lock.acquire()  # every classify forward now blocks on its worker thread
            try:
                texts = {"inputs": ["the quick brown fox"] * 8}
                flood = [asyncio.create_task(client.post("/classify", json=texts))
                         for _ in range(settings.classify_workers + settings.max_waiting)]
                await until(lambda: state.classify_queue.waiting == settings.max_waiting)
                over = await client.post("/classify", json=texts)
                assert over.status_code == 429 and over.headers["Retry-After"]
                for path in ("/health", "/ready", "/metrics", "/info"):
                    r = await asyncio.wait_for(client.get(path), PROBE_TIMEOUT_S)
                    assert r.status_code == 200, (path, r.text)
                gen = await asyncio.wait_for(client.post("/generate", json={
                    "inputs": "hello", "parameters": {"max_new_tokens": 4}}), 60)
                assert gen.status_code == 200
            finally:
                lock.release()
            codes = [r.status_code for r in await asyncio.gather(*flood)]
            assert codes == [200] * len(flood)  # the queued calls all ran once unblocked
            assert state.classify_queue.running == 0 and state.classify_queue.waiting == 0

    asyncio.run(go())


def test_queued_classify_times_out_with_504_and_counts(tiny_classifier_dir):
    settings = ServerSettings(classifier=str(tiny_classifier_dir), classify_workers=1,
                              queue_timeout_s=0.5)
    app = create_app(settings)
    state = app.state.serving

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=transport, base_url="http://127.0.0.1", timeout=60) as client:
            await wait_ready(client)
            lock = state.classifier._model_lock
            lock.acquire()
            try:
                first = asyncio.create_task(client.post("/classify", json={"inputs": "a"}))
                await until(lambda: state.classify_queue.running == 1)
                late = await client.post("/classify", json={"inputs": "b"})
            finally:
                lock.release()
            assert (await first).status_code == 200
            assert late.status_code == 504 and late.json()["error_type"] == "queue_timeout"
            metrics = (await client.get("/metrics")).text
            assert 'camex_failures_total{reason="timeout"} 1.0' in metrics

    asyncio.run(go())


def test_generation_beyond_max_concurrent_is_429_before_the_body_is_read(tiny_lm_dir):
    """At max_batch_size + max_waiting generations in flight (TGI's max_concurrent_requests,
    as /info says) the next one is refused from its headers alone: even an unparsable body
    gets the 429, so an overloaded server spends no thread and no tokenizer on it."""
    settings = ServerSettings(model=str(tiny_lm_dir), max_batch_size=1, max_waiting=2,
                              engine_process="off")  # its model lock is held below
    app = create_app(settings)
    state = app.state.serving

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=transport, base_url="http://127.0.0.1", timeout=60) as client:
            await wait_ready(client)
            info = (await client.get("/info")).json()
            assert info["max_concurrent_requests"] == 3
            lock = state.lm._model_lock
            lock.acquire()  # the engine cannot step: admitted requests stay in flight
            try:
                body = {"inputs": "hi", "parameters": {"max_new_tokens": 2}}
                held = [asyncio.create_task(client.post(path, json=body))
                        for path in ("/generate", "/generate_stream", "/")]
                await until(lambda: state.lm.stats().waiting == 3 or
                            state.lm.stats().waiting + state.lm.stats().running == 3)
                refused = await client.post("/v1/completions", content=b"{not json",
                                            headers={"content-type": "application/json"})
                assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
                # an OpenAI route: OpenAI's error shape, decided before the body was read
                assert refused.json()["error"]["type"] == "rate_limit_error"
                assert refused.json()["error"]["code"] == "overloaded"
                assert (await client.get("/health")).status_code == 200  # not generation
            finally:
                lock.release()
            assert [r.status_code for r in await asyncio.gather(*held)] == [200, 200, 200]
            after = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
            assert after.status_code == 200  # the bound is released with the requests
            metrics = (await client.get("/metrics")).text
            assert 'camex_failures_total{reason="overloaded"} 1.0' in metrics

    asyncio.run(go())
