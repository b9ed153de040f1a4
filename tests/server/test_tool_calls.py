"""--tool-call-parser hermes: `<tool_call>{json}</tool_call>` blocks out of a chat answer as
OpenAI tool calls, piece by piece: a streamed answer, cut anywhere, gives the content and the
calls the whole answer gives (vLLM's hermes rules)."""
from __future__ import annotations

import json

import pytest

from server.tool_calls import ToolCallSplit, parse_block, splitter
from tests.server.pieces import random_pieces

CALL_A = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n'
          '</tool_call>')
CALL_B = '<tool_call>{"name": "now", "arguments": {}}</tool_call>'


def whole(text: str, parallel: bool = True):
    split = ToolCallSplit(parallel)
    split.push(text, final=True)
    content, calls = split.whole()
    return content, [(c.name, json.loads(c.arguments)) for c in calls]


@pytest.mark.parametrize("text,want", [
    ("Just an answer.", ("Just an answer.", [])),
    ("Let me check.\n" + CALL_A, ("Let me check.\n",
                                  [("get_weather", {"city": "Paris", "unit": "C"})])),
    (CALL_A + "\n" + CALL_B, (None, [("get_weather", {"city": "Paris", "unit": "C"}),
                                     ("now", {})])),
    (CALL_B + " and some words after", (None, [("now", {})])),  # text after calls: dropped
    ('<tool_call>{"name": "now", "arguments": {}}', (None, [("now", {})])),  # stopped inside
    ("<tool_call>not json</tool_call> rest", ("<tool_call>not json</tool_call> rest", [])),
    ('<tool_call>{"arguments": {}}</tool_call>', ('<tool_call>{"arguments": {}}</tool_call>',
                                                  [])),  # no name: not a call
    ("a <tool_ca b", ("a <tool_ca b", [])),
    ("\n\n" + CALL_B, (None, [("now", {})])),  # whitespace alone before a call: no content
    (" \n<tool_call>not json</tool_call>", (" \n<tool_call>not json</tool_call>", [])),
    ("  \n", ("  \n", [])),
])
def test_whole_answers_split_as_vllm_hermes_splits_them(text, want):
    assert whole(text) == want


def test_without_parallel_calls_the_first_is_kept():
    assert whole(CALL_A + CALL_B, parallel=False)[1] == [
        ("get_weather", {"city": "Paris", "unit": "C"})]


def test_arguments_are_json_text_and_every_call_has_its_own_id():
    a = parse_block('{"name": "f", "arguments": {"x": [1, "é"]}}')
    b = parse_block('{"name": "f", "arguments": "{\\"x\\": 1}"}')  # already a string: kept
    assert a.arguments == '{"x": [1, "é"]}' and b.arguments == '{"x": 1}'
    assert a.id != b.id and a.id.startswith("chatcmpl-tool-")
    assert a.json(0) == {"index": 0, "id": a.id, "type": "function",
                         "function": {"name": "f", "arguments": a.arguments}}
    assert parse_block("[1, 2]") is None and parse_block('{"name": 3}') is None


@pytest.mark.parametrize("text", [
    "Let me check.\n" + CALL_A + "\n" + CALL_B,
    "plain text with < and <tool and </tool_call> in it",
    "<tool_call>not json</tool_call> then text",
    CALL_B + "\n\n  <tool_ca",
    "x" + CALL_A[:-5],
    "\n \n" + CALL_A, " \n<tool_call>oops</tool_call> tail", "\n\nAnswer " + CALL_B,
])
def test_any_cut_into_pieces_gives_the_whole_answers_calls(text):
    want = whole(text)
    for pieces in random_pieces(text, seed=1):
        split, content, calls = ToolCallSplit(), [], []
        for i, piece in enumerate(pieces):
            c, new = split.push(piece, final=i == len(pieces) - 1)
            content.append(c)
            calls += [(x.name, json.loads(x.arguments)) for x in new]
        assert ("".join(content) or None, calls) == want, pieces


