"""--reasoning-parser's split of `<think>...</think>` from the answer, piece by piece: a
streamed choice, cut anywhere, splits as the whole text does (vLLM's qwen3 and deepseek_r1
rules)."""
from __future__ import annotations

import pytest

from server.reasoning import (HarmonySplit, ThinkSplit, answer_only, answer_opening,
                              reasoning_splitter)
from tests.server.pieces import random_pieces


def whole(text: str, plain: bool = False):
    split = ThinkSplit(plain)
    split.push(text, final=True)
    return split.whole()


@pytest.mark.parametrize("text,want", [
    ("<think>\nplan\n</think>\n\nAnswer", ("\nplan\n", "\n\nAnswer")),
    ("plan</think>Answer", ("plan", "Answer")),  # <think> was in the prompt
    ("<think>cut short", ("cut short", None)),  # no </think>: all reasoning
    ("</think>Answer", (None, "Answer")),
    ("<think></think>", (None, None)),
    ("a </thin k> b</think>c </think> d", ("a </thin k> b", "c </think> d")),  # the first end
    ("Answer <think>", ("Answer <think>", None)),  # a late <think> is text
])
def test_whole_texts_split_as_vllm_splits_them(text, want):
    assert whole(text) == want


def test_an_answer_only_choice_keeps_every_character_as_answer():
    text = "<think>x</think>y"
    assert whole(text, plain=True) == (None, text)


@pytest.mark.parametrize("text", [
    "<think>\nStep one. Step <two>.\n</think>\n\nThe answer is 4 </th.",
    "reasoning with < and </ and </think and then</think>answer <think> again",
    "<thi", "</thin", "<think>only thinking <", "no tags at all",
    "\n <think>plan</think>answer",
])
def test_any_cut_into_pieces_splits_as_the_whole(text):
    want = whole(text)
    for pieces in random_pieces(text, seed=0, most_cuts=6):
        split, reasoning, answer = ThinkSplit(False), [], []
        for i, piece in enumerate(pieces):
            r, a = split.push(piece, final=i == len(pieces) - 1)
            reasoning.append(r)
            answer.append(a)
        assert ("".join(reasoning) or None, "".join(answer) or None) == want, pieces
        assert split.whole() == want  # (a tag cut in two would have leaked into the parts)


def test_the_finish_releases_what_was_held_back():
    split = ThinkSplit(False)
    assert split.push("plan </th") == ("plan ", "")  # "</th" may open </think>
    assert split.push("", final=True) == ("</th", "")


@pytest.mark.parametrize("parser,prompt,kwargs,want", [
    ("qwen3", "<|user|>hi<|assistant|>", None, False),
    ("qwen3", "<|assistant|><think>\n\n</think>\n\n", None, True),  # the template closed it
    ("qwen3", "<think>a</think> old turn <think>\n", None, False),  # reopened for this turn
    ("qwen3", "<|assistant|>", {"enable_thinking": False}, True),
    ("qwen3", "<|assistant|>", {"enable_thinking": True}, False),
    ("deepseek_r1", "<|assistant|>", {"enable_thinking": False}, False),  # no such switch
    ("deepseek_r1", "<|assistant|><think></think>", None, True),
])
def test_which_choices_are_all_answer(parser, prompt, kwargs, want):
    assert answer_only(parser, prompt, kwargs) is want


# GPT-OSS's harmony format (`openai_gptoss`): channels, their markup special tokens kept
HARMONY = ("<|channel|>analysis<|message|>The user asks 2+2. <|easy|> sum.<|end|>"
           "<|start|>assistant<|channel|>final<|message|>It is 4.<|return|>")


def harmony(text: str, pieces: list[str] | None = None):
    split = HarmonySplit()
    for i, piece in enumerate(pieces or [text]):
        split.push(piece, final=i == len(pieces or [text]) - 1)
    return split.whole(), split.state


@pytest.mark.parametrize("text,want", [
    (HARMONY, ("The user asks 2+2. <|easy|> sum.", "It is 4.")),  # unknown <|...|> is text
    ("<|channel|>final<|message|>Only an answer.<|return|>", (None, "Only an answer.")),
    ("<|channel|>analysis<|message|>cut short", ("cut short", None)),
    ("<|channel|>analysis<|message|>a<|end|><|start|>assistant<|channel|>analysis<|message|>b"
     "<|end|><|start|>assistant<|channel|>final<|message|>c", ("ab", "c")),
    # a preamble in the commentary channel is answer (vLLM's rule); its header is dropped
    ("<|channel|>commentary<|message|>Let me check.<|end|><|start|>assistant<|channel|>final"
     "<|message|>Done.", (None, "Let me check.Done.")),
    ("plain text, no harmony", (None, "plain text, no harmony")),
    ("<|channel|>final", (None, None)),  # a header alone
])
def test_harmony_channels_split_as_reasoning_and_answer(text, want):
    assert harmony(text)[0] == want


@pytest.mark.parametrize("text", [HARMONY, "<|channel|>analysis<|message|>x <| y <|en",
                                  "<|chan", "no markup < | at all"])
def test_a_harmony_text_cut_anywhere_splits_as_the_whole(text):
    want = harmony(text)
    for pieces in random_pieces(text, seed=1, most_cuts=8):
        assert harmony(text, pieces) == want, pieces


def test_harmony_state_follows_the_channels():
    """Responses count reasoning tokens up to the answer's opening (`end`): `state` says
    where a choice is."""
    split = reasoning_splitter("openai_gptoss", False)
    assert isinstance(split, HarmonySplit) and split.state == "start"
    assert split.end == "<|channel|>final<|message|>" == answer_opening("openai_gptoss")
    split.push("<|channel|>analysis<|message|>hm")
    assert split.state == "think"
    split.push("<|end|><|start|>assistant<|channel|>final<|message|>")
    assert split.state == "answer"
    assert isinstance(reasoning_splitter("qwen3", False), ThinkSplit)


def test_harmony_drops_the_eos_tokens_text():
    """Decoded with special tokens kept, a choice that ended on EOS ends with its text
    (GPT-OSS's <|return|> is markup anyway; another EOS is dropped the same way)."""
    split = HarmonySplit(("<|endoftext|>",))
    split.push("<|channel|>final<|message|>x<|endof")
    split.push("text|>", final=True)
    assert split.whole() == (None, "x")
    assert HarmonySplit().push("<|channel|>final<|message|>x<|endoftext|>", True) == \
        ("", "x<|endoftext|>")  # (unknown to a splitter not told: text)
