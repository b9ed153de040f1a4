"""Tool calls out of a chat answer (`--tool-call-parser hermes|llama3_json|mistral`, as vLLM's
parsers of those names).

Models trained on the Hermes format (Qwen2.5, Qwen3, Hermes, ...) call a tool by writing
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` in their answer, one block per call;
their chat templates show them the request's `tools` and render earlier calls and `tool`
results. With the parser, `/v1/chat/completions` returns each block as an OpenAI tool call
(`{"id", "type": "function", "function": {"name", "arguments": "<JSON text>"}}`), the text
before the first block as `content`, and finish reason `tool_calls`.

The rules (vLLM's hermes parser): a block runs to its `</tool_call>`, or to the end of the text
when the model stopped inside it; a block whose body is not a JSON object with a string `name`
is not a call, and the text stays content as written; text after a call is dropped (vLLM keeps
only what precedes the first block). `parallel_tool_calls: false` keeps the first call.

`ToolCallSplit` reads one choice's answer piece by piece, as `server.reasoning.ThinkSplit` does:
text before a block streams as content at once (a piece's end that may start `<tool_call>` is
held back), a block is held until it closes and then sent as one tool-call delta with its
whole arguments. The complete answer is one piece, so both forms give the same calls.

Llama 3.1+ (`llama3_json`) and Mistral (`mistral`) answer a call with JSON instead of text:
`{"name": ..., "parameters": {...}}` (several joined by `;`, optionally after
`<|python_tag|>`), or `[TOOL_CALLS]` and a JSON list of `{"name", "arguments"}` (or, with
Mistral's v11+ tokenizers, `[TOOL_CALLS]name[ARGS]{arguments}` per call).
`JsonToolCalls` decides from the answer's start: an answer that begins so is held whole and
parsed at its end (all calls, or, if it does not parse, the text as content); any other
answer streams as content at once. Knows no routes.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from server.reasoning import _partial_suffix

OPEN, CLOSE = "<tool_call>", "</tool_call>"
PARSERS = ("hermes", "llama3_json", "mistral", "openai")
PYTHON_TAG, MISTRAL_CALLS, MISTRAL_ARGS = "<|python_tag|>", "[TOOL_CALLS]", "[ARGS]"


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it

    def json(self, index: int | None = None) -> dict:
        out = {"id": self.id, "type": "function",
               "function": {"name": self.name, "arguments": self.arguments}}
        return out if index is None else {"index": index, **out}


def parse_block(body: str) -> ToolCall | None:
    """One block's body -> a call, or None when it is not `{"name": str, "arguments"?: ...}`."""
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    return call_of(obj)


