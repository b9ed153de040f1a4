"""Reasoning output of thinking models, split from the answer (`--reasoning-parser`, as vLLM).

Qwen3 and DeepSeek-R1 write their reasoning between `<think>` and `</think>`, then the answer.
With a parser chosen, `/v1/chat/completions` returns the reasoning in the message's
`reasoning_content` (DeepSeek's API and vLLM up to 0.10) and `reasoning` (vLLM since), and only
the answer in `content`; streams send the same split delta by delta.

The rules (vLLM's parsers of the same names):

- a `<think>` the model writes itself is dropped (newer templates put it in the prompt);
- text before `</think>` is reasoning, text after it the answer;
- no `</think>` at all: everything is reasoning (it was cut short);
- everything is the answer, tags included, when the prompt's last think block is already
  closed (Qwen3's template writes an empty `<think></think>` when thinking is off) or, for
  `qwen3`, when the client turned thinking off (`chat_template_kwargs: {"enable_thinking":
  false}`), as vLLM streams such choices.

One `ThinkSplit` per choice reads the text piece by piece; the whole text is one piece, so a
streamed choice and a complete one split alike. A piece that ends with the start of a tag
holds those characters back until the next piece tells whether the tag follows (the tags are
single tokens in these models' vocabularies, but nothing here relies on it).

GPT-OSS (`openai_gptoss`, vLLM's name) writes OpenAI's harmony format instead: messages
`<|channel|>analysis<|message|>...<|end|>`, then `<|start|>assistant<|channel|>final<|message|>
...` up to `<|return|>` (or `<|call|>`). Its markup is special tokens, so its choices are
decoded with them kept (`KEEPS_SPECIAL_TOKENS`) and `HarmonySplit` removes them: the analysis
channel is reasoning, every other channel (final, commentary) answer, headers nothing; a text
with no harmony markup at all is answer. Knows no routes.
"""

from __future__ import annotations

from typing import Any

START, END = "<think>", "</think>"
PARSERS = ("qwen3", "deepseek_r1", "openai_gptoss")
# parsers whose markup is special tokens: their choices are decoded with those kept
KEEPS_SPECIAL_TOKENS = ("openai_gptoss",)
# harmony's markup; the text that opens the answer (a structured answer is held to its schema
# from there)
HARMONY_MARKS = ("<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>", "<|call|>",
                 "<|constrain|>")
HARMONY_ANSWER = "<|channel|>final<|message|>"
HARMONY_ENDS = ("<|end|>", "<|return|>", "<|call|>", "<|start|>")  # (a message's end)


def reasoning_splitter(parser: str, answer_only: bool, eos_texts: tuple[str, ...] = (),
                       calls: bool = False) -> ThinkSplit | HarmonySplit:
    """The reasoning splitter of one choice for `parser` (`eos_texts`: the text of each EOS
    token, which a choice decoded with its special tokens ends with; `calls`: harmony tool
    calls are collected, server.tool_calls.HarmonyCalls)."""
    if parser == "openai_gptoss":
        return HarmonySplit(eos_texts, calls)
    return ThinkSplit(answer_only)


def answer_opening(parser: str) -> str:
    """The text after which a choice's answer starts (where a structured answer's constraint
    begins): the `end` of the parser's splitter."""
    return (HarmonySplit if parser == "openai_gptoss" else ThinkSplit).end


def answer_only(parser: str, prompt: str, template_kwargs: dict[str, Any] | None) -> bool:
    """Whether a choice of `prompt` is all answer from its first token: the prompt closed its
    last think block, or (qwen3) the client turned thinking off."""
    if prompt.rfind(END) > prompt.rfind(START) >= 0:
        return True
    return parser == "qwen3" and (template_kwargs or {}).get("enable_thinking") is False


class ThinkSplit:
    """One choice's text -> (reasoning, answer) pieces; `push` each piece, `final` on the last."""

    end = END  # the text that closes the reasoning

    def __init__(self, answer_only: bool) -> None:
        # "start": a leading <think> may come; "think": before </think>; "answer": after it
        self.state = "answer" if answer_only else "start"
        self.held = ""  # text that may be the start of a tag
        self.reasoning: list[str] = []  # everything so far, for `whole`
        self.answer: list[str] = []

    def push(self, text: str, final: bool = False) -> tuple[str, str]:
        """The next piece -> (its reasoning part, its answer part), either may be ""."""
        text, self.held = self.held + text, ""
        reasoning = answer = ""
        if self.state == "start":
            head = text.lstrip()
            if START.startswith(head) and not final:  # not yet told (whitespace too): wait
                self.held = text
                return "", ""
            if head.startswith(START):
                text = head[len(START):]
            self.state = "think"
        if self.state == "think":
            at = text.find(END)
            if at >= 0:
                reasoning, text, self.state = text[:at], text[at + len(END):], "answer"
            else:
                keep = 0 if final else _partial_suffix(text, END)
                reasoning, self.held = text[:len(text) - keep], text[len(text) - keep:]
                text = ""
        if self.state == "answer":
            answer = text
        self.reasoning.append(reasoning)
        self.answer.append(answer)
        return reasoning, answer

    def whole(self) -> tuple[str | None, str | None]:
        """After the final piece: (reasoning, answer) of the whole text, None where empty."""
        return "".join(self.reasoning) or None, "".join(self.answer) or None


