"""Structured output through every route and field that asks for it (in-process, tiny model).

The tiny random model would never write JSON by itself; whatever it writes under a schema
must parse and fit it, under a regex match it, under a choice be one of them. Streams give the
same text as the complete answer. Forced tool calls return calls whose arguments fit the
function's parameters. Bad formats are 422s naming the field. (Token-level exactness against
the model's own forward: tests/runtime/test_structured.py; real clients: tests/e2e.)
"""
import json
import re

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from tests.conftest import build_tiny
from server.settings import ServerSettings
from tests.server.test_health_inprocess import wait_ready
from tests.server.test_openai_inprocess import TOOLS_TEMPLATE, sse

PERSON = {"type": "object", "properties": {
    "name": {"enum": ["ada", "alan", "grace"]}, "admin": {"type": "boolean"},
    "langs": {"type": "array", "items": {"enum": ["c", "lisp"]}, "maxItems": 3}},
    "required": ["name", "admin", "langs"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "parameters": {
        "type": "object", "properties": {"unit": {"enum": ["c", "f"]}, "days": {"enum": [1, 3]}},
        "required": ["unit", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}},
        "required": ["zone"], "additionalProperties": False}}}
USER = [{"role": "user", "content": "who?"}]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """The tiny LM with room for tools in the prompt and a few calls after it."""
    tmp = tmp_path_factory.mktemp("structured")
    lm = build_tiny(tmp / "lm", "lm", max_position_embeddings=512)
    path = tmp / "tools.jinja"
    path.write_text(TOOLS_TEMPLATE)
    app = create_app(ServerSettings(model=str(lm), model_id="tiny", chat_template=str(path)))
    with TestClient(app) as c:
        wait_ready(c)
        yield c


def fits_person(text: str) -> bool:
    obj = json.loads(text)
    return set(obj) == {"name", "admin", "langs"} and obj["name"] in ("ada", "alan", "grace") \
        and isinstance(obj["admin"], bool) and set(obj["langs"]) <= {"c", "lisp"}


def chat(client, **body):
    r = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 80, **body})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def streamed_content(client, **body) -> tuple[str, str]:
    chunks = sse(client, "/v1/chat/completions",
                 {"messages": USER, "max_tokens": 80, "stream": True, **body})
    deltas = [ch["choices"][0] for ch in chunks[1:]]
    return "".join(d["delta"].get("content", "") for d in deltas), deltas[-1]["finish_reason"]


@pytest.mark.parametrize("fmt", [
    {"response_format": {"type": "json_schema",
                         "json_schema": {"name": "person", "schema": PERSON, "strict": True}}},
    {"response_format": {"type": "json", "value": PERSON}},  # TGI's chat clients
    {"structured_outputs": {"json": PERSON}},  # vLLM
    {"guided_json": json.dumps(PERSON)},  # vLLM, older name, schema as text
])
def test_chat_json_schema_answers_fit_the_schema_streamed_alike(client, fmt):
    for body in ({"temperature": 0}, {"temperature": 1.2, "seed": 7}):
        choice = chat(client, **fmt, **body)
        text = choice["message"]["content"]
        assert choice["finish_reason"] == "stop" and fits_person(text), text
        assert streamed_content(client, **fmt, **body) == (text, "stop")


def test_json_object_is_any_object(client):
    for seed in range(3):
        choice = chat(client, response_format={"type": "json_object"}, temperature=1.0,
                      seed=seed, max_tokens=200)
        if choice["finish_reason"] == "stop":  # a random model may write a long object
            assert isinstance(json.loads(choice["message"]["content"]), dict)
        else:
            assert choice["message"]["content"].startswith("{")
    plain = chat(client, response_format={"type": "text"}, temperature=0, max_tokens=8,
                 ignore_eos=True)
    assert plain == chat(client, temperature=0, max_tokens=8, ignore_eos=True)


@pytest.mark.parametrize("field,value,fits", [
    ("guided_choice", ["north", "south", "east by east"], lambda t: t in (
        "north", "south", "east by east")),
    ("guided_regex", r"[0-9]{3}-[a-c]{2}", lambda t: re.fullmatch(r"[0-9]{3}-[a-c]{2}", t)),
    ("structured_outputs", {"choice": ["yes", "no"]}, lambda t: t in ("yes", "no")),
    ("structured_outputs", {"grammar": 'start: "x=" NUM ";"\nNUM: /[1-9][0-9]?/'},
     lambda t: re.fullmatch(r"x=[1-9][0-9]?;", t)),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}},
     fits_person),
])
def test_completions_take_the_same_formats(client, field, value, fits):
    for seed in range(3):
        body = {"model": "tiny", "prompt": "the quick brown", "max_tokens": 80,
                "temperature": 1.0, "seed": seed, field: value}
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        (choice,) = r.json()["choices"]
        assert choice["finish_reason"] == "stop" and fits(choice["text"]), choice
        chunks = sse(client, "/v1/completions", {**body, "stream": True})
        assert "".join(ch["choices"][0]["text"] for ch in chunks) == choice["text"]


