"""The OpenAI-compatible and tokenizer routes against a real tiny engine, in-process.

Each claim is checked against an independent source: prompt logprobs against the model's own
full forward, token strings against the tokenizer, streamed text against the non-streamed
answer, choice j of a seeded request against a single request with seed + j.
"""

import json
import shutil
import time

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from camex_runtime.checkpoint import load_folded
from camex_runtime.engine.outputs import TokenEvent
from camex_runtime.engine.runner import build_model
from server.app import create_app
from server.openai_protocol import Completion, CompletionChoice
from server.protocol import StreamResponse, Token
from server.routes.completions import sse as completions_sse
from server.routes.tgi import sse_json, token_event
from server.settings import ServerSettings
from tests.server.test_health_inprocess import wait_ready

TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}" \
           "{% if add_generation_prompt %}<assistant>{% endif %}"


@pytest.fixture(scope="module")
def template_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tpl") / "chat.jinja"
    path.write_text(TEMPLATE)
    return path


@pytest.fixture(scope="module")
def client(tiny_lm_dir, template_file):
    app = create_app(ServerSettings(model=str(tiny_lm_dir), model_id="tiny",
                                    chat_template=str(template_file)))
    with TestClient(app) as c:
        wait_ready(c)
        c.tokenizer = app.state.serving.lm.tokenizer
        yield c


@pytest.fixture(scope="module")
def reference(tiny_lm_dir):
    return build_model(load_folded(tiny_lm_dir))


def full_forward(model, ids):
    T = model.config.segment_len
    with torch.no_grad():
        logits = model(torch.tensor([ids]), route1_len=min(len(ids), T)).logits[0]
    return torch.log_softmax(logits.float(), -1)


def complete(client, **body):
    r = client.post("/v1/completions", json={"model": "tiny", **body})
    assert r.status_code == 200, r.text
    return r.json()


def sse(client, path, body) -> list:
    with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


