"""OpenAI's Responses API (`POST /v1/responses`) against the tiny model, in-process.

Each request is checked against the chat completion it amounts to (same prompt tokens, same
greedy text), its stream against its plain answer, and its output items against the request's
tools and format. (The `openai` client's own parsing and stream assembly: tests/e2e.)
"""
import json

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import ServerSettings
from tests.conftest import build_tiny
from tests.server.test_health_inprocess import wait_ready
from tests.server.test_openai_inprocess import TOOLS_TEMPLATE
from tests.server.test_structured_outputs import PERSON, TIME, WEATHER, fits_person

FLAT_WEATHER = {"type": "function", **WEATHER["function"]}
FLAT_TIME = {"type": "function", **TIME["function"]}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("responses")
    lm = build_tiny(tmp / "lm", "lm", max_position_embeddings=512)
    (tmp / "tools.jinja").write_text(TOOLS_TEMPLATE)
    app = create_app(ServerSettings(model=str(lm), model_id="tiny",
                                    chat_template=str(tmp / "tools.jinja")))
    with TestClient(app) as c:
        wait_ready(c)
        yield c


def respond(client, **body) -> dict:
    r = client.post("/v1/responses", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def stream_events(client, **body) -> list[dict]:
    with client.stream("POST", "/v1/responses", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        lines = list(r.iter_lines())
    names = [line[7:] for line in lines if line.startswith("event: ")]
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    assert names == [e["type"] for e in events]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


def output_text(response: dict) -> str:
    return "".join(part["text"] for item in response["output"] if item["type"] == "message"
                   for part in item["content"])


CONVERSATION = [
    {"role": "user", "content": [{"type": "input_text", "text": "weather?"}]},
    {"type": "function_call", "call_id": "call_1", "name": "get_weather",
     "arguments": '{"unit": "c", "days": 1}', "id": "fc_1", "status": "completed"},
    {"type": "function_call_output", "call_id": "call_1", "output": "18C"},
    {"type": "reasoning", "id": "rs_1", "summary": []},
    {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
     "content": [{"type": "output_text", "text": "18C today", "annotations": []}]},
    {"role": "user", "content": "and tomorrow?"}]
AS_CHAT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "weather?"},
    {"role": "assistant", "content": "", "tool_calls": [{
        "id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"unit": "c", "days": 1}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
    {"role": "assistant", "content": "18C today"},
    {"role": "user", "content": "and tomorrow?"}]


def test_a_response_is_the_chat_completion_it_amounts_to(client):
    """instructions + input items (a call, its output, a reasoning item dropped) render as
    the equivalent chat messages: same prompt tokens, same greedy text, same usage."""
    out = respond(client, input=CONVERSATION, instructions="be brief", tools=[FLAT_WEATHER],
                  tool_choice="none", max_output_tokens=12, temperature=0)
    chat = client.post("/v1/chat/completions", json={
        "messages": AS_CHAT, "tools": [WEATHER], "tool_choice": "none", "max_tokens": 12,
        "temperature": 0}).json()
    assert output_text(out) == chat["choices"][0]["message"]["content"]
    assert out["usage"]["input_tokens"] == chat["usage"]["prompt_tokens"]
    assert out["usage"]["output_tokens"] == chat["usage"]["completion_tokens"]
    assert out["object"] == "response" and out["id"].startswith("resp_")
    assert out["model"] == "tiny" and out["tools"] == [FLAT_WEATHER]
    status = "incomplete" if chat["choices"][0]["finish_reason"] == "length" else "completed"
    assert out["status"] == status and out["output"][0]["status"] == status
    if status == "incomplete":
        assert out["incomplete_details"] == {"reason": "max_output_tokens"}


def test_the_stream_builds_the_same_response(client):
    body = dict(input="hello world", max_output_tokens=10, temperature=0)
    plain = respond(client, **body)
    events = stream_events(client, **body)
    kinds = [e["type"] for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", f"response.{plain['status']}"]
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    final = events[-1]["response"]
    assert deltas == output_text(plain) == output_text(final)
    for key in ("input_tokens", "output_tokens", "total_tokens"):  # (cached: prefix caching)
        assert final["usage"][key] == plain["usage"][key]
    assert final["id"] == events[0]["response"]["id"]
    item_id = events[2]["item"]["id"]
    assert {e.get("item_id", item_id) for e in events[2:-1]} == {item_id}
    assert final["output"][0]["id"] == item_id


def test_logprobs_are_the_chat_completions_and_the_stream_sends_them_with_the_text(client):
    """`include: ["message.output_text.logprobs"]` + `top_logprobs`: the answer's tokens with
    the logprobs the chat completion of the same request reports; streamed, each text delta
    carries those of its tokens, and together they are the `.done` event's and the final
    response's."""
    body = dict(input="hello world", max_output_tokens=10, temperature=0,
                include=["message.output_text.logprobs"], top_logprobs=2)
    plain = respond(client, **body)
    (part,) = plain["output"][0]["content"]
    chat = client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hello world"}], "max_tokens": 10,
        "temperature": 0, "logprobs": True, "top_logprobs": 2}).json()
    assert part["logprobs"] == chat["choices"][0]["logprobs"]["content"]
    assert len(part["logprobs"]) == plain["usage"]["output_tokens"]
    assert all(len(t["top_logprobs"]) == 2 for t in part["logprobs"])
    events = stream_events(client, **body)
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    streamed = [t for e in deltas for t in e["logprobs"]]
    (done,) = [e for e in events if e["type"] == "response.output_text.done"]
    assert streamed == done["logprobs"] == part["logprobs"]
    assert events[-1]["response"]["output"][0]["content"][0]["logprobs"] == part["logprobs"]
    assert events[-1]["response"]["top_logprobs"] == 2
    quiet = respond(client, input="hello world", max_output_tokens=10, temperature=0)
    assert quiet["output"][0]["content"][0]["logprobs"] == []


def test_what_agents_send_is_accepted(client):
    """What Codex and the Agents SDK send with every request — cache keys, safety ids, a
    service tier, reasoning options, includes of built-in tools' results and encrypted
    reasoning — asks nothing of this server: the same answer as without them."""
    body = dict(input="hello world", max_output_tokens=8, temperature=0)
    plain = respond(client, **body)
    hinted = respond(client, **body, prompt_cache_key="session-1", safety_identifier="user-1",
                     service_tier="auto", max_tool_calls=4, store=False,
                     stream_options={"include_obfuscation": False},
                     reasoning={"summary": "auto"},  # (an effort: the next test)
                     include=["reasoning.encrypted_content", "web_search_call.action.sources"])
    assert output_text(hinted) == output_text(plain)
    assert hinted["usage"]["input_tokens"] == plain["usage"]["input_tokens"]
    assert hinted["reasoning"] == {"effort": None, "summary": None}
    assert hinted["prompt_cache_key"] == "session-1" and hinted["service_tier"] == "default"


def test_reasoning_effort_reaches_the_chat_template(client):
    """`reasoning.effort` (and chat's `reasoning_effort`) is the template's `reasoning_effort`;
    `chat_template_kwargs` naming it win. The test template prints it."""
    def prompt_tokens(**extra) -> int:
        r = client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, **extra})
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens"]

    def rendered(kwargs) -> int:
        r = client.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}],
                                           "chat_template_kwargs": kwargs})
        return r.json()["count"]

    assert prompt_tokens() == rendered({}) < rendered({"reasoning_effort": "minimal"})
    assert prompt_tokens(reasoning_effort="minimal") == rendered({"reasoning_effort": "minimal"})
    assert prompt_tokens(reasoning_effort="minimal",
                         chat_template_kwargs={"reasoning_effort": "xhigh"}) == \
        rendered({"reasoning_effort": "xhigh"})
    out = respond(client, input="hi", max_output_tokens=1, reasoning={"effort": "minimal"})
    assert out["usage"]["input_tokens"] == rendered({"reasoning_effort": "minimal"})