@pytest.mark.parametrize("grammar,fits", [
    ({"type": "json", "value": PERSON}, fits_person),
    ({"type": "json", "value": json.dumps(PERSON)}, fits_person),
    ({"type": "json_schema", "value": {"name": "p", "schema": PERSON}}, fits_person),
    ({"type": "regex", "value": r"(ab|cd){2,3}\."}, lambda t: re.fullmatch(r"(ab|cd){2,3}\.", t)),
])
def test_tgi_generate_grammar(client, grammar, fits):
    params = {"max_new_tokens": 80, "grammar": grammar, "details": True}
    out = client.post("/generate", json={"inputs": "hello world", "parameters": params}).json()
    assert out["details"]["finish_reason"] == "eos_token" and fits(out["generated_text"]), out
    with client.stream("POST", "/generate_stream",
                       json={"inputs": "hello world", "parameters": params}) as r:
        events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
    assert events[-1]["generated_text"] == out["generated_text"]


def test_a_named_tool_choice_returns_that_call_with_fitting_arguments(client):
    named = {"type": "function", "function": {"name": "get_weather"}}
    for body in ({"temperature": 0}, {"temperature": 1.0, "seed": 3}):
        choice = chat(client, tools=[WEATHER, TIME], tool_choice=named, **body)
        (call,) = choice["message"]["tool_calls"]
        args = json.loads(call["function"]["arguments"])
        assert call["function"]["name"] == "get_weather" and call["type"] == "function"
        assert args["unit"] in ("c", "f") and args["days"] in (1, 3) and len(args) == 2
        assert choice["message"]["content"] is None and choice["finish_reason"] == "stop"
        chunks = sse(client, "/v1/chat/completions", {"messages": USER, "max_tokens": 80,
                                                      "tools": [WEATHER, TIME],
                                                      "tool_choice": named, "stream": True,
                                                      **body})
        calls = [c for ch in chunks for c in ch["choices"][0]["delta"].get("tool_calls", [])]
        assert [c["function"] for c in calls] == [call["function"]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("parallel", [True, False])
def test_required_tool_choice_returns_calls_of_the_tools(client, parallel):
    seen = set()
    for seed in range(4):
        choice = chat(client, tools=[WEATHER, TIME], tool_choice="required", temperature=1.0,
                      seed=seed, parallel_tool_calls=parallel, max_tokens=400)
        calls = choice["message"]["tool_calls"]
        assert calls and (parallel or len(calls) == 1), choice
        for call in calls:
            args = json.loads(call["function"]["arguments"])
            name = call["function"]["name"]
            seen.add(name)
            assert (name, set(args)) in (("get_weather", {"unit", "days"}),
                                         ("get_time", {"zone"}))
        assert len({c["id"] for c in calls}) == len(calls)
    assert seen  # (which tools a random model picks is its own business)


def test_forced_calls_need_no_tool_call_parser_but_auto_does(client):
    r = client.post("/v1/chat/completions", json={"messages": USER, "tools": [WEATHER],
                                                  "max_tokens": 4})
    assert r.status_code == 422 and "--tool-call-parser" in r.text


@pytest.mark.parametrize("body,param,needle", [
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "propertyNames": {"pattern": "a"}},
        "strict": True}}}, "response_format.json_schema.schema", "propertyNames"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "needs its `json_schema`"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "strin"}}}},
     "response_format.json_schema.schema", "Invalid type"),
    ({"response_format": {"type": "xml"}}, None, "response_format.type"),
    ({"guided_regex": "(?=x)y"}, "guided_regex", "look-around"),
    ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
    ({"guided_choice": []}, "guided_choice", "at least one"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs",
     "exactly one"),
    ({"structured_outputs": {"grammar": "start: nothing_here"}}, "structured_outputs.grammar",
     "unknown name"),
    ({"guided_regex": "a+", "response_format": {"type": "json_object"}}, "guided_regex",
     "asks for one output format"),
])
def test_bad_formats_are_422_naming_the_field(client, body, param, needle):
    r = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 4, **body})
    assert r.status_code == 422 and needle in r.text, r.text
    if param is not None:
        assert r.json()["error"]["param"] == param
    assert chat(client, max_tokens=2)["finish_reason"] in ("stop", "length")  # the server goes on


@pytest.mark.parametrize("grammar,needle", [
    ({"type": "regex"}, "needs the pattern"),
    ({"type": "json", "value": [1]}, "must be a JSON Schema"),
    ({"type": "json_schema", "value": {"name": "x"}}, '{"name", "schema"}'),
    ({"type": "ebnf", "value": "x"}, '"type": "json" | "regex"'),
])
def test_bad_tgi_grammars_are_422(client, grammar, needle):
    r = client.post("/generate", json={"inputs": "hi", "parameters": {"grammar": grammar}})
    assert r.status_code == 422 and needle in r.json()["error"], r.text
