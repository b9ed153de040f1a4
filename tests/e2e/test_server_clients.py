"""End to end: a real `camex-server` process with tiny checkpoints, driven by unmodified clients
(huggingface_hub.InferenceClient, text_generation.Client, openai) and raw httpx.

One server for the module (LM + classifier); every test talks over 127.0.0.1.
"""

import json

import httpx
import pytest

from tests.deploy.interface_metrics import interface_metrics
from tests.server.live_server import live_server, value

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(tiny_lm_dir, tiny_classifier_dir, tmp_path_factory):
    with live_server(tmp_path_factory.mktemp("srv"), "--model", str(tiny_lm_dir), "--classifier",
                     str(tiny_classifier_dir), "--max-batch-size", "4",
                     "--model-id", "tiny-camex", "--strategy", "merged") as srv:
        yield srv


def test_inference_client_plain_details_and_stream(server):
    from huggingface_hub import InferenceClient

    client = InferenceClient(base_url=server.base_url)
    text = client.text_generation("the quick brown", max_new_tokens=6)
    assert isinstance(text, str)
    out = client.text_generation("the quick brown", max_new_tokens=6, details=True)
    assert out.generated_text == text  # greedy: same text
    d = out.details
    assert d.finish_reason in ("length", "eos_token") and d.generated_tokens == len(d.tokens)
    assert 1 <= d.generated_tokens <= 6 and all(t.logprob <= 0 for t in d.tokens)
    streamed = list(client.text_generation("the quick brown", max_new_tokens=6, details=True,
                                           stream=True))
    assert [s.token.id for s in streamed] == [t.id for t in d.tokens]
    assert all(s.generated_text is None for s in streamed[:-1])
    assert streamed[-1].generated_text == text
    assert streamed[-1].details.generated_tokens == d.generated_tokens
    pieces = client.text_generation("the quick brown", max_new_tokens=6, stream=True)
    assert "".join(pieces) == text


def test_text_generation_client(server):
    from text_generation import Client

    client = Client(server.base_url)
    resp = client.generate("hello world", max_new_tokens=5, seed=3, do_sample=True)
    assert resp.details.seed == 3 and resp.details.generated_tokens == len(resp.details.tokens)
    again = client.generate("hello world", max_new_tokens=5, seed=3, do_sample=True)
    assert again.generated_text == resp.generated_text  # same seed, same tokens
    events = list(client.generate_stream("hello world", max_new_tokens=5))
    greedy = client.generate("hello world", max_new_tokens=5)
    assert events[-1].generated_text == greedy.generated_text
    assert events[-1].details.finish_reason == greedy.details.finish_reason


def test_tgi_frequency_penalty_and_typical_p_through_the_clients(server):
    """Both TGI clients send these in `parameters`; the server answers with them applied:
    the penalty moves the greedy answer, typical_p samples (reported seed, reproducible)."""
    from huggingface_hub import InferenceClient
    from text_generation import Client

    hub, tgi = InferenceClient(base_url=server.base_url), Client(server.base_url)
    prompt, n = "the the the the", 8
    plain = hub.text_generation(prompt, max_new_tokens=n, details=True)
    penalised = hub.text_generation(prompt, max_new_tokens=n, details=True,
                                    frequency_penalty=2.0)
    assert penalised.generated_text != plain.generated_text
    assert tgi.generate(prompt, max_new_tokens=n, frequency_penalty=2.0).generated_text == \
        penalised.generated_text
    typical = tgi.generate(prompt, max_new_tokens=n, typical_p=0.5, seed=5)
    assert typical.details.seed == 5
    assert hub.text_generation(prompt, max_new_tokens=n, typical_p=0.5,
                               seed=5) == typical.generated_text