def fake_choice(text: str, reason: str = "eos_token", parallel: bool = True):
    """What the chat route reads of a finished choice."""
    from types import SimpleNamespace
    return SimpleNamespace(index=0, text=text, think=None, calls=ToolCallSplit(parallel),
                           run=SimpleNamespace(events=[],
                                               result=SimpleNamespace(finish_reason=reason,
                                                                      stop_reason=None)))


def test_a_message_with_calls_is_what_the_openai_client_reads():
    """The route's message and finish reason for an answer with calls, parsed by the
    `openai` package's own response types; and the streamed deltas of the same answer."""
    from openai.types.chat import ChatCompletion

    from server.openai_protocol import ChatCompletionRequest
    from server.routes.chat import answer_delta, choice_json

    text = "Checking.\n" + CALL_A + "\n" + CALL_B
    body = ChatCompletionRequest(messages=[{"role": "user", "content": "weather?"}],
                                 tools=[{"type": "function", "function": {"name": "now"}}])
    choice = choice_json(fake_choice(text), body, tokenizer=None)
    doc = {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "m",
           "choices": [choice.model_dump(exclude_none=True)]}
    parsed = ChatCompletion.model_validate(doc).choices[0]
    assert parsed.finish_reason == "tool_calls" and parsed.message.content == "Checking.\n"
    calls = parsed.message.tool_calls
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris", "unit": "C"}), ("now", {})]
    assert len({c.id for c in calls}) == 2
    streamed = fake_choice(text)
    deltas = [answer_delta(streamed, piece, final=i == 2)
              for i, piece in enumerate((text[:20], text[20:70], text[70:]))]
    assert "".join(d.get("content", "") for d in deltas) == "Checking.\n"
    sent = [tc for d in deltas for tc in d.get("tool_calls", [])]
    assert [(tc["index"], tc["function"]["name"]) for tc in sent] == [(0, "get_weather"),
                                                                       (1, "now")]
    one = choice_json(fake_choice(text, parallel=False), body, tokenizer=None)
    assert [c.function.name for c in one.message.tool_calls] == ["get_weather"]
    none = choice_json(fake_choice("no calls", reason="length"), body, tokenizer=None)
    assert none.finish_reason == "length" and none.message.tool_calls is None


def json_whole(parser: str, text: str, parallel: bool = True):
    split = splitter(parser, parallel)
    split.push(text, final=True)
    content, calls = split.whole()
    return content, [(c.name, json.loads(c.arguments)) for c in calls]


LLAMA_A = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
LLAMA_B = '{"name": "now", "parameters": {}}'
MISTRAL = ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, '
           '{"name": "now", "arguments": {}}]')
WEATHER, NOW = ("get_weather", {"city": "Paris"}), ("now", {})


@pytest.mark.parametrize("parser,text,want", [
    ("llama3_json", LLAMA_A, (None, [WEATHER])),
    ("llama3_json", "<|python_tag|>" + LLAMA_A + "; " + LLAMA_B, (None, [WEATHER, NOW])),
    ("llama3_json", " \n" + LLAMA_A + ";", (None, [WEATHER])),
    ("llama3_json", "It is sunny.", ("It is sunny.", [])),
    ("llama3_json", '{"answer": 42}', ('{"answer": 42}', [])),  # JSON, but no call
    ("llama3_json", LLAMA_A + " and more", (LLAMA_A + " and more", [])),
    ("llama3_json", '{"name": "now", "param', ('{"name": "now", "param', [])),  # cut short
    ("mistral", MISTRAL, (None, [WEATHER, NOW])),
    ("mistral", '[TOOL_CALLS]{"name": "now", "arguments": {}}', (None, [NOW])),
    ("mistral", "[TOOL_CALLS] not json", ("[TOOL_CALLS] not json", [])),
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]now[ARGS]{}',
     (None, [WEATHER, NOW])),  # tokenizers v11+
    ("mistral", "[TOOL_CALLS]now[ARGS]{oops", ("[TOOL_CALLS]now[ARGS]{oops", [])),
    ("mistral", "Plain [TOOL_CALLS] later", ("Plain [TOOL_CALLS] later", [])),
])
def test_json_answers_split_as_vllm_llama3_and_mistral_parsers_split_them(parser, text, want):
    assert json_whole(parser, text) == want


