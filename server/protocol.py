"""Wire schemas (pydantic): TGI generation and tokenize, TEI-style classification, and the
strict-fields rule every request schema follows (OpenAI/vLLM schemas: `server.openai_protocol`).

Field names and shapes follow text-generation-inference's `GenerateRequest`/`GenerateResponse`/
`StreamResponse` so `huggingface_hub.InferenceClient.text_generation` and the `text-generation`
client parse them unchanged. Extensions are additive: `parameters.routing` and
`parameters.return_routing` (which adds `details.routing`).

Unknown request fields are refused (a misspelt `max_new_token` must not silently fall back to a
default): every request schema derives from `RequestSchema`, whose validator names each unknown
field and the closest valid one. `LENIENT_FIELDS` (set per request from `--lenient-fields`)
turns that off for clients that send extras. This module knows nothing about the engine.
"""

from __future__ import annotations

import difflib
from contextvars import ContextVar
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field,
                      model_validator)
from pydantic_core import PydanticCustomError

from server.validation_messages import json_type

MAX_SEED = 2**63 - 1
FinishReason = Literal["length", "eos_token", "stop_sequence"]
RoutingMode = Literal["segment", "prompt"]


def _encodable(text: str) -> str:
    """JSON can carry a lone UTF-16 surrogate (`"\\ud800"`) that no tokenizer accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"text is not valid Unicode: lone surrogate at character {exc.start}"
                         ) from None
    return text


def _text_or_texts(value: Any) -> Any:
    """A string or a list of strings, checked before pydantic's union would report each of its
    members ("stop.str: Input should be a valid string; stop.list[str]: ...")."""
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list):
        raise ValueError("must be a string or a list of strings")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"must be a string or a list of strings (item {i} is "
                             f"{json_type(text)})")
        try:
            _encodable(text)
        except ValueError as exc:
            raise ValueError(f"item {i}: {exc}" if texts is value else str(exc)) from None
    return value


# Every text input field. Plain `str` already refuses a lone surrogate, but `Union[str, ...]`
# lets one through to the tokenizer (a 500), so the check is explicit; on the whole union, so
# the 422 names the field once rather than once per union member.
Text = Annotated[str, AfterValidator(_encodable)]
TextOrTexts = Annotated[str | list[str], BeforeValidator(_text_or_texts)]


def _not_boolean(value: Any) -> Any:
    """JSON `true` is not a count: pydantic's lax mode would read `"max_new_tokens": true` as 1
    and `"seed": false` as 0, running a request the client did not mean."""
    if isinstance(value, bool):
        raise PydanticCustomError("number_not_boolean", "must be a number, not {value}",
                                  {"value": "true" if value else "false"})
    return value


# The type of every numeric request field (a boolean is refused, as TGI and OpenAI do).
Int = Annotated[int, BeforeValidator(_not_boolean)]
Float = Annotated[float, BeforeValidator(_not_boolean)]


class _Schema(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


# True: unknown request fields are dropped instead of refused (`--lenient-fields`). A context
# variable, set per request by the app, so apps with different settings can share a process.
LENIENT_FIELDS: ContextVar[bool] = ContextVar("camex_lenient_fields", default=False)
# Values that mean "not used" for a recognised-but-unsupported field: clients that send every
# field with its default (`"tools": null`, `"logit_bias": {}`) are not refused for it.
NEUTRAL = (None, 0, 0.0, False, "", [], {})


class RequestSchema(_Schema):
    """Base of every request schema: unknown fields are a 422 naming them (see module doc).

    `unsupported` lists fields other servers know that this one does not implement: they are
    refused as "not supported" (unless neutral) rather than as unrecognised."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False,
                              json_schema_extra={"additionalProperties": False})
    unsupported: ClassVar[frozenset[str]] = frozenset()

    @model_validator(mode="after")
    def _no_unknown_fields(self):
        extra = {k: v for k, v in (self.model_extra or {}).items()
                 if not (k in self.unsupported and _neutral(v))}
        if not extra:
            return self
        refused = sorted(k for k in extra if k in self.unsupported)
        if refused:
            raise PydanticCustomError("unsupported_field", "not supported by this server: "
                                      "{fields}", {"fields": ", ".join(refused),
                                                   "names": refused})
        if LENIENT_FIELDS.get():
            for name in extra:
                self.model_extra.pop(name, None)
            return self
        known = sorted(type(self).model_fields)
        hints = {k: (difflib.get_close_matches(k, known, n=1, cutoff=0.6) or [None])[0]
                 for k in sorted(extra)}
        raise PydanticCustomError("unknown_field", "unrecognized request argument(s): {fields}",
                                  {"fields": ", ".join(hints), "hints": hints})


def _neutral(value: Any) -> bool:
    return any(value is n or (type(value) is type(n) and value == n) for n in NEUTRAL)


# --- TGI generation -------------------------------------------------------------------------

