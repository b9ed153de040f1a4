"""Structured output: a request's answer kept inside a grammar, one token mask per step.

A `Constraint` (engine/request.py) names what the answer must be: text matching a JSON Schema,
a regular expression, one of a list of strings, or a grammar in Lark syntax. llguidance (the
Rust library behind vLLM's, SGLang's and llama.cpp's structured output) compiles it against the
tokenizer's vocabulary and, after each token, says which tokens may come next. The engine
masks a constrained row's logits to those before anything else in sampling (logit bias,
penalties, temperature, top-k/p then act among the allowed tokens), advances the matcher with
the chosen token, and ends the request as at EOS once the grammar allows nothing but the end.
A row's mask depends only on its own tokens, so batched == alone holds for constrained rows.
A thinking model's constraint may wait for the end of its reasoning (`start_after`: the ids
of `</think>`): the text before is free, the grammar applies from the token after (vLLM's rule
for structured output with a reasoning parser).

JSON is written compactly, with Python's separators (", " and ": ") and no other whitespace:
with llguidance's default any whitespace may come between tokens, and a small or unsure model
then fills its budget with newlines (vLLM has the same switch, `disable-any-whitespace`).
A JSON Schema keyword llguidance cannot enforce is an error, unless the constraint is
`lenient` (OpenAI's non-strict schemas): then it is ignored.

`check` validates a constraint without a tokenizer (the server's 422s); `Grammars` holds the
vocabulary's compiled form (built once, ~0.3 s for 50k tokens) and makes one `Guide` per request.
Agent loops send the same tools, so the same schemas, every turn: the last CACHE_SIZE checked
grammars and compiled matchers are kept, and a request gets a copy of its grammar's matcher
(GPT-2's 50k vocabulary against a forced call over six tools: compiling 2.2 ms and checking
1.3 ms — the server checks, then the engine — against 1 µs for a copy; one tool's parameters
0.8 and 0.4 ms, Zen 4).
"""
from __future__ import annotations

import functools
import json
import threading
from collections import OrderedDict

import numpy as np
import torch

from camex_runtime.engine.request import Constraint
from camex_runtime.errors import InputValidationError

JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
CACHE_SIZE = 64  # grammars whose check and compiled matcher are kept


def _llguidance():
    try:
        import llguidance
        import llguidance.hf
    except ImportError as e:  # a dependency of the package; say what is missing, not a trace
        raise InputValidationError("structured output needs the `llguidance` package "
                                   "(pip install llguidance)") from e
    return llguidance


def grammar_text(constraint: Constraint) -> str:
    """The constraint as an llguidance grammar (not yet checked)."""
    llg = _llguidance()
    kind, value = constraint.kind, constraint.value
    if kind == "json":
        try:
            schema = json.loads(value)
        except ValueError as e:
            raise InputValidationError(f"the JSON Schema is not valid JSON: {e}") from None
        if not isinstance(schema, (dict, bool)):
            raise InputValidationError(f"a JSON Schema is an object (or true), got "
                                       f"{type(schema).__name__}")
        style = dict(JSON_STYLE, lenient=constraint.lenient)
        return llg.LLMatcher.grammar_from_json_schema(value, defaults=style)
    if kind == "regex":
        return llg.LLMatcher.grammar_from_regex(value)
    if kind == "choice":  # a Lark rule of string literals (JSON's escapes are Lark's)
        options = " | ".join(json.dumps(v, ensure_ascii=False) for v in value)
        return llg.LLMatcher.grammar_from_lark(f"start: {options}\n")
    return llg.LLMatcher.grammar_from_lark(value)


def check(constraint: Constraint) -> str:
    """Validate a constraint without a vocabulary: its grammar text, or InputValidationError
    with llguidance's reason (an unknown schema keyword, a bad regex, a Lark syntax error).
    Remembered for the last CACHE_SIZE constraints (a refusal is not: it is checked again)."""
    constraint.validate()
    value = constraint.value if isinstance(constraint.value, str) else tuple(constraint.value)
    return _checked(constraint.kind, value, constraint.lenient)