@pytest.mark.parametrize("parser,text", [
    ("llama3_json", "<|python_tag|>" + LLAMA_A + "; " + LLAMA_B),
    ("llama3_json", "It is { sunny }."), ("llama3_json", "  <|pyth"),
    ("mistral", MISTRAL), ("mistral", "[TOOL_ not quite"),
])
def test_json_answers_cut_anywhere_give_the_whole_answers_calls(parser, text):
    want = json_whole(parser, text)
    for pieces in random_pieces(text, seed=2):
        split, content, calls = splitter(parser), [], []
        for i, piece in enumerate(pieces):
            c, new = split.push(piece, final=i == len(pieces) - 1)
            content.append(c)
            calls += [(x.name, json.loads(x.arguments)) for x in new]
        assert ("".join(content) or None, calls) == want, pieces
    assert json_whole(parser, text, parallel=False)[1] == want[1][:1]


def test_a_plain_answer_streams_at_once_and_a_call_waits_for_its_end():
    split = splitter("llama3_json")
    assert split.push("Sunny") == ("Sunny", [])  # decided: content, sent now
    split = splitter("llama3_json")
    assert split.push('{"name": "now", ') == ("", [])  # may be a call: held
    content, calls = split.push('"parameters": {}}', final=True)
    assert content == "" and [c.name for c in calls] == ["now"]
    with pytest.raises(ValueError, match="unknown tool-call parser 'xml'"):
        splitter("xml")


# GPT-OSS (`openai`): calls are harmony commentary messages to functions.NAME, read by the
# choice's HarmonySplit and handed on by HarmonyCalls
CALLING = ('<|channel|>analysis<|message|>Two lookups.<|end|><|start|>assistant<|channel|>'
           'commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}'
           '<|call|><|start|>assistant to=functions.now<|channel|>commentary json<|message|>{}'
           '<|call|>')


def harmony_calls(pieces: list[str], parallel: bool = True):
    from server.reasoning import HarmonySplit

    think = HarmonySplit(("<|endoftext|>",), calls=True)
    calls = splitter("openai", parallel, think)
    reasoning, content, found = [], [], []
    for i, piece in enumerate(pieces):
        final = i == len(pieces) - 1
        r, a = think.push(piece, final)
        a, new = calls.push(a, final)
        reasoning.append(r)
        content.append(a)
        found += [(c.name, c.arguments) for c in new]
    return "".join(reasoning), "".join(content), found


def test_harmony_calls_come_from_commentary_messages_to_functions():
    """The recipient in the channel's header or the role's, `functions.` dropped; the content
    the arguments as written; the analysis still reasoning, nothing left as content."""
    want = ("Two lookups.", "", [("get_weather", '{"city": "Paris"}'), ("now", "{}")])
    assert harmony_calls([CALLING]) == want
    for pieces in random_pieces(CALLING, seed=3, most_cuts=8):
        assert harmony_calls(pieces) == want, pieces
    assert harmony_calls([CALLING], parallel=False)[2] == [("get_weather", '{"city": "Paris"}')]
    # stopped inside a call (the budget ran out): its arguments so far
    assert harmony_calls([CALLING[:CALLING.index("Paris") + 5]])[2] == [
        ("get_weather", '{"city": "Paris')]
    # without calls collected, a call message is content (what the model wrote)
    from server.reasoning import HarmonySplit

    plain = HarmonySplit()
    plain.push(CALLING, final=True)
    assert plain.whole() == ("Two lookups.", '{"city": "Paris"}{}') and plain.pending == []