def test_text_format_json_schema(client):
    fmt = {"format": {"type": "json_schema", "name": "person", "schema": PERSON,
                      "strict": True}}
    out = respond(client, input="who?", text=fmt, temperature=1.0, max_output_tokens=200)
    assert out["status"] == "completed" and fits_person(output_text(out))
    assert out["text"] == fmt
    events = stream_events(client, input="who?", text=fmt, temperature=0, max_output_tokens=200)
    assert fits_person(output_text(events[-1]["response"]))


def test_forced_function_calls_are_function_call_items(client):
    out = respond(client, input="weather?", tools=[FLAT_WEATHER, FLAT_TIME],
                  tool_choice={"type": "function", "name": "get_time"}, temperature=0,
                  max_output_tokens=100)
    (item,) = out["output"]
    assert item["type"] == "function_call" and item["name"] == "get_time"
    assert json.loads(item["arguments"])["zone"] in ("utc", "cet")
    assert item["call_id"].startswith("chatcmpl-tool-") and item["id"].startswith("fc_")
    events = stream_events(client, input="weather?", tools=[FLAT_WEATHER, FLAT_TIME],
                           tool_choice="required", parallel_tool_calls=False, temperature=0,
                           max_output_tokens=200)
    kinds = [e["type"] for e in events]
    assert kinds[2:] == ["response.output_item.added", "response.function_call_arguments.delta",
                         "response.function_call_arguments.done", "response.output_item.done",
                         "response.completed"]
    (call,) = events[-1]["response"]["output"]
    assert call["name"] in ("get_weather", "get_time")
    assert events[3]["delta"] == call["arguments"] == events[4]["arguments"]


@pytest.mark.parametrize("body,param,needle", [
    ({"previous_response_id": "resp_1"}, None, "not supported by this server: "
                                               "previous_response_id"),
    ({"tools": [{"type": "web_search"}]}, "tools[0]", "only function tools"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input[0].content", "input_image"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role", "must be user"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "input[0]", "call_id"),
    ({"input": [{"type": "computer_call"}]}, "input[0]", "supported input items"),
    ({"text": {"format": {"type": "xml"}}}, "text.format", "json_schema"),
    ({"tool_choice": {"type": "file_search"}}, "tool_choice", '"required"'),
    ({"truncation": "auto"}, None, "truncation"),
    ({"max_output_token": 5}, None, "max_output_tokens"),
    ({"include": ["message.output_text.tokens"]}, "include.0", "message.output_text.logprobs"),
    ({"top_logprobs": 21}, "top_logprobs", "20"),
    ({"reasoning": {"effort": "max"}}, "reasoning.effort", "minimal"),
    ({"background": True}, None, "not supported by this server: background"),
])
def test_bad_requests_are_422_in_openai_shape(client, body, param, needle):
    r = client.post("/v1/responses", json={"input": "hi", **body})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert needle in error["message"], error
    if param is not None:
        assert error["param"] == param