@functools.lru_cache(maxsize=CACHE_SIZE)
def _checked(kind: str, value: str | tuple[str, ...], lenient: bool) -> str:
    grammar = grammar_text(Constraint(kind, value, lenient))
    problem = _llguidance().LLMatcher.validate_grammar(grammar)
    if problem and not problem.startswith("WARNING"):
        raise InputValidationError(f"the {kind} constraint cannot be compiled: {problem}")
    return grammar


class Grammars:
    """A tokenizer's vocabulary compiled for llguidance (`prepare`, once) and the per-request
    matchers made from it (`guide`). Thread-safe: requests are submitted from any thread."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids) -> None:
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.eos = sorted(eos_token_ids)
        self._lltok = None
        self._lock = threading.Lock()
        # grammar text -> a matcher compiled from it that never takes a token (copied per
        # request), the last CACHE_SIZE used
        self._compiled: OrderedDict[str, object] = OrderedDict()

    def prepare(self):
        """The compiled vocabulary (built on the first call)."""
        with self._lock:
            if self._lltok is None:
                if self.tokenizer is None:
                    raise InputValidationError("structured output needs the checkpoint's "
                                               "tokenizer; this one has none")
                llg = _llguidance()
                try:
                    self._lltok = llg.hf.from_tokenizer(self.tokenizer, n_vocab=self.vocab_size,
                                                        eos_token=self.eos or None)
                except (ValueError, TypeError) as e:  # e.g. a slow (Python) tokenizer
                    raise InputValidationError(f"structured output cannot use this "
                                               f"checkpoint's tokenizer: {e}") from e
            return self._lltok

    def guide(self, constraint: Constraint) -> Guide:
        """A fresh matcher for one request; InputValidationError if the constraint is bad."""
        grammar = check(constraint)
        lltok = self.prepare()
        with self._lock:
            compiled = self._compiled.get(grammar)
            if compiled is not None:
                self._compiled.move_to_end(grammar)
        if compiled is None:
            compiled = _llguidance().LLMatcher(lltok, grammar, log_level=0)
            if compiled.is_error():
                raise InputValidationError(f"the {constraint.kind} constraint cannot be "
                                           f"compiled: {compiled.get_error()}")
            with self._lock:
                self._compiled[grammar] = compiled
                while len(self._compiled) > CACHE_SIZE:
                    self._compiled.popitem(last=False)
        return Guide(compiled.deep_copy(), self.vocab_size, constraint.start_after)


class Guide:
    """One request's position in its grammar: the tokens allowed next, then the token taken.
    With `start_after`, the grammar waits (`active` false, nothing masked) until the request
    has generated those ids in a row; it applies from the next token."""

    def __init__(self, matcher, vocab_size: int, start_after: tuple[int, ...] = ()) -> None:
        self.matcher, self.vocab_size = matcher, vocab_size
        self.waiting = tuple(start_after)  # () once the grammar applies
        self._tail: tuple[int, ...] = ()

    @property
    def active(self) -> bool:
        return not self.waiting

    def allowed(self) -> torch.Tensor:
        """(V,) bool on the host: True where the grammar allows the token next."""
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        return torch.from_numpy(np.unpackbits(bits, count=self.vocab_size,
                                              bitorder="little").view(np.bool_))

    def advance(self, token_id: int) -> bool:
        """Take the chosen token; True when the grammar is complete (only the end may follow).
        A token the grammar does not allow raises RuntimeError (the mask was not applied)."""
        if self.waiting:
            self._tail = (self._tail + (token_id,))[-len(self.waiting):]
            if self._tail == self.waiting:
                self.waiting = ()
            return False
        if not self.matcher.consume_token(token_id):
            raise RuntimeError(f"token {token_id} is outside the request's grammar: "
                               f"{self.matcher.get_error()}")
        return self.matcher.is_stopped()