def test_echo_scoring_equals_the_full_forward(client, reference):
    """lm-eval's loglikelihood request: echo, max_tokens 0, logprobs 1."""
    prompt = "the quick brown fox jumps over"
    out = complete(client, prompt=prompt, max_tokens=0, echo=True, logprobs=1, temperature=0)
    (choice,) = out["choices"]
    lp = choice["logprobs"]
    ids = client.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ref = full_forward(reference, ids)
    assert choice["text"] == prompt and choice["finish_reason"] == "length"
    assert lp["tokens"] == [client.tokenizer.decode([i]) for i in ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    want = [ref[t - 1, ids[t]].item() for t in range(1, len(ids))]
    assert lp["token_logprobs"][1:] == pytest.approx(want, abs=1e-4)
    for t in range(1, len(ids)):  # the chosen token plus the single best alternative
        top = lp["top_logprobs"][t]
        assert 1 <= len(top) <= 2 and top[lp["tokens"][t]] == lp["token_logprobs"][t]
        assert max(top.values()) == pytest.approx(ref[t - 1].max().item(), abs=1e-4)
    assert lp["text_offset"] == [sum(len(s) for s in lp["tokens"][:i]) for i in range(len(ids))]
    # prompt logprobs need every position computed: such a request never resumes a prefix
    assert out["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0,
                            "total_tokens": len(ids),
                            "prompt_tokens_details": {"cached_tokens": 0}}


def test_token_id_prompts_and_echo_with_generation(client):
    ids = client.tokenizer("hello world", add_special_tokens=False)["input_ids"]
    one = complete(client, prompt=ids, max_tokens=3, temperature=0, echo=True, logprobs=2)
    text = complete(client, prompt="hello world", max_tokens=3, temperature=0)["choices"][0]
    (c,) = one["choices"]
    assert c["text"] == client.tokenizer.decode(ids) + text["text"]
    assert len(c["logprobs"]["tokens"]) == len(ids) + one["usage"]["completion_tokens"]
    many = complete(client, prompt=[ids, ids[:2]], max_tokens=2, temperature=0)
    assert [c["index"] for c in many["choices"]] == [0, 1]
    assert many["usage"]["prompt_tokens"] == len(ids) + 2


def test_n_choices_follow_seed_plus_j(client):
    body = dict(prompt="curvature aware", max_tokens=6, temperature=1.0, ignore_eos=True)
    out = complete(client, n=3, seed=40, **body)
    texts = [c["text"] for c in out["choices"]]
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    assert texts == [complete(client, seed=40 + j, **body)["choices"][0]["text"]
                     for j in range(3)]
    assert len(set(texts)) > 1
    assert out["usage"]["completion_tokens"] == 18
    assert out["usage"]["prompt_tokens"] == len(client.tokenizer("curvature aware")["input_ids"])


def test_stop_string_is_excluded_and_streaming_matches(client):
    base = complete(client, prompt="hello world", max_tokens=20, temperature=0, ignore_eos=True)
    text = base["choices"][0]["text"]
    stop = next(text[i:i + 2] for i in range(3, len(text) - 2) if text[i:i + 2].strip()
                and text[i:i + 2] not in text[:i + 1])
    body = dict(prompt="hello world", max_tokens=20, temperature=0, ignore_eos=True, stop=[stop])
    cut = complete(client, **body)["choices"][0]
    assert cut["text"] == text[:text.index(stop)] and cut["finish_reason"] == "stop"
    chunks = sse(client, "/v1/completions", {**body, "stream": True,
                                             "stream_options": {"include_usage": True}})
    assert "".join(ch["choices"][0]["text"] for ch in chunks[:-1]) == cut["text"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0


def test_vllm_stop_extras_stop_reason_and_included_stop_strings(client):
    """stop_reason names the stop string (or stop id) that ended a choice, null otherwise, on
    both routes, streamed and not; include_stop_str_in_output keeps the string in the text."""
    base = complete(client, prompt="hello world", max_tokens=20, temperature=0, ignore_eos=True)
    assert base["choices"][0]["stop_reason"] is None  # present, null: a length
    text = base["choices"][0]["text"]
    stop = next(text[i:i + 2] for i in range(3, len(text) - 2) if text[i:i + 2].strip()
                and text[i:i + 2] not in text[:i + 1])
    body = dict(prompt="hello world", max_tokens=20, temperature=0, ignore_eos=True,
                stop=["\x01", stop])
    cut = complete(client, **body)["choices"][0]
    assert cut["stop_reason"] == stop and cut["text"] == text[:text.index(stop)]
    kept = complete(client, **body, include_stop_str_in_output=True)["choices"][0]
    assert kept["text"] == text[:text.index(stop)] + stop and kept["stop_reason"] == stop
    chunks = sse(client, "/v1/completions", {**body, "stream": True,
                                             "include_stop_str_in_output": True})
    assert "".join(ch["choices"][0]["text"] for ch in chunks) == kept["text"]
    assert chunks[-1]["choices"][0]["stop_reason"] == stop
    tid = client.tokenizer(text, add_special_tokens=False)["input_ids"][2]
    msg = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 12,
           "temperature": 0, "ignore_eos": True, "logit_bias": {str(tid): 100},
           "stop_token_ids": [tid]}
    chat = client.post("/v1/chat/completions", json=msg).json()["choices"][0]
    assert (chat["finish_reason"], chat["stop_reason"]) == ("stop", tid)
    last = sse(client, "/v1/chat/completions", {**msg, "stream": True})[-1]["choices"][0]
    assert (last["finish_reason"], last["stop_reason"]) == ("stop", tid)


def test_vllm_token_extras_allowed_ids_and_special_tokens(client):
    """allowed_token_ids keeps every token inside the list; skip_special_tokens false leaves
    a special token's text in the answer (EOS, allowed alone here)."""
    tok = client.tokenizer
    ids = tok("the quick brown fox", add_special_tokens=False)["input_ids"]
    out = complete(client, prompt=ids, max_tokens=6, temperature=0.9, seed=2,
                   allowed_token_ids=ids[:2], ignore_eos=True)
    want = client.app.state.serving.lm.generate(ids, max_new_tokens=6, do_sample=True,
                                                temperature=0.9, seed=2, ignore_eos=True,
                                                allowed_token_ids=ids[:2])
    assert set(want.token_ids) <= set(ids[:2]) and out["choices"][0]["text"] == want.text
    eos = tok.eos_token_id
    for skip, want in ((True, ""), (False, tok.decode([eos]))):
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                "temperature": 0, "allowed_token_ids": [eos], "skip_special_tokens": skip}
        got = client.post("/v1/chat/completions", json=body).json()["choices"][0]
        assert got["message"]["content"] == want and got["finish_reason"] == "stop"


def test_vllm_prompt_and_word_extras(client):
    """truncate_prompt_tokens keeps the prompt's last N tokens (completions and chat, -1: the
    context); bad_words reach the engine."""
    tok, engine = client.tokenizer, client.app.state.serving.lm
    ids = tok("the quick brown fox jumps over the lazy dog", add_special_tokens=False)["input_ids"]
    body = dict(max_tokens=5, temperature=0, ignore_eos=True)
    out = complete(client, prompt=ids, truncate_prompt_tokens=4, **body)
    assert out["usage"]["prompt_tokens"] == 4
    assert out["choices"][0]["text"] == engine.generate(ids[-4:], max_new_tokens=5,
                                                        ignore_eos=True).text
    text = complete(client, prompt="the quick brown fox", truncate_prompt_tokens=2, echo=True,
                    **body)["choices"][0]["text"]  # echo shows what the model was given
    assert text.startswith(tok.decode(tok("the quick brown fox",
                                          add_special_tokens=False)["input_ids"][-2:]))
    whole = complete(client, prompt=ids, truncate_prompt_tokens=-1, **body)
    assert whole["usage"]["prompt_tokens"] == len(ids)
    msg = {"messages": [{"role": "user", "content": "hello there"}], **body}
    full = client.post("/v1/chat/completions", json=msg).json()["usage"]["prompt_tokens"]
    cut = client.post("/v1/chat/completions", json={**msg, "truncate_prompt_tokens": 3}).json()
    assert full > 3 and cut["usage"]["prompt_tokens"] == 3
    free = complete(client, prompt=ids, **body)["choices"][0]["text"]
    word = free.split()[0]
    banned = complete(client, prompt=ids, bad_words=[word], **body)["choices"][0]["text"]
    assert banned == engine.generate(ids, max_new_tokens=5, ignore_eos=True,
                                     bad_words=[word]).text != free


