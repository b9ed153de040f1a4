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
single tokens in these models' vocabularies, but nothing here relies on it). Knows no routes.
"""

from __future__ import annotations

from typing import Any

START, END = "<think>", "</think>"
PARSERS = ("qwen3", "deepseek_r1")


def answer_only(parser: str, prompt: str, template_kwargs: dict[str, Any] | None) -> bool:
    """Whether a choice of `prompt` is all answer from its first token: the prompt closed its
    last think block, or (qwen3) the client turned thinking off."""
    if prompt.rfind(END) > prompt.rfind(START) >= 0:
        return True
    return parser == "qwen3" and (template_kwargs or {}).get("enable_thinking") is False


class ThinkSplit:
    """One choice's text -> (reasoning, answer) pieces; `push` each piece, `final` on the last."""

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


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper start of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
