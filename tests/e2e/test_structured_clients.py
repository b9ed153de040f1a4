"""Structured output as real clients ask for it, over HTTP on 127.0.0.1: the `openai` client's
`chat.completions.parse` (a Pydantic model as a strict JSON Schema, the answer parsed back into
it) and its forced tool call with `pydantic_function_tool`, huggingface_hub's `grammar` and
chat `response_format`, and the `text-generation` client's `Grammar`. The tiny random model
writes whatever the grammar allows; the clients' own parsers must accept it.
"""

from __future__ import annotations

import json
import re
from typing import Literal

import pytest
from pydantic import BaseModel, ConfigDict

from tests.conftest import build_tiny
from tests.server.live_server import live_server

pytestmark = pytest.mark.e2e

TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>"


class Person(BaseModel):
    model_config = ConfigDict(extra="forbid")  # additionalProperties false: a bounded answer
    name: Literal["ada", "alan", "grace"]
    admin: bool
    langs: list[Literal["c", "lisp"]]


class GetWeather(BaseModel):
    """Today's weather."""
    unit: Literal["c", "f"]
    days: Literal[1, 3]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("structured-e2e")
    lm = build_tiny(tmp / "lm", "lm", max_position_embeddings=512)
    (tmp / "chat.jinja").write_text(TEMPLATE)
    with live_server(tmp, "--model", str(lm), "--model-id", "tiny",
                     "--chat-template", str(tmp / "chat.jinja")) as srv:
        yield srv


def test_openai_parse_fills_the_pydantic_model(server):
    from openai import OpenAI

    client = OpenAI(base_url=server.base_url + "/v1", api_key="unused")
    for seed in range(3):
        out = client.chat.completions.parse(
            model="tiny", messages=[{"role": "user", "content": "who?"}], response_format=Person,
            temperature=1.0, seed=seed, max_completion_tokens=200)
        message = out.choices[0].message
        assert out.choices[0].finish_reason == "stop"
        assert isinstance(message.parsed, Person)
        assert message.parsed == Person.model_validate_json(message.content)


def test_openai_forced_tool_call_parses_its_arguments(server):
    import openai

    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused")
    tool = openai.pydantic_function_tool(GetWeather)
    out = client.chat.completions.parse(
        model="tiny", messages=[{"role": "user", "content": "weather?"}], tools=[tool],
        tool_choice={"type": "function", "function": {"name": "GetWeather"}}, temperature=0,
        max_completion_tokens=100)
    (call,) = out.choices[0].message.tool_calls
    assert call.function.name == "GetWeather"
    assert isinstance(call.function.parsed_arguments, GetWeather)
    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "weather?"}], tools=[tool],
        tool_choice={"type": "function", "function": {"name": "GetWeather"}}, temperature=0,
        max_completion_tokens=100, stream=True)
    calls = [c for chunk in stream for c in (chunk.choices[0].delta.tool_calls or [])]
    assert [c.function.arguments for c in calls] == [call.function.arguments]


def test_huggingface_hub_grammar_and_chat_response_format(server):
    from huggingface_hub import InferenceClient

    client = InferenceClient(base_url=server.base_url)
    text = client.text_generation("the quick brown", max_new_tokens=60,
                                  grammar={"type": "regex", "value": r"[a-c]{2}-[0-9]{2}"})
    assert re.fullmatch(r"[a-c]{2}-[0-9]{2}", text)
    schema = Person.model_json_schema()
    out = client.chat_completion([{"role": "user", "content": "who?"}], max_tokens=200,
                                 response_format={"type": "json", "value": schema})
    assert isinstance(Person.model_validate_json(out.choices[0].message.content), Person)


def test_text_generation_client_grammar(server):
    from text_generation import Client
    from text_generation.types import Grammar, GrammarType

    client = Client(server.base_url)
    grammar = Grammar(type=GrammarType.Json, value=Person.model_json_schema())
    out = client.generate("hello world", max_new_tokens=200, grammar=grammar)
    assert out.details.finish_reason == "eos_token"
    Person.model_validate(json.loads(out.generated_text))
    streamed = "".join(r.token.text for r in client.generate_stream(
        "hello world", max_new_tokens=200, grammar=grammar) if not r.token.special)
    assert streamed == out.generated_text


def test_openai_responses_api_plain_streamed_parsed_and_calling(server):
    """`responses.create`, `.stream()` (the client assembles the typed events and checks their
    order and item identities), `.parse(text_format=...)` and a forced function call."""
    from openai import OpenAI

    client = OpenAI(base_url=server.base_url + "/v1", api_key="unused")
    kw = dict(model="tiny", input="the quick brown", max_output_tokens=12, temperature=0)
    plain = client.responses.create(**kw)
    assert plain.object == "response" and plain.output_text
    assert plain.status in ("completed", "incomplete")
    with client.responses.stream(**kw) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        if plain.status == "completed":
            assert stream.get_final_response().output_text == plain.output_text
    assert "".join(deltas) == plain.output_text
    parsed = client.responses.parse(model="tiny", input="who?", text_format=Person,
                                    max_output_tokens=200, temperature=0)
    assert isinstance(parsed.output_parsed, Person) and parsed.status == "completed"
    tool = {"type": "function", "name": "get_weather", "strict": True,
            "parameters": {**GetWeather.model_json_schema(), "additionalProperties": False}}
    out = client.responses.create(model="tiny", input="weather?", tools=[tool],
                                  tool_choice="required", max_output_tokens=200, temperature=0)
    calls = [item for item in out.output if item.type == "function_call"]
    assert calls and all(c.name == "get_weather" for c in calls)
    for c in calls:
        GetWeather.model_validate_json(c.arguments)
    # what agents send every turn, and the answer's logprobs, through the client's own types
    agent = dict(kw, reasoning={"effort": "low", "summary": "auto"}, prompt_cache_key="s1",
                 safety_identifier="u1", service_tier="auto", store=False,
                 include=["message.output_text.logprobs", "reasoning.encrypted_content"],
                 top_logprobs=2)
    answered = client.responses.create(**agent)
    (part,) = answered.output[0].content
    assert len(part.logprobs) == answered.usage.output_tokens
    assert all(len(t.top_logprobs) == 2 for t in part.logprobs)
    with client.responses.stream(**agent) as stream:
        streamed = [t for e in stream if e.type == "response.output_text.delta"
                    for t in e.logprobs]
    assert [t.token for t in streamed] == [t.token for t in part.logprobs]