def test_streamed_echo_logprobs_equal_the_plain_answer(client):
    body = dict(prompt=["the lazy dog", "hello"], n=2, max_tokens=4, temperature=0, echo=True,
                logprobs=2, ignore_eos=True)
    plain = complete(client, **body)["choices"]
    chunks = sse(client, "/v1/completions", {"model": "tiny", **body, "stream": True})
    for c in plain:
        mine = [ch["choices"][0] for ch in chunks if ch["choices"][0]["index"] == c["index"]]
        assert "".join(m["text"] for m in mine) == c["text"]
        streamed = sum((m["logprobs"]["token_logprobs"] for m in mine), [])
        assert streamed == pytest.approx(c["logprobs"]["token_logprobs"], abs=1e-6, nan_ok=True)
        offsets = sum((m["logprobs"]["text_offset"] for m in mine), [])
        assert offsets == c["logprobs"]["text_offset"]


def test_null_max_tokens_means_what_the_context_has_left(client):
    out = complete(client, prompt="hello", max_tokens=None, temperature=0, ignore_eos=True)
    assert out["usage"]["total_tokens"] == 128 and out["choices"][0]["finish_reason"] == "length"


def test_completion_refusals(client):
    r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 0})
    assert r.status_code == 422 and "echo" in r.json()["error"]["message"]
    r = client.post("/v1/completions", json={"prompt": "hi", "model": "gpt-4"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = client.post("/v1/completions", json={"prompt": [99999]})
    assert r.status_code == 422 and "vocabulary" in r.json()["error"]["message"]
    r = client.post("/v1/completions", json={"prompt": "hi", "n": 9, "max_tokens": 1,
                                             "temperature": 0, "echo": False,
                                             "stop": ["a", "b", "c", "d", "e"]})
    assert r.status_code == 422 and r.json()["error"]["param"] == "stop"


def test_stream_options_need_a_stream(client):
    """As OpenAI and vLLM: `stream_options` on a plain request is refused on both routes,
    naming the field; an empty object, and the same options on a stream, are accepted."""
    options = {"stream_options": {"include_usage": True}}
    for route, body in (("/v1/completions", {"prompt": "hi"}),
                        ("/v1/chat/completions", {"messages": [{"role": "user",
                                                                "content": "hi"}]})):
        body = {**body, "max_tokens": 2, "temperature": 0}
        r = client.post(route, json={**body, **options})
        err = r.json()["error"]
        assert r.status_code == 422 and err["param"] == "stream_options", r.text
        assert "only allowed when `stream` is true" in err["message"]
        assert client.post(route, json={**body, "stream_options": {}}).status_code == 200
        with client.stream("POST", route, json={**body, **options, "stream": True}) as s:
            assert s.status_code == 200 and '"usage"' in "".join(s.iter_text())


def test_too_long_requests_are_refused_in_openai_words(client):
    """OpenAI's wording and code, which clients (LiteLLM, CrewAI) match to shorten the prompt;
    the field named is the one the request used. TGI routes keep their own message."""
    limit = client.get("/v1/models").json()["data"][0]["max_model_len"]
    prompt_len = len(client.tokenizer("hello world", add_special_tokens=False)["input_ids"])
    r = client.post("/v1/completions", json={"prompt": "hello world", "max_tokens": limit})
    err = r.json()["error"]
    assert r.status_code == 422 and err["code"] == "context_length_exceeded"
    assert err["message"] == (
        f"This model's maximum context length is {limit} tokens. However, you requested "
        f"{prompt_len + limit} tokens ({prompt_len} in the prompt, {limit} in the completion). "
        "Please reduce the length of the prompt or `max_tokens`.")
    assert err["param"] == "max_tokens"
    r = client.post("/v1/completions", json={"prompt": [1] * (limit + 5), "max_tokens": 1})
    err = r.json()["error"]
    assert (err["code"], err["param"]) == ("context_length_exceeded", "prompt")
    assert f"your prompt has {limit + 5} tokens, and at most {limit - 1} may be input" \
        in err["message"]
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    for field in ("max_tokens", "max_completion_tokens"):
        r = client.post("/v1/chat/completions", json={**chat, field: limit})
        err = r.json()["error"]
        assert r.status_code == 422 and (err["code"], err["param"]) == (
            "context_length_exceeded", field)
        assert "in the messages," in err["message"] and err["message"].endswith(
            f"Please reduce the length of the messages or `{field}`.")
    r = client.post("/v1/chat/completions", json={**chat, "stream": True, "max_tokens": limit})
    assert r.status_code == 422 and r.json()["error"]["code"] == "context_length_exceeded"
    r = client.post("/generate", json={"inputs": "hello world",
                                       "parameters": {"max_new_tokens": limit}})
    assert r.status_code == 422 and r.json()["error"] == (
        f"prompt tokens ({prompt_len}) + max_new_tokens ({limit}) = {prompt_len + limit} "
        f"exceeds max_total_tokens ({limit})")


def test_chat_renders_the_template_and_streams_the_same_text(client):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    body = {"model": "tiny", "messages": messages, "max_completion_tokens": 5, "temperature": 0,
            "logprobs": True, "top_logprobs": 2}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    rendered = "<system>be brief\n<user>hello\n<assistant>"
    assert out["usage"]["prompt_tokens"] == len(client.tokenizer(
        rendered, add_special_tokens=False)["input_ids"])
    (choice,) = out["choices"]
    assert out["object"] == "chat.completion" and choice["message"]["role"] == "assistant"
    content = choice["logprobs"]["content"]
    assert len(content) == out["usage"]["completion_tokens"] <= 5
    for entry in content:
        assert len(entry["top_logprobs"]) == 2 and entry["bytes"] == list(entry["token"].encode())
        assert entry["logprob"] == entry["top_logprobs"][0]["logprob"]  # greedy: the best
    chunks = sse(client, "/v1/chat/completions", {**body, "stream": True,
                                                  "stream_options": {"include_usage": True}})
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(ch["object"] == "chat.completion.chunk" for ch in chunks)
    streamed = "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks[:-1])
    assert streamed == choice["message"]["content"]
    assert chunks[-2]["choices"][0]["finish_reason"] == choice["finish_reason"]
    streamed_usage = chunks[-1]["usage"]
    details = streamed_usage.pop("prompt_tokens_details")
    assert streamed_usage == {k: v for k, v in out["usage"].items()
                              if k != "prompt_tokens_details"}
    # the same prompt again (prefix caching, on by default): the slot the first one left
    # holds it and what it generated; all but its last token resume when that token is
    # among the last T the first request computed, else back to the last segment boundary
    T = client.app.state.serving.lm.config.segment_len
    L, c = out["usage"]["prompt_tokens"], out["usage"]["completion_tokens"]
    cached = L - 1 if L - 2 >= L + c - 1 - T else (L - 1) // T * T
    assert details == {"cached_tokens": cached}


def test_chat_accepts_what_openai_clients_send_that_asks_nothing_here(client):
    """store, metadata, service_tier, prompt_cache_key, safety_identifier (the openai client's
    newer parameters; agents send them every turn): the same answer as without them; a
    reasoning_effort the template does not read changes nothing either; a value outside
    OpenAI's is still a 422."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}],
            "max_completion_tokens": 6, "temperature": 0}
    plain = client.post("/v1/chat/completions", json=body).json()
    hinted = client.post("/v1/chat/completions", json={
        **body, "store": True, "metadata": {"run": "1"}, "service_tier": "flex",
        "prompt_cache_key": "k", "safety_identifier": "u", "reasoning_effort": "high"})
    assert hinted.status_code == 200, hinted.text
    assert hinted.json()["choices"][0]["message"] == plain["choices"][0]["message"]
    assert hinted.json()["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"]
    for field, value in (("service_tier", "gold"), ("reasoning_effort", "max")):
        r = client.post("/v1/chat/completions", json={**body, field: value})
        assert r.status_code == 422 and field in r.json()["error"]["message"], r.text


def test_chat_default_max_tokens_is_what_the_context_has_left(client):
    body = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0,
            "ignore_eos": True}
    out = client.post("/v1/chat/completions", json=body).json()
    limit = client.get("/v1/models").json()["data"][0]["max_model_len"]
    assert out["usage"]["total_tokens"] == limit and out["choices"][0]["finish_reason"] == "length"


def test_chat_without_a_template_is_a_clear_400(tiny_lm_dir):
    app = create_app(ServerSettings(model=str(tiny_lm_dir)))
    with TestClient(app) as c:
        wait_ready(c)
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["code"] == "chat_template_missing" and "--chat-template" in err["message"]
        assert "chat_template" not in c.get("/tokenizer_info").json()


REFUSING = ("{% for m in messages %}{% if m['role'] == 'system' %}"
            "{{ raise_exception('System role not supported') }}{% endif %}"
            "<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>")
BROKEN = "{% for m in messages %}{{ m['content'] }}{% endfor %}{{ missing.attr }}"


def test_a_template_refusing_messages_is_422_and_a_broken_one_500(tiny_lm_dir, tmp_path,
                                                                   caplog):
    """raise_exception in a template judges the client's messages (422 with its words); a
    template that cannot render at all is the server's configuration (500, reason logged)."""
    refusing = tmp_path / "refusing.jinja"
    refusing.write_text(REFUSING)
    app = create_app(ServerSettings(model=str(tiny_lm_dir), chat_template=str(refusing)))
    with TestClient(app) as c:
        wait_ready(c)
        r = c.post("/v1/chat/completions", json={"max_tokens": 2, "messages": [
            {"role": "system", "content": "x"}, {"role": "user", "content": "y"}]})
        assert r.status_code == 422 and r.json()["error"]["message"] == \
            "the chat template refused these messages: System role not supported"
        assert c.post("/v1/chat/completions", json={"max_tokens": 2, "messages": [
            {"role": "user", "content": "y"}]}).status_code == 200
    # the checkpoint's own template broken: the server still serves, chat answers 500
    broken_dir = tmp_path / "broken-template"
    shutil.copytree(tiny_lm_dir, broken_dir)
    cfg_path = broken_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "chat_template": BROKEN}))
    app = create_app(ServerSettings(model=str(broken_dir)))
    with caplog.at_level("ERROR", logger="camex.server"), TestClient(app) as c:
        wait_ready(c)
        assert "the checkpoint's chat template cannot render a one-message conversation " \
               "(UndefinedError: 'missing' is undefined)" in caplog.text
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "y"}]})
        assert r.status_code == 500 and "server's chat template failed" in \
            r.json()["error"]["message"]
        assert c.post("/v1/completions", json={"prompt": "y", "max_tokens": 2}).status_code == 200
    # a --chat-template file that cannot render: the server does not start
    broken = tmp_path / "broken.jinja"
    broken.write_text(BROKEN)
    fatal: list[str] = []
    app = create_app(ServerSettings(model=str(tiny_lm_dir), chat_template=str(broken)),
                     on_fatal=fatal.append)
    with TestClient(app) as c:
        deadline = time.monotonic() + 60
        while not fatal and time.monotonic() < deadline:
            time.sleep(0.05)
        assert c.get("/ready").status_code == 503
    assert fatal == [f"ValueError: --chat-template {broken} cannot render a one-message "
                     "conversation: UndefinedError: 'missing' is undefined"]