class HarmonySplit:
    """One GPT-OSS choice's text, its harmony markup included -> (reasoning, answer) pieces, as
    ThinkSplit's: `push` each piece, `final` on the last; `state` "start" (nothing read yet),
    "think" (in a header or the analysis channel) or "answer" (since an answer channel opened,
    or in text before any markup). With `calls`, a message to a recipient (`to=functions.NAME`
    in its header: a tool call) is neither: its content is the call's arguments, and the
    finished calls wait in `pending` as (name, arguments) for server.tool_calls.HarmonyCalls."""

    end = HARMONY_ANSWER

    def __init__(self, eos_texts: tuple[str, ...] = (), calls: bool = False) -> None:
        self.collect = calls
        self.call: str | None = None  # the recipient of the message being read
        self.arguments: list[str] = []
        self.pending: list[tuple[str, str]] = []
        # the EOS tokens' texts end a message and are dropped, as harmony's own ends are
        # (<|return|> is GPT-OSS's; its <|endoftext|> too)
        self.marks = tuple(dict.fromkeys((*HARMONY_MARKS, *(t for t in eos_texts if t))))
        self.ends = (*HARMONY_ENDS, *self.marks[len(HARMONY_MARKS):])
        self.state = "start"
        self.in_body = False  # inside a message's content (else its header)
        self.header = ""  # the current header's text, markup included
        self.harmony = False  # any markup seen (else the text is a plain answer)
        self.held = ""
        self.reasoning: list[str] = []
        self.answer: list[str] = []

    def push(self, text: str, final: bool = False) -> tuple[str, str]:
        text, self.held = self.held + text, ""
        reasoning, answer = [], []
        while text:
            at, mark = _first_mark(text, self.marks)
            if mark is None:  # no whole mark: keep what may start one
                keep = 0 if final else max(_partial_suffix(text, m) for m in self.marks)
                text, self.held = text[:len(text) - keep], text[len(text) - keep:]
                at = len(text)
            head, text = text[:at], text[at + len(mark or ""):]
            if not self.harmony:  # text before any markup: a plain answer
                answer.append(head)
                if head and self.state == "start":
                    self.state = "answer"
            elif self.in_body and self.call is not None:
                self.arguments.append(head)
            elif self.in_body:
                (answer if self.state == "answer" else reasoning).append(head)
            else:
                self.header += head
            if mark is None:
                break
            self.harmony = True
            if mark == "<|message|>" and not self.in_body:  # the header names the channel
                channel = self.header.rsplit("<|channel|>", 1)[-1].split()
                self.state = "think" if channel[:1] == ["analysis"] or not channel else "answer"
                self.call = _recipient(self.header) if self.collect else None
                self.in_body, self.header = True, ""
            elif mark in self.ends:
                self.in_body = False  # the next header follows (an end outside a body: none)
                self._close_call()
            elif not self.in_body:
                self.header += mark
                if self.state == "start":
                    self.state = "think"
        if final:
            self._close_call()  # (stopped inside a call: its arguments so far)
        r, a = "".join(reasoning), "".join(answer)
        self.reasoning.append(r)
        self.answer.append(a)
        return r, a

    def _close_call(self) -> None:
        if self.call is not None:
            self.pending.append((self.call, "".join(self.arguments).strip()))
            self.call, self.arguments = None, []

    def whole(self) -> tuple[str | None, str | None]:
        return "".join(self.reasoning) or None, "".join(self.answer) or None


def _recipient(header: str) -> str | None:
    """The function a harmony header addresses (`to=functions.get_weather` -> "get_weather";
    another recipient as written), None without one."""
    for word in header.replace("<|", " <|").split():
        if word.startswith("to="):
            name = word[len("to="):]
            return name.removeprefix("functions.") or None
    return None


def _first_mark(text: str, marks: tuple[str, ...]) -> tuple[int, str | None]:
    """(where the first of `marks` in `text` starts, which) or (len, None)."""
    found = [(text.find(m), m) for m in marks if m in text]
    return min(found) if found else (len(text), None)


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper start of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