def test_generate_raw_sse_format_and_headers(server):
    body = {"inputs": "hello world", "parameters": {"max_new_tokens": 4, "details": True}}
    with httpx.stream("POST", server.base_url + "/generate_stream", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        assert int(r.headers["x-prompt-tokens"]) > 0
        events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
    assert set(events[0]) == {"index", "token", "top_tokens", "generated_text", "details"}
    assert set(events[0]["token"]) == {"id", "text", "logprob", "special"}
    assert events[0]["generated_text"] is None and events[0]["details"] is None
    assert [e["index"] for e in events] == list(range(1, len(events) + 1))
    final = events[-1]
    assert final["generated_text"] == "".join(e["token"]["text"] for e in events)
    assert final["details"]["generated_tokens"] == len(events)
    r = httpx.post(server.base_url + "/generate", json=body, headers={"x-request-id": "req-1"})
    assert r.headers["x-request-id"] == "req-1"
    assert int(r.headers["x-generated-tokens"]) == r.json()["details"]["generated_tokens"]
    for h in ("x-queue-time", "x-inference-time", "x-time-per-token", "x-prompt-tokens"):
        assert int(r.headers[h]) >= 0


def test_compat_route_and_full_text(server):
    body = {"inputs": "hello", "parameters": {"max_new_tokens": 3, "return_full_text": True}}
    r = httpx.post(server.base_url + "/", json=body)
    assert r.status_code == 200 and isinstance(r.json(), list)
    assert r.json()[0]["generated_text"].startswith("hello")


def test_return_routing(server, tiny_lm_dir):
    cfg = json.loads((tiny_lm_dir / "config.json").read_text())
    body = {"inputs": "the quick brown fox jumps", "parameters": {
        "max_new_tokens": 6, "return_routing": True, "routing": "segment"}}
    r = httpx.post(server.base_url + "/generate", json=body).json()
    routing = r["details"]["routing"]
    assert routing["mode"] == "segment" and len(routing["layers"]) >= 1
    for layer in routing["layers"]:
        for seg in layer["segments"]:
            assert len(seg["scores"]) == cfg["num_experts"]
            assert abs(sum(seg["scores"]) - 1) < 1e-4 and seg["end"] > seg["start"]


def test_validation_errors_say_the_numbers(server):
    r = httpx.post(server.base_url + "/generate",
                   json={"inputs": "hi " * 500, "parameters": {"max_new_tokens": 2}})
    assert r.status_code == 422 and r.json()["error_type"] == "validation"
    assert any(ch.isdigit() for ch in r.json()["error"])
    r = httpx.post(server.base_url + "/generate",
                   json={"inputs": "hi", "parameters": {"max_new_tokens": 100000}})
    assert r.status_code == 422 and "100" in r.json()["error"]


def test_classify_single_and_batch(server):
    r = httpx.post(server.base_url + "/classify", json={"inputs": "the lazy dog"})
    single = r.json()
    assert r.status_code == 200 and {s["label"] for s in single} == {"animals", "science",
                                                                     "greeting"}
    scores = [s["score"] for s in single]
    assert scores == sorted(scores, reverse=True) and abs(sum(scores) - 1) < 1e-4
    texts = ["the lazy dog", "hello world", "curvature aware merging"]
    batch = httpx.post(server.base_url + "/classify", json={"inputs": texts}).json()
    assert len(batch) == 3  # batched (padded) == alone
    assert [s["label"] for s in batch[0]] == [s["label"] for s in single]
    assert [s["score"] for s in batch[0]] == pytest.approx(scores, abs=1e-4)
    raw = httpx.post(server.base_url + "/classify",
                     json={"inputs": texts, "raw_scores": True}).json()
    assert len(raw) == 3
    # TEI's route and its request fields: the same answers
    tei = httpx.post(server.base_url + "/predict", json={"inputs": texts, "raw_scores": True,
                                                         "truncation_direction": "Right"})
    assert tei.status_code == 200 and tei.json() == raw
    left = httpx.post(server.base_url + "/predict", json={"inputs": "x", "truncate": True,
                                                          "truncation_direction": "Left"})
    assert left.status_code == 422 and "only `Right` truncation" in left.json()["error"]
    long_text = "the lazy dog " * 200
    too_long = httpx.post(server.base_url + "/classify", json={"inputs": long_text})
    assert too_long.status_code == 422 and any(c.isdigit() for c in too_long.json()["error"])
    cut = httpx.post(server.base_url + "/classify", json={"inputs": long_text, "truncate": True})
    assert cut.status_code == 200 and len(cut.json()) == 3
    too_many = httpx.post(server.base_url + "/classify", json={"inputs": ["a"] * 33})
    assert too_many.status_code == 422 and "33" in too_many.json()["error"]


def test_openai_completions_plain_and_stream(server):
    from openai import NotFoundError, OpenAI

    client = OpenAI(base_url=server.base_url + "/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == ["tiny-camex"]
    card = client.models.retrieve("tiny-camex")  # OpenAI's retrieve: the same card
    assert card.model_dump() == client.models.list().data[0].model_dump()
    with pytest.raises(NotFoundError, match="does not exist: this server serves `tiny-camex`"):
        client.models.retrieve("org/other-model")  # (a name with a slash reaches the route)
    out = client.completions.create(model="tiny-camex", prompt="hello world", max_tokens=5,
                                    temperature=0)
    choice = out.choices[0]
    assert choice.finish_reason in ("length", "stop") and out.usage.completion_tokens <= 5
    chunks = list(client.completions.create(model="tiny-camex", prompt="hello world",
                                            max_tokens=5, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason


def test_openai_sampling_controls_through_the_client(server, tiny_lm_dir):
    """What the `openai` client sends for logit_bias and the penalties, and vLLM's extensions
    through `extra_body`: a biased token is forced, a stop id ends the choice once min_tokens
    allow it, streamed as the plain answer. (Chat carries the same fields: in-process tests.)"""
    from openai import OpenAI
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_lm_dir))
    forced = tok("hello world", add_special_tokens=False)["input_ids"][-1]
    client = OpenAI(base_url=server.base_url + "/v1", api_key="unused")
    kw = dict(model="tiny-camex", prompt="hello world", max_tokens=6, temperature=0,
              logit_bias={str(forced): 100}, presence_penalty=0.5, frequency_penalty=0.5,
              extra_body={"min_tokens": 2, "stop_token_ids": [forced], "min_p": 0.1})
    out = client.completions.create(**kw)
    assert out.usage.completion_tokens == 3 and out.choices[0].finish_reason == "stop"
    assert out.choices[0].text.endswith(tok.decode([forced]))
    chunks = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == out.choices[0].text
    assert out.choices[0].stop_reason == chunks[-1].choices[0].stop_reason == forced  # vLLM's
    # allowed_token_ids and skip_special_tokens: EOS alone, its text shown
    eos = client.completions.create(
        model="tiny-camex", prompt="hi", max_tokens=3, temperature=0,
        extra_body={"allowed_token_ids": [tok.eos_token_id], "skip_special_tokens": False})
    assert eos.choices[0].text == tok.eos_token and eos.choices[0].finish_reason == "stop"
    assert eos.choices[0].stop_reason is None


def test_info_and_metrics_count_the_traffic(server):
    info = httpx.get(server.base_url + "/info").json()
    assert info["model_id"] == "tiny-camex" and info["max_batch_size"] == 4
    assert info["waiting_served_ratio"] == 1.2  # TGI's key; the engine's own setting below
    assert info["models"]["causal-lm"]["waiting_served_ratio"] == 1.2
    for key in ("num_experts", "segment_len", "routing", "max_input_tokens", "max_total_tokens",
                "version"):
        assert info[key] is not None, key
    before = server.metrics()
    n, tokens = 3, 0
    for i in range(n):
        r = httpx.post(server.base_url + "/generate", json={"inputs": f"hello {i}", "parameters":
                       {"max_new_tokens": 4, "details": True}})
        tokens += r.json()["details"]["generated_tokens"]
    httpx.post(server.base_url + "/classify", json={"inputs": ["a dog", "a cat"]})
    httpx.post(server.base_url + "/generate", json={"inputs": ""})  # 422
    after = server.metrics()

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("camex_requests_total", route="/generate", status="200") == n
    assert delta("camex_requests_total", route="/generate", status="422") == 1
    assert delta("camex_request_duration_seconds_count", route="/generate") == n + 1
    assert delta("camex_failures_total", reason="validation") == 1
    assert delta("camex_generated_tokens_total") == tokens
    assert delta("camex_request_generated_tokens_count") == n
    assert delta("camex_e2e_latency_seconds_count") == n
    assert delta("camex_time_to_first_token_seconds_count") == n
    assert delta("camex_queue_time_seconds_count") == n
    assert delta("camex_inter_token_latency_seconds_count") == tokens - n
    assert delta("camex_classified_sequences_total") == 2
    assert delta("camex_batch_size_count") >= tokens // 4
    exposed = {k[0] for k in after}
    for spec in interface_metrics().values():  # the catalogue of docs/INTERFACES.md §3
        missing = spec.series() - exposed
        assert not missing, f"{spec.name}: {missing}"
    labels = {dict(k[1]).get("reason") for k in after if k[0] == "camex_failures_total"}
    assert labels >= {"validation", "overloaded", "dropped", "timeout", "unauthorized",
                      "internal"}
    assert value(after, "camex_engine_up") == 1
    # --strategy merged: every segment's merge goes through the cache
    assert delta("camex_merge_cache_misses_total") > 0
    assert delta("camex_merge_duration_seconds_count") == delta("camex_merge_cache_misses_total")
    assert delta("camex_router_score_count", layer="0", expert="0") > 0


def test_classify_parameters_top_k_and_function_to_apply(server):
    """The Hugging Face Inference API's parameters on TEI's routes: `top_k` keeps the best K,
    `function_to_apply` turns the logits (`raw_scores`) into sigmoid or softmax scores."""
    import math

    url, text = server.base_url + "/classify", "the lazy dog"
    probs = httpx.post(url, json={"inputs": text}).json()
    logits = {s["label"]: s["score"] for s in
              httpx.post(url, json={"inputs": text, "raw_scores": True}).json()}

    def ask(**parameters):
        r = httpx.post(url, json={"inputs": text, "parameters": parameters})
        assert r.status_code == 200, r.text
        return [(s["label"], s["score"]) for s in r.json()]

    assert ask(top_k=2) == [(s["label"], s["score"]) for s in probs[:2]]
    assert ask(top_k=50) == [(s["label"], s["score"]) for s in probs]
    # this checkpoint's own function: the same scores
    assert ask(function_to_apply="softmax") == [(s["label"], s["score"]) for s in probs]
    sig = ask(function_to_apply="sigmoid")
    assert dict(sig) == pytest.approx({k: 1 / (1 + math.exp(-v)) for k, v in logits.items()})
    assert [p for _, p in sig] == sorted((p for _, p in sig), reverse=True)
    assert dict(ask(function_to_apply="none", top_k=1)) == {
        max(logits, key=logits.get): max(logits.values())}
    conflict = httpx.post(url, json={"inputs": text, "raw_scores": True,
                                     "parameters": {"function_to_apply": "sigmoid"}})
    assert conflict.status_code == 422 and "raw_scores" in conflict.json()["error"]
    for bad in ({"top_k": 0}, {"function_to_apply": "softmax2"}, {"topk": 2}):
        r = httpx.post(url, json={"inputs": text, "parameters": bad})
        assert r.status_code == 422 and r.json()["error_type"] == "validation"


@pytest.fixture(scope="module")
def classifier_only(tiny_classifier_dir, tmp_path_factory):
    with live_server(tmp_path_factory.mktemp("clf"), "--classifier",
                     str(tiny_classifier_dir)) as srv:
        yield srv


def test_inference_client_text_classification_on_a_classifier_only_server(classifier_only):
    """`InferenceClient(base_url=URL).text_classification` posts the HF Inference API's body
    to `/` and reads a list holding one list of labels: a server with only a classifier answers
    `/` that way (with a text-generation model, `/` stays TGI's generate)."""
    from huggingface_hub import InferenceClient

    base, text = classifier_only.base_url, "hello world"
    expected = [(s["label"], s["score"]) for s in
                httpx.post(base + "/classify", json={"inputs": text}).json()]
    client = InferenceClient(base_url=base)
    assert [(o.label, o.score) for o in client.text_classification(text)] == expected
    assert [(o.label, o.score) for o in client.text_classification(text, top_k=1)] == \
        expected[:1]
    logits = {s["label"]: s["score"] for s in httpx.post(
        base + "/classify", json={"inputs": text, "raw_scores": True}).json()}
    raw = client.text_classification(text, function_to_apply="none")
    assert {o.label: o.score for o in raw} == pytest.approx(logits)
    batch = httpx.post(base + "/", json={"inputs": [text, "the lazy dog"]}).json()
    # (a padded batch of two runs other row counts through the kernels than one text alone:
    # on Zen 4 another fp32 code path, the scores then equal to rounding, as the engine's own
    # batched-classification test holds them)
    assert len(batch) == 2 and [s["label"] for s in batch[0]] == [label for label, _ in expected]
    assert [s["score"] for s in batch[0]] == pytest.approx([score for _, score in expected],
                                                          rel=0, abs=1e-6)
    generate = httpx.post(base + "/generate", json={"inputs": text})
    assert generate.status_code == 404 and "text generation" in generate.json()["error"]