# Qwen3's switch, in miniature: an empty thinking block when the client turns thinking off
THINKING = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% if enable_thinking is defined and "
            "not enable_thinking %}<think></think>{% endif %}{% if budget is defined %}"
            "{{ budget + 1 }}{% endif %}{% endif %}")


@pytest.fixture(scope="module")
def thinking(tiny_lm_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("tpl") / "thinking.jinja"
    path.write_text(THINKING)
    app = create_app(ServerSettings(model=str(tiny_lm_dir), chat_template=str(path)))
    with TestClient(app) as c:
        wait_ready(c)
        c.tokenizer = app.state.serving.lm.tokenizer
        yield c


def test_chat_template_kwargs_and_rendering_options_reach_the_template(thinking):
    """vLLM's chat_template_kwargs (Qwen3's enable_thinking), add_generation_prompt and
    continue_final_message: /tokenize shows the prompt, the chat route generates from it."""
    user = [{"role": "user", "content": "hi"}]
    cases = [
        ({}, user, "<user>hi\n<assistant>"),
        ({"chat_template_kwargs": {"enable_thinking": False}}, user,
         "<user>hi\n<assistant><think></think>"),
        ({"chat_template_kwargs": {"enable_thinking": True, "budget": 4}}, user,
         "<user>hi\n<assistant>5"),
        ({"add_generation_prompt": False}, user, "<user>hi\n"),
        ({"add_generation_prompt": False, "continue_final_message": True},
         [*user, {"role": "assistant", "content": "Once upon"}], "<user>hi\n<assistant>Once upon"),
    ]
    for extra, messages, rendered in cases:
        want = thinking.tokenizer(rendered, add_special_tokens=False)["input_ids"]
        r = thinking.post("/tokenize", json={"messages": messages, **extra})
        assert r.status_code == 200 and r.json()["tokens"] == want, (extra, r.text)
        r = thinking.post("/v1/chat/completions", json={
            "messages": messages, "max_tokens": 2, "temperature": 0, **extra})
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(want), extra


@pytest.mark.parametrize("extra,needle", [
    ({"chat_template_kwargs": {"add_generation_prompt": False}},
     "add_generation_prompt cannot be set through chat_template_kwargs"),
    ({"chat_template_kwargs": {"messages": []}}, "messages cannot be set"),
    ({"continue_final_message": True}, "cannot both be true"),
    ({"continue_final_message": True, "add_generation_prompt": False},
     "must be the assistant's (it is `user`)"),
    # a variable the template cannot use: the client's kwargs broke it, not the server
    ({"chat_template_kwargs": {"budget": "four"}}, "cannot render with this "
                                                   "chat_template_kwargs"),
])
def test_bad_rendering_options_are_422_naming_them(thinking, extra, needle):
    body = {"messages": [{"role": "user", "content": "hi"}], **extra}
    for path, more in (("/v1/chat/completions", {"max_tokens": 2}), ("/tokenize", {})):
        r = thinking.post(path, json={**body, **more})
        assert r.status_code == 422 and needle in json.dumps(r.json()), (path, r.text)


@pytest.fixture(scope="module")
def reasoner(tiny_lm_dir, tmp_path_factory):
    """The THINKING template's server with --reasoning-parser qwen3."""
    path = tmp_path_factory.mktemp("tpl") / "thinking.jinja"
    path.write_text(THINKING)
    app = create_app(ServerSettings(model=str(tiny_lm_dir), chat_template=str(path),
                                    reasoning_parser="qwen3"))
    with TestClient(app) as c:
        wait_ready(c)
        yield c


def test_reasoning_parser_splits_messages_and_streams_alike(thinking, reasoner):
    """The tiny model never writes </think>: with thinking on its whole answer is reasoning
    (cut short, as vLLM reads it) in both field names and content is null; with thinking off
    (the template closes the think block in the prompt) it is all content. Streams carry the
    same text in the same fields. The raw text comes from the same model without a parser."""
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0,
            "ignore_eos": True}
    off = {"chat_template_kwargs": {"enable_thinking": False}}
    for extra, field in (({}, "reasoning_content"), (off, "content")):
        raw = thinking.post("/v1/chat/completions", json={**body, **extra}).json()
        raw_text = raw["choices"][0]["message"]["content"]
        assert raw_text and "</think>" not in raw_text
        r = reasoner.post("/v1/chat/completions", json={**body, **extra})
        assert r.status_code == 200, r.text
        message = r.json()["choices"][0]["message"]
        if field == "content":
            assert message == {"role": "assistant", "content": raw_text}
        else:
            assert message == {"role": "assistant", "content": None,
                               "reasoning_content": raw_text, "reasoning": raw_text}
        chunks = sse(reasoner, "/v1/chat/completions", {**body, **extra, "stream": True})
        deltas = [ch["choices"][0]["delta"] for ch in chunks[1:]]
        assert "".join(d.get(field, "") for d in deltas) == raw_text
        other = "content" if field == "reasoning_content" else "reasoning_content"
        assert not any(d.get(other) for d in deltas)
        if field == "reasoning_content":
            assert all(d.get("reasoning") == d.get("reasoning_content") for d in deltas)