def call_of(obj) -> ToolCall | None:
    """`{"name": str, "arguments" or "parameters": object or JSON text}` -> a call, else None."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    arguments = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return ToolCall("chatcmpl-tool-" + uuid.uuid4().hex, obj["name"], arguments)


class _CallSplit:
    """What the answer splitters keep: the calls found and the content sent, per choice."""
    finish = "tool_calls"  # the choice's finish reason when it made calls (None: the engine's)

    def __init__(self, parallel: bool) -> None:
        self.parallel = parallel  # false: only the first call is kept
        self.state = "text"
        self.held = ""
        self.calls: list[ToolCall] = []
        self.content: list[str] = []

    def whole(self) -> tuple[str | None, list[ToolCall]]:
        """After the final piece: (content or None, calls)."""
        return "".join(self.content) or None, list(self.calls)


class ToolCallSplit(_CallSplit):
    """One choice's answer -> (content piece, new calls) per `push`; `final` on the last piece.

    States: "text" (content, before any block), "block" (inside one, held), "between" (after a
    call: another block may follow), "dropped" (text after the calls), "failed" (the first
    block was not a call: everything is content, as written). Whitespace alone before the
    first block is not content (a thinking model's "</think>\n\n<tool_call>..."): it is held
    while nothing else has come, dropped when a call follows, sent when text does."""

    def __init__(self, parallel: bool = True) -> None:
        super().__init__(parallel)  # held: a possible start of `<tool_call>`, or a block's body
        self.said = False  # content other than whitespace was sent
        self.lead = ""  # the whitespace dropped before the first block (restored if it fails)

    def push(self, text: str, final: bool = False) -> tuple[str, list[ToolCall]]:
        text, self.held = self.held + text, ""
        out: list[str] = []
        new: list[ToolCall] = []
        while text:
            if self.state in ("text", "failed"):
                at = -1 if self.state == "failed" else text.find(OPEN)
                quiet = self.state == "text" and not self.said
                if at >= 0:
                    before = text[:at]
                    if quiet and not before.strip():  # nothing but whitespace before it
                        self.lead, before = before, ""
                    out.append(before)
                    self.said |= bool(before.strip())
                    self.state, text = "block", text[at + len(OPEN):]
                    continue
                keep = 0 if final or self.state == "failed" else _partial_suffix(text, OPEN)
                if quiet and not final and not text[:len(text) - keep].strip():
                    self.held, text = text, ""  # whitespace so far: a call may follow
                    continue
                out.append(text[:len(text) - keep])
                self.said |= bool(text[:len(text) - keep].strip())
                self.held, text = text[len(text) - keep:], ""
            elif self.state == "block":
                at = text.find(CLOSE)
                if at < 0 and not final:  # wait for the rest of the block
                    self.held, text = text, ""
                    continue
                body, rest = (text, "") if at < 0 else (text[:at], text[at + len(CLOSE):])
                call = parse_block(body.strip())
                if call is None and not self.calls:  # not a call: the answer is plain text
                    self.state, text = "failed", self.lead + OPEN + text
                    continue
                if call is not None and (self.parallel or not self.calls):
                    self.calls.append(call)
                    new.append(call)
                self.state, text = "between", rest
            elif self.state == "between":
                stripped = text.lstrip()
                if stripped.startswith(OPEN):
                    self.state, text = "block", stripped[len(OPEN):]
                elif stripped and not OPEN.startswith(stripped):
                    self.state, text = "dropped", ""
                else:  # whitespace, or what may still open a block
                    self.held, text = ("", "") if final else (text, "")
            else:  # "dropped"
                text = ""
        piece = "".join(out)
        self.content.append(piece)
        return piece, new


def llama3_calls(text: str) -> list[ToolCall] | None:
    """`[<|python_tag|>]{call}[; {call}]...` -> the calls, None if it is not exactly that."""
    text, decoder, calls, at = text.strip(), json.JSONDecoder(), [], 0
    if text.startswith(PYTHON_TAG):
        text = text[len(PYTHON_TAG):].lstrip()
    while at < len(text):
        try:
            obj, at = decoder.raw_decode(text, at)
        except ValueError:
            return None
        call = call_of(obj)
        if call is None:
            return None
        calls.append(call)
        rest = text[at:].lstrip()
        at = len(text) - len(rest)
        if rest.startswith(";"):
            at += 1 + len(rest[1:]) - len(rest[1:].lstrip())
        elif rest:
            return None
    return calls or None


def mistral_calls(text: str) -> list[ToolCall] | None:
    """`[TOOL_CALLS][{call}, ...]`, or (tokenizers v11+) `[TOOL_CALLS]name[ARGS]{arguments}`
    once per call -> the calls, None if it is not exactly that."""
    text = text.strip()
    if not text.startswith(MISTRAL_CALLS):
        return None
    body = text[len(MISTRAL_CALLS):].lstrip()
    if body[:1] in ("[", "{"):
        try:
            objs = json.loads(body)
        except ValueError:
            return None
        objs = objs if isinstance(objs, list) else [objs]
    else:
        objs = []
        for part in body.split(MISTRAL_CALLS):
            name, sep, args = part.partition(MISTRAL_ARGS)
            try:
                objs.append({"name": name.strip(), "arguments": json.loads(args)} if sep
                            and name.strip() else None)
            except ValueError:
                return None
    calls = [call_of(o) for o in objs]
    return None if not calls or None in calls else calls


JSON_PARSERS = {"llama3_json": ((PYTHON_TAG, "{"), llama3_calls),
                "mistral": ((MISTRAL_CALLS,), mistral_calls)}


class JsonToolCalls(_CallSplit):
    """`llama3_json` / `mistral` answers -> (content piece, new calls) per `push`, as
    `ToolCallSplit` (the module docstring): an answer that opens as a call is held to its end."""

    def __init__(self, parser: str, parallel: bool = True) -> None:
        super().__init__(parallel)
        self.starts, self.parse = JSON_PARSERS[parser]
        self.state = "start"  # "start": undecided; "text": content; "calls": held to the end

    def push(self, text: str, final: bool = False) -> tuple[str, list[ToolCall]]:
        text, self.held, new = self.held + text, "", []
        if self.state == "start":
            head = text.lstrip()
            if any(head.startswith(s) for s in self.starts):
                self.state = "calls"
            elif not final and (not head or any(s.startswith(head) for s in self.starts)):
                self.held, text = text, ""  # may still open a call
            else:
                self.state = "text"
        if self.state == "calls":
            self.held, text = text, ""
            if final:
                calls = self.parse(self.held)
                if calls is None:  # not a call after all: the answer as written
                    self.state, text = "text", self.held
                else:
                    new = calls if self.parallel else calls[:1]
                    self.calls += new
                self.held = ""
        self.content.append(text)
        return text, new


class ForcedCalls(_CallSplit):
    """A forced call's answer (`tool_choice` "required" or a named function, vLLM's rules):
    the grammar made it JSON, the named function's arguments or a list of `{"name",
    "parameters"}` calls (at most one without parallel calls: the grammar's too). Held whole
    and read at the end; an answer cut short (`length`) that does not parse stays content.
    The finish reason stays the engine's ("stop"), as OpenAI's and vLLM's forced calls."""
    finish = None

    def __init__(self, name: str | None) -> None:
        super().__init__(parallel=True)
        self.name = name  # the named function; None: "required"

    def push(self, text: str, final: bool = False) -> tuple[str, list[ToolCall]]:
        self.held += text
        if not final:
            return "", []
        text, self.held = self.held, ""
        calls = self.read(text)
        if calls is None:
            self.content.append(text)
            return text, []
        self.calls += calls
        return "", calls

    def read(self, text: str) -> list[ToolCall] | None:
        try:
            obj = json.loads(text)
        except ValueError:
            return None
        if self.name is not None:  # the arguments as written (call_of keeps text as is)
            return [call_of({"name": self.name, "arguments": text})]
        calls = [call_of(o) for o in obj] if isinstance(obj, list) else [None]
        return None if not calls or None in calls else calls


class HarmonyCalls(_CallSplit):
    """GPT-OSS's calls (`openai`, vLLM's name): harmony writes each as a commentary message to
    `functions.NAME` whose content is the arguments (`<|constrain|>json`), ended by `<|call|>`.
    The choice's HarmonySplit reads them out of the text (its headers are not content); this
    hands its finished calls on, as they complete; the answer pieces pass as they are."""

    def __init__(self, harmony, parallel: bool = True) -> None:
        super().__init__(parallel)
        self.harmony = harmony  # the choice's server.reasoning.HarmonySplit (calls=True)

    def push(self, text: str, final: bool = False) -> tuple[str, list[ToolCall]]:
        new = []
        for name, arguments in self.harmony.pending:
            if self.parallel or not self.calls:
                call = ToolCall("chatcmpl-tool-" + uuid.uuid4().hex, name, arguments)
                self.calls.append(call)
                new.append(call)
        self.harmony.pending.clear()
        self.content.append(text)
        return text, new


def splitter(parser: str, parallel: bool = True, harmony=None) -> _CallSplit:
    """The answer splitter of `--tool-call-parser parser` (`openai`: reading `harmony`, the
    choice's HarmonySplit)."""
    if parser not in PARSERS:
        raise ValueError(f"unknown tool-call parser {parser!r}; use one of {PARSERS}")
    if parser == "openai":
        return HarmonyCalls(harmony, parallel)
    return ToolCallSplit(parallel) if parser == "hermes" else JsonToolCalls(parser, parallel)
