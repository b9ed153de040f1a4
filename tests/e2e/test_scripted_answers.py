"""Reasoning and tool calls over real HTTP, read by the real `openai` client, from a model that
writes them: a dense GPT-2-shaped checkpoint built here whose greedy answer to one prompt is a
chosen text — Qwen3's `<think>` block, then a hermes `<tool_call>` — then EOS.

How it writes it: every block's attention and FFN outputs are zero, token embeddings are zero,
so the final hidden state at position p is the layer norm of the position embedding at p; that
embedding is a one-hot vector for the dimension of the token the script puts after p, and the
(untied) LM head maps each scripted token to its own dimension. The answer is the script at any
batch or thread count, exactly (what the server returns is decided by its parsers, under test).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import make_tokenizer
from tests.server.live_server import live_server

TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
QUESTION = "weather in Paris?"
RENDERED = f"<user>{QUESTION}<assistant>"  # TEMPLATE's prompt for that one user message
THINKING = "\nThe user wants the weather; I should look it up.\n"
ARGUMENTS = {"city": "Paris", "unit": "celsius"}
SCRIPT = (f"<think>{THINKING}</think>\n\n<tool_call>\n"
          + json.dumps({"name": "get_weather", "arguments": ARGUMENTS}) + "\n</tool_call>")
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "today's weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string"}}}}}


def build_scripted(out: Path, script: str, think_tokens: bool = False,
                   special: tuple[str, ...] = (), template: str = TEMPLATE,
                   rendered: str = RENDERED) -> Path:
    """`think_tokens`: `<think>` and `</think>` are added (not special) tokens, as in Qwen3's
    vocabulary, so each is one id wherever it stands; `special`: added special tokens (GPT-OSS's
    harmony markup). `template` renders the one question as `rendered`."""
    from camex_runtime import CamexConfig, CamexForCausalLM, export

    tok = make_tokenizer(out.parent / "scripted-tok")
    if think_tokens:
        tok.add_tokens(["<think>", "</think>"])
    if special:
        tok.add_special_tokens({"additional_special_tokens": list(special)})
    prompt = tok(rendered, add_special_tokens=False)["input_ids"]
    answer = tok(script, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert tok.decode(answer[:-1]) == script  # the byte-level BPE round-trips it
    dims = {t: i for i, t in enumerate(dict.fromkeys(answer))}
    d = max(64, len(dims))
    cfg = CamexConfig(vocab_size=len(tok), d_model=d, n_layer=1, n_head=4, d_ff=32,
                      max_position_embeddings=512, num_experts=0,
                      tie_word_embeddings=False, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    model = CamexForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.transformer.ln_f.weight.fill_(1.0)
        for k, token in enumerate(answer):  # position P-1+k predicts the k-th answer token
            model.transformer.wpe.weight[len(prompt) - 1 + k, dims[token]] = 1.0
        for token, dim in dims.items():
            model.lm_head.weight[token, dim] = 10.0
    export(model, out, tokenizer=tok, provenance={"training_data": "scripted (tests)"})
    (out.parent / "template.jinja").write_text(template)
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("scripted")
    model = build_scripted(work / "model", SCRIPT)
    with live_server(work, "--model", str(model), "--chat-template",
                     str(work / "template.jinja"), "--reasoning-parser", "qwen3",
                     "--tool-call-parser", "hermes", "--model-id", "scripted") as srv:
        yield srv


def test_the_raw_answer_is_the_script(server):
    """Without tools and with a parser-free route (completions) the model writes the script."""
    from openai import OpenAI

    client = OpenAI(base_url=server.base_url + "/v1", api_key="unused")
    out = client.completions.create(model="scripted", prompt=RENDERED, max_tokens=300,
                                    temperature=0)
    assert out.choices[0].text == SCRIPT and out.choices[0].finish_reason == "stop"


def test_openai_client_reads_reasoning_and_the_tool_call(server):
    from openai import OpenAI

    client = OpenAI(base_url=server.base_url + "/v1", api_key="unused")
    kw = dict(model="scripted", messages=[{"role": "user", "content": QUESTION}],
              tools=[WEATHER], max_tokens=300, temperature=0)
    out = client.chat.completions.create(**kw)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.model_extra["reasoning_content"] == THINKING
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == ARGUMENTS and call.id
    # streamed: the reasoning as it comes, the call as one delta, the same finish
    reasoning, content, calls, finish = [], [], [], None
    for chunk in client.chat.completions.create(stream=True, **kw):
        delta = chunk.choices[0].delta
        reasoning.append((delta.model_extra or {}).get("reasoning_content") or "")
        content.append(delta.content or "")
        calls += delta.tool_calls or []
        finish = chunk.choices[0].finish_reason or finish
    assert "".join(reasoning) == THINKING and "".join(content) == ""
    assert [(c.index, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        (0, "get_weather", ARGUMENTS)]
    assert finish == "tool_calls"
    # tool_choice "none": nothing parsed as a call; the reasoning still split off
    plain = client.chat.completions.create(tool_choice="none", **kw).choices[0]
    assert plain.finish_reason == "stop" and plain.message.tool_calls is None
    assert plain.message.content == SCRIPT.split("</think>", 1)[1]


# Llama 3.1's and Mistral's call formats: the whole answer is the call
JSON_SCRIPTS = {
    "llama3_json": '<|python_tag|>{"name": "get_weather", "parameters": '
                   + json.dumps(ARGUMENTS) + '}; {"name": "now", "parameters": {}}',
    "mistral": '[TOOL_CALLS][{"name": "get_weather", "arguments": ' + json.dumps(ARGUMENTS)
               + '}, {"name": "now", "arguments": {}}]',
}


@pytest.mark.parametrize("parser", sorted(JSON_SCRIPTS))
def test_json_call_answers_reach_the_openai_client_as_calls(tmp_path, parser):
    from openai import OpenAI

    model = build_scripted(tmp_path / "model", JSON_SCRIPTS[parser])
    with live_server(tmp_path, "--model", str(model), "--chat-template",
                     str(tmp_path / "template.jinja"), "--tool-call-parser", parser) as srv:
        client = OpenAI(base_url=srv.base_url + "/v1", api_key="unused")
        kw = dict(model="model", messages=[{"role": "user", "content": QUESTION}], tools=[WEATHER],
                  max_tokens=300, temperature=0)
        choice = client.chat.completions.create(**kw).choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert [(c.function.name, json.loads(c.function.arguments))
                for c in choice.message.tool_calls] == [("get_weather", ARGUMENTS), ("now", {})]
        calls = [c for chunk in client.chat.completions.create(stream=True, **kw)
                 for c in chunk.choices[0].delta.tool_calls or []]
        assert [(c.index, c.function.name) for c in calls] == [(0, "get_weather"), (1, "now")]


# A thinking model answering in JSON: reasoning, then the arguments alone
ANSWER_SCRIPT = f"<think>{THINKING}</think>" + json.dumps(ARGUMENTS)


@pytest.fixture(scope="module")
def json_server(tmp_path_factory):
    work = tmp_path_factory.mktemp("scripted-json")
    model = build_scripted(work / "model", ANSWER_SCRIPT, think_tokens=True)
    with live_server(work, "--model", str(model), "--chat-template",
                     str(work / "template.jinja"), "--reasoning-parser", "qwen3",
                     "--model-id", "scripted") as srv:
        srv.model_dir = model
        yield srv


def test_structured_output_starts_after_the_reasoning(json_server):
    """With a reasoning parser the grammar waits for `</think>`: the model thinks freely, then
    its answer is held to the schema (here the script already fits it, so nothing changes);
    a forced call's arguments likewise. Were the grammar applied from the first token, the
    answer could not start with `<think>`."""
    from openai import OpenAI
    from pydantic import BaseModel, ConfigDict

    class Weather(BaseModel):
        model_config = ConfigDict(extra="forbid")
        city: str
        unit: str

    client = OpenAI(base_url=json_server.base_url + "/v1", api_key="unused")
    kw = dict(model="scripted", messages=[{"role": "user", "content": QUESTION}],
              max_completion_tokens=300, temperature=0)
    out = client.chat.completions.parse(response_format=Weather, **kw).choices[0]
    assert out.message.model_extra["reasoning_content"] == THINKING
    assert out.message.parsed == Weather(**ARGUMENTS) and out.finish_reason == "stop"
    assert out.message.content == json.dumps(ARGUMENTS)
    forced = client.chat.completions.create(
        tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}},
        **kw).choices[0]
    (call,) = forced.message.tool_calls
    assert call.function.name == "get_weather" and call.function.arguments == json.dumps(
        ARGUMENTS)
    assert forced.message.model_extra["reasoning_content"] == THINKING
    # thinking turned off: the grammar applies from the first token, so no `<think>` part
    off = client.chat.completions.create(
        response_format={"type": "json_schema", "json_schema": {
            "name": "w", "schema": Weather.model_json_schema()}},
        extra_body={"chat_template_kwargs": {"enable_thinking": False}}, **kw).choices[0]
    assert off.message.content.startswith('{"') and "<think>" not in off.message.content


def test_responses_api_returns_the_reasoning_item_and_the_parsed_answer(json_server):
    from openai import OpenAI
    from pydantic import BaseModel, ConfigDict
    from transformers import AutoTokenizer

    class Weather(BaseModel):
        model_config = ConfigDict(extra="forbid")
        city: str
        unit: str

    client = OpenAI(base_url=json_server.base_url + "/v1", api_key="unused")
    out = client.responses.parse(model="scripted", input=QUESTION, text_format=Weather,
                                 max_output_tokens=300, temperature=0)
    reasoning, message = out.output
    assert reasoning.type == "reasoning" and reasoning.content[0].text == THINKING
    assert message.type == "message" and out.output_parsed == Weather(**ARGUMENTS)
    tok = AutoTokenizer.from_pretrained(str(json_server.model_dir))
    thought = tok(f"<think>{THINKING}</think>", add_special_tokens=False)["input_ids"]
    assert out.usage.output_tokens_details.reasoning_tokens == len(thought)
    with client.responses.stream(model="scripted", input=QUESTION, text_format=Weather,
                                 max_output_tokens=300, temperature=0) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_response()
    assert "response.reasoning_text.delta" in kinds and final.output_parsed == out.output_parsed
    assert final.output[0].content[0].text == THINKING


# GPT-OSS's harmony format: the markup is special tokens, the reasoning its analysis channel
HARMONY_MARKS = ("<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>")
HARMONY_TEMPLATE = ("{% for m in messages %}<|start|>{{ m['role'] }}<|message|>{{ m['content'] }}"
                    "<|end|>{% endfor %}<|start|>assistant")
ANALYSIS = "The user asks about Paris weather; answer in the JSON asked for."
FINAL = json.dumps(ARGUMENTS)
HARMONY_SCRIPT = (f"<|channel|>analysis<|message|>{ANALYSIS}<|end|><|start|>assistant"
                  f"<|channel|>final<|message|>{FINAL}")


def test_gpt_oss_harmony_channels_reach_the_openai_client_split(tmp_path):
    """`--reasoning-parser openai_gptoss`: the analysis channel is the message's reasoning, the
    final channel its content, with no markup in either, complete or streamed (decoded with the
    special tokens kept for the split, which drops them); the Responses API counts the
    reasoning tokens up to the final channel's opening; a structured answer is held to its
    schema from the final channel on (from the first token, `<|channel|>` could not come)."""
    from openai import OpenAI
    from pydantic import BaseModel, ConfigDict

    class Weather(BaseModel):
        model_config = ConfigDict(extra="forbid")
        city: str
        unit: str

    rendered = f"<|start|>user<|message|>{QUESTION}<|end|><|start|>assistant"
    model = build_scripted(tmp_path / "model", HARMONY_SCRIPT, special=HARMONY_MARKS,
                           template=HARMONY_TEMPLATE, rendered=rendered)
    with live_server(tmp_path, "--model", str(model), "--chat-template",
                     str(tmp_path / "template.jinja"), "--reasoning-parser", "openai_gptoss",
                     "--model-id", "gpt-oss-scripted") as srv:
        client = OpenAI(base_url=srv.base_url + "/v1", api_key="unused")
        kw = dict(model="gpt-oss-scripted", messages=[{"role": "user", "content": QUESTION}],
                  max_tokens=300, temperature=0)
        choice = client.chat.completions.create(**kw).choices[0]
        assert choice.finish_reason == "stop" and choice.message.content == FINAL
        assert choice.message.model_extra["reasoning_content"] == ANALYSIS
        reasoning, content = [], []
        for chunk in client.chat.completions.create(stream=True, **kw):
            delta = chunk.choices[0].delta
            reasoning.append((delta.model_extra or {}).get("reasoning") or "")
            content.append(delta.content or "")
        assert "".join(reasoning) == ANALYSIS and "".join(content) == FINAL
        out = client.responses.create(model="gpt-oss-scripted", input=QUESTION,
                                      max_output_tokens=300, temperature=0)
        assert out.output_text == FINAL
        tokens = len(model_tokenizer(model)(HARMONY_SCRIPT.split("<|channel|>final")[0]
                                            + "<|channel|>final<|message|>",
                                            add_special_tokens=False)["input_ids"])
        assert out.usage.output_tokens_details.reasoning_tokens == tokens
        parsed = client.chat.completions.parse(response_format=Weather, **kw).choices[0]
        assert parsed.message.parsed == Weather(**ARGUMENTS)
        assert parsed.message.model_extra["reasoning_content"] == ANALYSIS


def model_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


HARMONY_CALL = (f"<|channel|>analysis<|message|>{THINKING}<|end|><|start|>assistant<|channel|>"
                "commentary to=functions.get_weather <|constrain|>json<|message|>"
                + json.dumps(ARGUMENTS) + "<|call|>")


def test_gpt_oss_harmony_tool_calls_reach_the_openai_client(tmp_path):
    """`--tool-call-parser openai`: a commentary message to functions.get_weather is an OpenAI
    tool call (its content the arguments), complete and streamed; the analysis is still the
    reasoning; a forced call is refused with the reason (harmony has no grammar for it)."""
    import openai

    rendered = f"<|start|>user<|message|>{QUESTION}<|end|><|start|>assistant"
    model = build_scripted(tmp_path / "model", HARMONY_CALL,
                           special=(*HARMONY_MARKS, "<|call|>", "<|constrain|>"),
                           template=HARMONY_TEMPLATE, rendered=rendered)
    with live_server(tmp_path, "--model", str(model), "--chat-template",
                     str(tmp_path / "template.jinja"), "--reasoning-parser", "openai_gptoss",
                     "--tool-call-parser", "openai", "--model-id", "gpt-oss") as srv:
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="unused")
        kw = dict(model="gpt-oss", messages=[{"role": "user", "content": QUESTION}],
                  tools=[WEATHER], max_tokens=300, temperature=0)
        choice = client.chat.completions.create(**kw).choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert choice.message.model_extra["reasoning_content"] == THINKING
        (call,) = choice.message.tool_calls
        assert call.function.name == "get_weather" and call.id
        assert json.loads(call.function.arguments) == ARGUMENTS
        calls, reasoning, finish = [], [], None
        for chunk in client.chat.completions.create(stream=True, **kw):
            delta = chunk.choices[0].delta
            calls += delta.tool_calls or []
            reasoning.append((delta.model_extra or {}).get("reasoning_content") or "")
            finish = chunk.choices[0].finish_reason or finish
        assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
            ("get_weather", ARGUMENTS)] and finish == "tool_calls"
        assert "".join(reasoning) == THINKING
        with pytest.raises(openai.APIStatusError, match="not supported in GPT-OSS's harmony"):
            client.chat.completions.create(tool_choice="required", **kw)
        # the Responses API: a function_call item after the reasoning item
        tool = {"type": "function", "name": "get_weather",
                "parameters": WEATHER["function"]["parameters"]}
        out = client.responses.create(model="gpt-oss", input=QUESTION, tools=[tool],
                                      max_output_tokens=300, temperature=0)
        kinds = [item.type for item in out.output]
        (item,) = [item for item in out.output if item.type == "function_call"]
        assert kinds[0] == "reasoning" and out.output[0].content[0].text == THINKING
        assert item.name == "get_weather" and json.loads(item.arguments) == ARGUMENTS