# A template that shows tools and renders earlier calls and tool results, as Qwen3's does
TOOLS_TEMPLATE = (
    "{% if tools %}<tools>{% for t in tools %}{{ t['function']['name'] }};{% endfor %}</tools>\n"
    "{% endif %}{% for m in messages %}<{{ m['role'] }}>{% if m['tool_calls'] %}"
    "{% for c in m['tool_calls'] %}<call>{{ c['function']['name'] }}"
    "{{ c['function']['arguments'] | tojson }}</call>{% endfor %}{% endif %}{{ m['content'] }}"
    "{% if m['tool_call_id'] %}[{{ m['tool_call_id'] }}]{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
    "{% if reasoning_effort %}(effort: {{ reasoning_effort }}){% endif %}")
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "today's weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
TOOL_TURNS = [
    {"role": "user", "content": "weather?"},
    {"role": "assistant", "content": "", "tool_calls": [{
        "id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18C"}]


def tools_server(tiny_lm_dir, tmp_path, **settings):
    path = tmp_path / "tools.jinja"
    path.write_text(TOOLS_TEMPLATE)
    return TestClient(create_app(ServerSettings(model=str(tiny_lm_dir), chat_template=str(path),
                                                **settings)))


def test_tools_and_tool_turns_reach_the_template(tiny_lm_dir, tmp_path):
    """The request's tools, an assistant turn's calls (arguments as an object, as vLLM hands
    them to templates) and a tool result with its call id, rendered; generation with tools
    needs --tool-call-parser, said by name, unless tool_choice is "none"."""
    with tools_server(tiny_lm_dir, tmp_path) as c:
        wait_ready(c)
        tok = c.app.state.serving.lm.tokenizer
        # (transformers renders with trim_blocks: no newline after a block tag)
        rendered = ('<tools>get_weather;</tools>\n<user>weather?<assistant>'
                    '<call>get_weather{"city": "Paris"}</call><tool>18C[call_1]<assistant>')
        r = c.post("/tokenize", json={"messages": TOOL_TURNS, "tools": [WEATHER]})
        assert r.status_code == 200 and r.json()["tokens"] == tok(
            rendered, add_special_tokens=False)["input_ids"], r.text
        body = {"messages": TOOL_TURNS, "tools": [WEATHER], "max_tokens": 2}
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 422 and "--tool-call-parser hermes" in r.text
        r = c.post("/v1/chat/completions", json={**body, "tool_choice": "none"})
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(
            tok(rendered, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("change,needle", [
    ({"tool_choice": {"type": "function", "function": {"name": "get_time"}}},
     "names `get_time`, which is not in `tools` (get_weather)"),
    ({"tool_choice": "required", "tools": None}, "the request has no `tools`"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}},
     "drop `response_format`"),
    ({"messages": [{"role": "tool", "content": "18C"}]}, "needs the `tool_call_id`"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": TOOL_TURNS[1]["tool_calls"]}]},
     "belong to assistant messages"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "pattern"),
])
def test_tool_requests_that_cannot_be_honoured_are_422(client, change, needle):
    body = {"messages": TOOL_TURNS, "tools": [WEATHER], "max_tokens": 2, **change}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 422 and needle in r.text, r.text


@pytest.mark.parametrize("parser", ["hermes", "llama3_json", "mistral"])
def test_with_the_parser_an_answer_without_calls_is_plain_content(tiny_lm_dir, tmp_path, parser):
    """The tiny model writes no call: its answer stays content, finish reason as without
    tools, streamed alike (the parsers' own cases: tests/server/test_tool_calls.py)."""
    body = {"messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER],
            "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    with tools_server(tiny_lm_dir, tmp_path, tool_call_parser=parser) as c:
        wait_ready(c)
        out = c.post("/v1/chat/completions", json=body).json()
        plain = c.post("/v1/chat/completions", json={**body, "tool_choice": "none"}).json()
        (choice,) = out["choices"]
        assert choice["message"] == plain["choices"][0]["message"]
        assert "<tool_call>" not in choice["message"]["content"]
        assert choice["finish_reason"] == "length"
        chunks = sse(c, "/v1/chat/completions", {**body, "stream": True})
        deltas = [ch["choices"][0]["delta"] for ch in chunks[1:]]
        assert "".join(d.get("content", "") for d in deltas) == choice["message"]["content"]
        assert not any("tool_calls" in d for d in deltas)


def test_tgi_prefill_and_top_tokens_match_the_completions_logprobs(client):
    r = client.post("/generate", json={"inputs": "the quick brown", "parameters": {
        "max_new_tokens": 3, "decoder_input_details": True, "top_n_tokens": 2,
        "details": True}})
    d = r.json()["details"]
    echo = complete(client, prompt="the quick brown", max_tokens=0, echo=True, logprobs=0)
    lps = echo["choices"][0]["logprobs"]["token_logprobs"]
    assert d["prefill"][0]["logprob"] is None and "logprob" in d["prefill"][0]
    assert [p["logprob"] for p in d["prefill"]] == pytest.approx(lps, nan_ok=True)
    assert [len(t) for t in d["top_tokens"]] == [2] * d["generated_tokens"]
    for tok, top in zip(d["tokens"], d["top_tokens"]):
        assert top[0]["id"] == tok["id"] and top[0]["logprob"] >= top[1]["logprob"]
    with client.stream("POST", "/generate_stream", json={"inputs": "the quick brown",
                       "parameters": {"max_new_tokens": 3, "top_n_tokens": 2}}) as s:
        events = [json.loads(x[5:]) for x in s.iter_lines() if x.startswith("data:")]
    assert [e["top_tokens"] for e in events] == d["top_tokens"]


def test_tokenizer_routes_in_vllm_and_tgi_shapes(client):
    tok = client.tokenizer
    r = client.post("/tokenize", json={"prompt": "hello world", "add_special_tokens": False,
                                       "return_token_strs": True}).json()
    ids = tok("hello world", add_special_tokens=False)["input_ids"]
    assert r["tokens"] == ids and r["count"] == len(ids) and r["max_model_len"] == 128
    assert r["token_strs"] == [tok.decode([i]) for i in ids]
    chat = client.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]})
    assert chat.json()["tokens"] == tok("<user>hi\n<assistant>", add_special_tokens=False)[
        "input_ids"]
    assert client.post("/detokenize", json={"tokens": ids}).json() == {"prompt": "hello world"}
    bad = client.post("/detokenize", json={"tokens": [10**6]})
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "tokens"
    info = client.get("/tokenizer_info").json()
    assert info["eos_token"] == tok.eos_token and info["chat_template"] == TEMPLATE
    assert info["tokenizer_class"] == type(tok).__name__
    tgi = client.post("/tokenize", json={"inputs": "hello world"}).json()
    assert [t["id"] for t in tgi] == ids
    assert ["hello world"[t["start"]:t["stop"]] for t in tgi] == [t["text"] for t in tgi]
    assert "".join(t["text"] for t in tgi) == "hello world"


