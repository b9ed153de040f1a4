"""Wire schemas (pydantic): TGI generation, TEI-style classification, OpenAI completions.

Field names and shapes follow text-generation-inference's `GenerateRequest`/`GenerateResponse`/
`StreamResponse` so `huggingface_hub.InferenceClient.text_generation` and the `text-generation`
client parse them unchanged. Extensions are additive: `parameters.routing` and
`parameters.return_routing` (which adds `details.routing`). Unknown fields are ignored, as TGI
does. This module knows nothing about the engine; `server.generation` converts.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

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


def _all_encodable(texts: str | list[str]) -> str | list[str]:
    for text in [texts] if isinstance(texts, str) else texts:
        _encodable(text)
    return texts


# Every text input field. Plain `str` already refuses a lone surrogate, but `Union[str, ...]`
# lets one through to the tokenizer (a 500), so the check is explicit; on the whole union, so
# the 422 names the field once rather than once per union member.
Text = Annotated[str, AfterValidator(_encodable)]
TextOrTexts = Annotated[Union[str, list[str]], AfterValidator(_all_encodable)]


class _Schema(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


# --- TGI generation -------------------------------------------------------------------------

class GenerateParameters(_Schema):
    best_of: Optional[int] = Field(None, ge=1, description="only 1 is supported")
    decoder_input_details: bool = Field(False, description="add prompt tokens as details.prefill")
    details: bool = Field(False, description="return token details")
    do_sample: bool = Field(False, description="sample; false = greedy (temperature etc. ignored)")
    frequency_penalty: Optional[float] = Field(None, description="not supported")
    grammar: Optional[Any] = Field(None, description="not supported")
    max_new_tokens: Optional[int] = Field(None, ge=1, description="default 20, capped by limits")
    repetition_penalty: Optional[float] = Field(None, ge=0.01, le=100.0)
    return_full_text: Optional[bool] = Field(None, description="prepend the prompt")
    seed: Optional[int] = Field(None, ge=0, le=MAX_SEED)
    stop: list[Text] = Field(default_factory=list, description="stop sequences")
    temperature: Optional[float] = Field(None, ge=0.001, le=100.0)
    top_k: Optional[int] = Field(None, ge=1)
    top_n_tokens: Optional[int] = Field(None, description="not supported")
    # >= 1e-6: smaller values are below float32 resolution of the cumulative mass (meaningless)
    top_p: Optional[float] = Field(None, ge=1e-6, le=1.0)
    truncate: Optional[int] = Field(None, ge=1, description="keep only the last N prompt tokens")
    typical_p: Optional[float] = Field(None, description="not supported")
    watermark: bool = Field(False, description="not supported")
    adapter_id: Optional[Text] = Field(None, description="not supported")
    routing: Optional[RoutingMode] = Field(None, description="override the server routing mode")
    return_routing: bool = Field(False, description="add router scores as details.routing")
    ignore_eos: bool = Field(False, description="keep generating past EOS (benchmarks, as vLLM)")


class GenerateRequest(_Schema):
    inputs: Text = Field(..., min_length=1)
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)


class CompatGenerateRequest(GenerateRequest):
    stream: bool = False


class Token(_Schema):
    id: int
    text: str
    logprob: Optional[float]
    special: bool


class PrefillToken(_Schema):
    id: int
    text: str
    logprob: Optional[float] = Field(None, description="null: prompt logprobs are not computed")


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
    seed: Optional[int]
    prefill: list[PrefillToken]
    tokens: list[Token]
    top_tokens: Optional[list[list[Token]]] = None
    best_of_sequences: Optional[list[Any]] = None
    routing: Optional[RoutingTrace] = None


class GenerateResponse(_Schema):
    generated_text: str
    details: Optional[Details] = None


class StreamDetails(_Schema):
    finish_reason: FinishReason
    generated_tokens: int
    seed: Optional[int]
    input_length: int
    routing: Optional[RoutingTrace] = None


class StreamResponse(_Schema):
    index: int
    token: Token
    top_tokens: Optional[list[Token]] = None
    generated_text: Optional[str] = None
    details: Optional[StreamDetails] = None


class ErrorResponse(_Schema):
    error: str
    error_type: str


# --- classification (TEI /predict-like) -----------------------------------------------------

class ClassifyRequest(_Schema):
    inputs: TextOrTexts = Field(..., description="one text, or a list of texts (a batch)")
    raw_scores: bool = Field(False, description="return logits instead of probabilities")
    truncate: bool = Field(False, description="truncate long texts instead of a 422")


class LabelScore(_Schema):
    label: str
    score: float


# --- OpenAI completions (non-chat) ----------------------------------------------------------

class CompletionRequest(_Schema):
    model: Optional[Text] = None
    prompt: TextOrTexts
    max_tokens: Optional[int] = Field(16, ge=1)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, ge=1e-6, le=1.0)
    n: int = Field(1, ge=1, le=1, description="only 1 is supported")
    stream: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=1, description="0/1: logprob of each token")
    echo: bool = False
    stop: Optional[TextOrTexts] = None
    seed: Optional[int] = Field(None, ge=0, le=MAX_SEED)
    presence_penalty: Optional[float] = Field(None, description="not supported")
    frequency_penalty: Optional[float] = Field(None, description="not supported")
    best_of: Optional[int] = Field(None, ge=1, le=1)
    suffix: Optional[Text] = Field(None, description="not supported")
    user: Optional[Text] = None
    ignore_eos: bool = Field(False, description="keep generating past EOS (as vLLM)")


class CompletionLogprobs(_Schema):
    tokens: list[str]
    token_logprobs: list[Optional[float]]
    top_logprobs: Optional[list[Any]] = None
    text_offset: list[int]


class CompletionChoice(_Schema):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[Literal["stop", "length"]] = None


class CompletionUsage(_Schema):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Completion(_Schema):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[CompletionUsage] = None
    system_fingerprint: Optional[str] = None


class ModelCard(_Schema):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(_Schema):
    object: Literal["list"] = "list"
    data: list[ModelCard]