class GenerateParameters(RequestSchema):
    best_of: Int | None = Field(None, ge=1, description="only 1 is supported")
    decoder_input_details: bool = Field(False, description="add prompt tokens as details.prefill")
    details: bool = Field(False, description="return token details")
    do_sample: bool = Field(False, description="sample; false = greedy (temperature etc. ignored)")
    frequency_penalty: Float | None = Field(
        None, ge=-2.0, le=2.0,
        description="TGI's: a token's logit loses this x its count in the prompt and the "
                    "generated text, divided by their length")
    grammar: Any | None = Field(
        None, description='{"type": "json", "value": <JSON Schema>} or {"type": "regex", '
                          '"value": <pattern>}: the generated text matches it')
    max_new_tokens: Int | None = Field(None, ge=1, description="default 20, capped by limits")
    repetition_penalty: Float | None = Field(None, ge=0.01, le=100.0)
    return_full_text: bool | None = Field(None, description="prepend the prompt")
    seed: Int | None = Field(None, ge=0, le=MAX_SEED)
    stop: list[Text] = Field(default_factory=list, description="stop sequences")
    temperature: Float | None = Field(None, ge=0.001, le=100.0)
    top_k: Int | None = Field(None, ge=1)
    top_n_tokens: Int | None = Field(None, ge=0, le=5,
                                        description="best alternatives per generated token")
    # >= 1e-6: smaller values are below float32 resolution of the cumulative mass (meaningless)
    top_p: Float | None = Field(None, ge=1e-6, le=1.0)
    truncate: Int | None = Field(None, ge=1, description="keep only the last N prompt tokens")
    typical_p: Float | None = Field(None, gt=0.0, lt=1.0,
                                    description="typical decoding mass (switches sampling on)")
    watermark: bool = Field(False, description="not supported")
    adapter_id: Text | None = Field(None, description="not supported")
    routing: RoutingMode | None = Field(None, description="override the server routing mode")
    return_routing: bool = Field(False, description="add router scores as details.routing")
    ignore_eos: bool = Field(False, description="keep generating past EOS (benchmarks, as vLLM)")


class GenerateRequest(RequestSchema):
    inputs: Text = Field(..., min_length=1)
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)


class CompatGenerateRequest(GenerateRequest):
    stream: bool = False


class Token(_Schema):
    id: int
    text: str
    logprob: float | None
    special: bool


class PrefillToken(_Schema):
    id: int
    text: str
    logprob: float | None = Field(None, description="null for the first token")


class RoutingSegment(_Schema):
    start: int
    end: int
    scores: list[float]


class RoutingLayer(_Schema):
    layer: int
    segments: list[RoutingSegment]


class RoutingTrace(_Schema):
    mode: RoutingMode
    layers: list[RoutingLayer]


class Details(_Schema):
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None
    prefill: list[PrefillToken]
    tokens: list[Token]
    top_tokens: list[list[Token]] | None = None
    best_of_sequences: list[Any] | None = None
    routing: RoutingTrace | None = None


class GenerateResponse(_Schema):
    generated_text: str
    details: Details | None = None


class StreamDetails(_Schema):
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None
    input_length: int
    routing: RoutingTrace | None = None


class StreamResponse(_Schema):
    index: int
    token: Token
    top_tokens: list[Token] | None = None
    generated_text: str | None = None
    details: StreamDetails | None = None


class ErrorResponse(_Schema):
    error: str
    error_type: str


# --- classification (TEI /predict-like) -----------------------------------------------------

def _right_only(value: Any) -> Any:
    if isinstance(value, str) and value.lower() == "left":
        raise ValueError("only `Right` truncation is supported: a long text keeps its first "
                         "max_input_tokens tokens")
    return value


class ClassifyParameters(RequestSchema):
    """The Hugging Face Inference API's text-classification parameters (what
    `huggingface_hub.InferenceClient.text_classification` sends)."""
    top_k: Int | None = Field(None, ge=1, description="only the K highest-scoring labels")
    function_to_apply: Literal["softmax", "sigmoid", "none"] | None = Field(
        None, description="scores from logits: softmax, sigmoid or none (the logits); default: "
                          "what the checkpoint's problem type implies")


class ClassifyRequest(RequestSchema):
    inputs: TextOrTexts = Field(..., description="one text, or a list of texts (a batch)")
    parameters: ClassifyParameters = Field(default_factory=ClassifyParameters)
    raw_scores: bool = Field(False, description="return logits instead of probabilities")
    truncate: bool = Field(False, description="truncate long texts instead of a 422")
    truncation_direction: Annotated[Literal["Right", "right"], BeforeValidator(_right_only)] = \
        Field("Right", description="TEI's; only `Right` (a long text keeps its first tokens)")

    @model_validator(mode="after")
    def _one_score_function(self):
        apply = self.parameters.function_to_apply
        if self.raw_scores and apply not in (None, "none"):
            raise PydanticCustomError(
                "conflicting_fields", "`raw_scores` asks for logits but "
                "`parameters.function_to_apply` is {apply}: send one of them", {"apply": apply})
        return self


class LabelScore(_Schema):
    label: str
    score: float


class SimpleToken(_Schema):
    """TGI `/tokenize`: one token with its character span in the input."""
    id: int
    text: str
    start: int
    stop: int