def test_tgi_stream_events_equal_the_details_of_the_same_request(client):
    """The token events before the last are formatted without pydantic (`token_event`): every
    field of every event equals the non-streamed answer's details for the same greedy request,
    and each event still parses as the schema's StreamResponse."""
    params = {"max_new_tokens": 6, "details": True}
    d = client.post("/generate", json={"inputs": "the quick brown",
                                       "parameters": params}).json()
    with client.stream("POST", "/generate_stream",
                       json={"inputs": "the quick brown", "parameters": params}) as s:
        lines = [x[5:] for x in s.iter_lines() if x.startswith("data:")]
    events = [StreamResponse.model_validate_json(x).model_dump() for x in lines]
    assert [e["index"] for e in events] == list(range(1, 7))
    assert [e["token"] for e in events] == d["details"]["tokens"]
    assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
    assert events[-1]["generated_text"] == d["generated_text"]
    assert events[-1]["details"]["generated_tokens"] == 6


def test_tgi_last_stream_event_stays_one_line_through_the_route(client):
    """The route's last event (pydantic-written, with generated_text): `return_full_text`
    puts the prompt's U+0085 / U+2028 / U+2029 into it, and a client reading lines with
    str.splitlines() (httpx's iter_lines) still gets one data line per event, each parsing to
    the text sent."""
    prompt = "the quick \x85 brown \u2028 fox \u2029 jumps"
    with client.stream("POST", "/generate_stream", json={"inputs": prompt, "parameters": {
            "max_new_tokens": 3, "return_full_text": True, "details": True}}) as s:
        assert s.status_code == 200
        lines = [x for x in s.iter_lines() if x]
    events = [json.loads(x[5:]) for x in lines]  # each line a whole event, or this raises
    assert all(x.startswith("data:") for x in lines) and len(events) == 3
    last = events[-1]
    assert last["generated_text"] == prompt + "".join(e["token"]["text"] for e in events)
    assert last["details"]["generated_tokens"] == 3


@pytest.mark.parametrize("text", ["", " plain", 'quote " and \\ backslash', "new\nline\ttab",
                                  "control \x01\x1f", "é ü 漢字 😀", "sep \u2028\u2029",
                                  "nel \x85"])
@pytest.mark.parametrize("logprob", [-8.426048278808594, -1e-05, -0.0, -123456.78125, -1e-300])
def test_token_event_is_what_the_schema_writes(text, logprob):
    ev = TokenEvent(token_id=50256, text=text, logprob=logprob, index=2)
    for special in (False, True):
        fast = token_event(3, ev, special)
        slow = "data: " + StreamResponse(index=3, token=Token(
            id=50256, text=text, logprob=logprob, special=special)).model_dump_json() + "\n\n"
        assert fast.startswith("data: ") and fast.endswith("\n\n")
        # the same keys in the same order and the same values (floats may be spelled
        # differently: 1e-05 vs 0.00001, the same double)
        assert list(json.loads(fast[6:]).items()) == list(json.loads(slow[6:]).items())
        assert fast.splitlines() == [fast[:-2], ""]  # one data line, however a client splits


@pytest.mark.parametrize("text", ["nel \x85 end", "line sep \u2028 end", "para sep \u2029 end",
                                  "all \x85\u2028\u2029 é 😀"])
def test_stream_events_stay_one_line_where_splitlines_would_cut_them(text):
    """U+0085, U+2028 and U+2029 end a line for str.splitlines() and so for httpx's iter_lines
    (not for the SSE format, which ends lines at CR and LF only), and JSON may carry them raw
    inside a string. A generated token that decodes to one must not cut its event in two for
    such a client: TGI's token events (fast and pydantic-written) and OpenAI's completion
    chunks escape them, and each still parses to the same text."""
    ev = TokenEvent(token_id=7, text=text, logprob=-0.5, index=1)
    chunk = Completion(id="cmpl-1", created=0, model="m",
                       choices=[CompletionChoice(index=0, text=text)])
    events = {"tgi": token_event(1, ev, False),
              "tgi, last": "data: " + sse_json(StreamResponse(index=1, token=Token(
                  id=7, text=text, logprob=-0.5, special=False)).model_dump_json()) + "\n\n",
              "completions": completions_sse(chunk, None)}
    for name, event in events.items():
        lines = [x for x in httpx.Response(200, content=event.encode()).iter_lines() if x]
        assert len(lines) == 1 and lines[0].startswith("data: "), name
        body = json.loads(lines[0][6:])
        got = body["token"]["text"] if name.startswith("tgi") else body["choices"][0]["text"]
        assert got == text, name


def test_sampling_controls_reach_the_engine(client):
    """logit_bias, stop_token_ids and min_tokens on both routes; the penalties and min-p give
    what the engine gives for the same parameters."""
    tok = client.tokenizer
    ids = tok("the quick brown fox", add_special_tokens=False)["input_ids"]
    forced = ids[1]
    out = complete(client, prompt=ids, max_tokens=4, temperature=0,
                   logit_bias={str(forced): 100})
    assert out["choices"][0]["text"] == tok.decode([forced] * 4)
    out = complete(client, prompt=ids, max_tokens=6, temperature=0, min_tokens=3,
                   logit_bias={str(forced): 100}, stop_token_ids=[forced])
    # the forced id ends the choice, so it is not chosen before the third token; then it is
    assert out["usage"]["completion_tokens"] == 4 and out["choices"][0]["finish_reason"] == "stop"
    assert out["choices"][0]["text"].endswith(tok.decode([forced]))
    chat = client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3, "temperature": 0,
        "logit_bias": {str(forced): 100}}).json()
    assert chat["choices"][0]["message"]["content"] == tok.decode([forced] * 3)
    engine = client.app.state.serving.lm
    for extra in (dict(presence_penalty=1.5, frequency_penalty=-0.5),
                  dict(min_p=0.2, temperature=1.3, seed=7)):
        out = complete(client, prompt=ids, max_tokens=8, **{"temperature": 0, **extra},
                       ignore_eos=True)
        sampled = "seed" in extra
        want = engine.generate(ids, max_new_tokens=8, ignore_eos=True, do_sample=sampled,
                               **{k: v for k, v in extra.items() if sampled or k != "temperature"})
        assert out["choices"][0]["text"] == want.text


@pytest.mark.parametrize("body,status,needle", [
    ({"logit_bias": {"abc": 1}}, 422, "logit_bias"),
    ({"logit_bias": {"5": 500}}, 422, "[-100, 100]"),
    ({"logit_bias": {"10000000": 1}}, 422, "outside the vocabulary"),
    ({"stop_token_ids": [10000000]}, 422, "outside the vocabulary"),
    ({"frequency_penalty": 3}, 422, "frequency_penalty"),
    ({"min_p": -0.1}, 422, "min_p"),
    ({"min_tokens": 9, "max_tokens": 4}, 422, "`min_tokens` (9) must not exceed"),
    ({"stop_token_ids": [-1]}, 422, "stop_token_ids.0"),
    ({"allowed_token_ids": []}, 422, "allowed_token_ids"),
    ({"allowed_token_ids": [10000000]}, 422, "outside the vocabulary"),
    ({"skip_special_tokens": "maybe"}, 422, "skip_special_tokens"),
    ({"truncate_prompt_tokens": 0}, 422, "must be -1 or a positive count"),
    ({"truncate_prompt_tokens": -2}, 422, "truncate_prompt_tokens"),
    ({"bad_words": ["  "]}, 422, "bad_words must be a list of non-blank strings"),
])
def test_bad_sampling_controls_are_422(client, body, status, needle):
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "hi", **body})
    assert r.status_code == status and needle in json.dumps(r.json()), r.text
