"""Wire schemas of the OpenAI-compatible routes, in the shapes vLLM's server uses:
`/v1/completions`, `/v1/chat/completions`, `/v1/models`, and vLLM's `/tokenize`,
`/detokenize` (`/tokenizer_info` answers a free-form dict). Errors on these routes have
OpenAI's shape, `OpenAIErrorResponse`.

Request schemas derive from `server.protocol.RequestSchema` (unknown fields are a 422 naming
them); fields OpenAI or vLLM define that this server does not implement are listed in
`unsupported` and refused by name. Knows nothing about the engine: `server.openai_runs` converts.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from pydantic import BeforeValidator, Field, field_validator, model_validator

from server.protocol import (MAX_SEED, Float, Int, RequestSchema, Text, TextOrTexts, _encodable,
                             _Schema)
from server.structured import ResponseFormat, StructuredOutputs

MAX_COMPLETION_LOGPROBS = 5  # OpenAI's cap for /v1/completions `logprobs`
MAX_TOP_LOGPROBS = 20  # OpenAI's cap for chat `top_logprobs`


def _prompt(value: Any) -> Any:
    """One readable message for the four prompt shapes instead of pydantic's union report."""
    def ids(v: Any) -> bool:
        return isinstance(v, list) and len(v) > 0 and \
            all(isinstance(t, int) and not isinstance(t, bool) for t in v)
    if isinstance(value, str):
        return _encodable(value)
    if isinstance(value, list) and value:
        if all(isinstance(p, str) for p in value):
            return [_encodable(p) for p in value]
        if ids(value) or all(ids(p) for p in value):
            return value
    raise ValueError("`prompt` must be a string, a list of strings, a list of token ids or a "
                     "list of token-id lists, none of them empty")


Prompt = Annotated[str | list[str] | list[int] | list[list[int]], BeforeValidator(_prompt)]


class StreamOptions(RequestSchema):
    include_usage: bool = Field(False, description="a last chunk with `usage` and no choices")
    continuous_usage_stats: bool = Field(False, description="`usage` on every chunk (vLLM)")


class _Sampling(RequestSchema):
    """What completions and chat share (OpenAI names, vLLM's extensions marked)."""
    model: Text | None = Field(None, description="must name the served model when given")
    temperature: Float | None = Field(None, ge=0.0, le=2.0, description="0: greedy; default 1")
    top_p: Float | None = Field(None, ge=1e-6, le=1.0)
    n: Int = Field(1, ge=1, le=16, description="choices per prompt, each its own seed stream")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: TextOrTexts | None = Field(None, description="up to --max-stop-sequences strings")
    seed: Int | None = Field(None, ge=0, le=MAX_SEED)
    user: Text | None = Field(None, description="accepted, unused")
    presence_penalty: Float | None = Field(
        None, ge=-2.0, le=2.0, description="subtracted once from the logit of every token "
                                           "generated so far")
    frequency_penalty: Float | None = Field(
        None, ge=-2.0, le=2.0, description="subtracted from a generated token's logit once per "
                                           "time it was generated")
    logit_bias: dict[Int, Float] | None = Field(
        None, description='token id (a JSON key, e.g. "50256") -> added to its logit, in '
                          '[-100, 100]; also when greedy')
    # vLLM extensions
    top_k: Int | None = Field(None, ge=1, description="vLLM extension (-1 is not accepted)")
    min_p: Float | None = Field(None, ge=0.0, le=1.0,
                                description="drop tokens below min_p x the likeliest's "
                                            "probability (vLLM extension)")
    repetition_penalty: Float | None = Field(None, ge=0.01, le=100.0,
                                                description="vLLM extension")
    min_tokens: Int = Field(0, ge=0, description="no EOS, stop id or stop string ends a choice "
                                                 "before this many tokens (vLLM extension)")
    stop_token_ids: list[Annotated[Int, Field(ge=0)]] | None = Field(
        None, description="more token ids that end a choice (vLLM extension)")
    ignore_eos: bool = Field(False, description="keep generating past EOS (vLLM extension)")
    allowed_token_ids: list[Annotated[Int, Field(ge=0)]] | None = Field(
        None, min_length=1, description="the only token ids generated, EOS only if listed "
                                        "(vLLM extension)")
    skip_special_tokens: bool = Field(True, description="false: special tokens (EOS, chat "
                                                        "markers) stay in the text (vLLM "
                                                        "extension)")
    include_stop_str_in_output: bool = Field(False, description="keep the stop string that "
                                                                "ended a choice in its text "
                                                                "(vLLM extension)")
    bad_words: list[Text] | None = Field(None, description="words never generated, alone or "
                                                           "after a space (vLLM extension)")
    truncate_prompt_tokens: Int | None = Field(
        None, ge=-1, description="keep only the last N prompt tokens; -1: the last "
                                 "max_total_tokens (vLLM extension)")
    # structured output (server.structured): at most one of these
    response_format: ResponseFormat | None = Field(
        None, description='{"type": "json_object"} or {"type": "json_schema", "json_schema": '
                          '{"name", "schema", "strict"}}: the answer is JSON (of that schema)')
    structured_outputs: StructuredOutputs | None = Field(
        None, description="one of json (a schema), regex, choice, grammar (Lark), json_object "
                          "(vLLM extension)")
    guided_json: dict[Text, Any] | Text | None = Field(None, description="vLLM's older name "
                                                       "of structured_outputs.json")
    guided_regex: Text | None = Field(None, description="vLLM's older name of "
                                                         "structured_outputs.regex")
    guided_choice: list[Text] | None = Field(None, description="vLLM's older name of "
                                                               "structured_outputs.choice")
    guided_grammar: Text | None = Field(None, description="vLLM's older name of "
                                                           "structured_outputs.grammar")


class CompletionRequest(_Sampling):
    unsupported = frozenset({"suffix", "best_of", "use_beam_search", "prompt_logprobs"})
    prompt: Prompt
    max_tokens: Int | None = Field(16, ge=0, description="0 only with `echo` (score the prompt)")
    logprobs: Int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS,
                                    description="logprob of each token plus this many best "
                                                "alternatives; with `echo`, for the prompt too")
    echo: bool = Field(False, description="prepend the prompt (and its logprobs)")


class CompletionLogprobs(_Schema):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(_Schema):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None
    # vLLM: the stop string or stop_token_ids id that ended the choice (null: EOS, length)
    stop_reason: int | str | None = None


class PromptTokensDetails(_Schema):
    cached_tokens: int = Field(description="prompt tokens resumed from the prefix cache")


class Usage(_Schema):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    # where prefix caching is on (the server's default; vLLM: --enable-prompt-tokens-details)
    prompt_tokens_details: PromptTokensDetails | None = None


class Completion(_Schema):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


# --- chat -----------------------------------------------------------------------------------

class TextPart(RequestSchema):
    type: Literal["text"]
    text: Text


Role = Literal["system", "developer", "user", "assistant", "tool"]
ROLES = get_args(Role)


def _role(value: Any) -> Any:
    """Say why `function` messages (OpenAI's deprecated form) are refused."""
    if value == "function":
        raise ValueError(f"`function` messages are not supported: send tool results as `tool` "
                         f"messages with their `tool_call_id` (roles: {', '.join(ROLES)})")
    return value


def _content(value: Any) -> Any:
    """Message content as text parts: a string becomes one part, so pydantic validates one
    shape and reports its own errors, not a union's; an image, audio or file part is named."""
    if isinstance(value, str):
        return [{"type": "text", "text": _encodable(value)}]
    shape = 'a string, or a list of parts {"type": "text", "text": "..."}'
    if value is None:
        return value
    if not isinstance(value, list):
        raise ValueError(f"`content` must be {shape}")
    for i, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if isinstance(kind, str) and kind != "text":
            raise ValueError(f"content part {i} has type `{kind}`: this model reads text only "
                             f"(`content` must be {shape})")
    return value


class FunctionCall(RequestSchema):
    name: Text
    arguments: Text = Field(..., description="the arguments as JSON text")


class ToolCallIn(RequestSchema):
    """A call an earlier assistant turn made (sent back with the conversation)."""
    id: Text
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(RequestSchema):
    unsupported = frozenset({"function_call", "audio", "refusal"})
    role: Annotated[Role, BeforeValidator(_role)] = Field(
        ..., description="`tool` messages carry a tool's result (with `tool_call_id`)")
    content: Annotated[list[TextPart] | None, BeforeValidator(
        _content, json_schema_input_type=str | list[TextPart] | None)] = Field(
        None, description="a string, or text parts (no images or audio)")
    name: Text | None = None
    tool_calls: list[ToolCallIn] | None = Field(None, description="assistant: the calls it made")
    tool_call_id: Text | None = Field(None, description="tool: the call this result answers")

    @model_validator(mode="after")
    def _tool_fields_where_they_belong(self):
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a `tool` message needs the `tool_call_id` of the call it answers")
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f"`tool_calls` belong to assistant messages, not `{self.role}`")
        return self

    def text(self) -> str:
        return "".join(part.text for part in self.content or ())


# apply_chat_template's own parameters: a template variable of that name would set them
RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "sanitize_control_tokens", "padding", "truncation",
    "max_length", "return_tensors", "return_dict", "return_assistant_tokens_mask",
    "tokenizer_kwargs"})


class _ChatTemplateOptions(RequestSchema):
    """How chat messages become the prompt (vLLM's extensions, on chat and chat /tokenize)."""
    add_generation_prompt: bool = Field(
        True, description="end the prompt with the opening of the assistant's turn")
    continue_final_message: bool = Field(
        False, description="leave the last message (the assistant's) open for the model to "
                           "continue; needs add_generation_prompt false")
    chat_template_kwargs: dict[Text, Any] | None = Field(
        None, description="more variables for the chat template (e.g. enable_thinking)")

    @field_validator("chat_template_kwargs")
    @classmethod
    def _own_variables_only(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        taken = sorted(set(value or ()) & RESERVED_TEMPLATE_KWARGS)
        if taken:
            raise ValueError(f"{', '.join(taken)} cannot be set through chat_template_kwargs "
                             f"(request fields or the server's own rendering options)")
        return value

    @model_validator(mode="after")
    def _open_end_or_new_turn(self):
        if self.continue_final_message:
            if self.add_generation_prompt:
                raise ValueError("continue_final_message and add_generation_prompt cannot both "
                                 "be true (continuing the last message opens no new turn)")
            last = getattr(self, "messages", None)
            if last and last[-1].role != "assistant":
                raise ValueError(f"continue_final_message continues the last message, which "
                                 f"must be the assistant's (it is `{last[-1].role}`)")
        return self


class FunctionDef(RequestSchema):
    name: Annotated[str, Field(pattern=r"^[a-zA-Z0-9_.-]{1,64}$")]
    description: Text | None = None
    parameters: dict[Text, Any] | None = Field(None, description="a JSON Schema object")
    strict: bool | None = None


class ToolDef(RequestSchema):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(RequestSchema):
    name: Text


class NamedToolChoice(RequestSchema):
    type: Literal["function"]
    function: FunctionName


# OpenAI's reasoning efforts (chat `reasoning_effort`, Responses `reasoning.effort`)
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh"]
ServiceTier = Literal["auto", "default", "flex", "scale", "priority"]


class OpenAIHints(RequestSchema):
    """Fields OpenAI's clients send that ask nothing of a stateless, single-tier server with
    automatic prefix caching: accepted and not acted on (as vLLM does)."""
    store: bool | None = Field(None, description="accepted; nothing is stored")
    metadata: dict[Text, Text] | None = Field(None, description="accepted; nothing is stored")
    service_tier: ServiceTier | None = Field(None, description="accepted; one tier serves all")
    prompt_cache_key: Text | None = Field(
        None, description="accepted; prompts share cached prefixes without a key")
    safety_identifier: Text | None = Field(None, description="accepted, unused")


class ChatCompletionRequest(_Sampling, _ChatTemplateOptions, OpenAIHints):
    unsupported = frozenset({"functions", "function_call", "audio",
                             "modalities", "prediction", "web_search_options",
                             "best_of", "use_beam_search", "chat_template", "echo",
                             "prompt_logprobs"})
    reasoning_effort: ReasoningEffort | None = Field(
        None, description="given to the chat template as `reasoning_effort` (templates that "
                          "read it, e.g. GPT-OSS's, follow it; others ignore it)")
    messages: list[ChatMessage] = Field(..., min_length=1)
    tools: list[ToolDef] | None = Field(
        None, description="functions the model may call (shown to it by the chat template; "
                          "calls parsed with --tool-call-parser)")
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = Field(
        None, description='"auto" (default with tools: the model decides), "none", "required" '
                          '(at least one call) or {"type": "function", "function": {"name"}} '
                          '(that call): forced calls are constrained to the tools\' schemas')
    parallel_tool_calls: bool | None = Field(None, description="false: at most one call")
    max_tokens: Int | None = Field(None, ge=1, description="deprecated name of "
                                      "max_completion_tokens")
    max_completion_tokens: Int | None = Field(
        None, ge=1, description="default: what the context has left after the prompt")
    logprobs: bool = Field(False, description="logprob of each generated token")
    top_logprobs: Int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS,
                                        description="best alternatives per token (needs logprobs)")

    def template_kwargs(self) -> dict[str, Any] | None:
        """The chat template's extra variables: `chat_template_kwargs`, with `reasoning_effort`
        unless they name it themselves."""
        if self.reasoning_effort is None:
            return self.chat_template_kwargs
        return {"reasoning_effort": self.reasoning_effort, **(self.chat_template_kwargs or {})}


class TopLogprob(_Schema):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(_Schema):
    content: list[TokenLogprob] | None


class FunctionCallOut(_Schema):
    name: str
    arguments: str


class ToolCallOut(_Schema):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class AssistantMessage(_Schema):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] | None = None
    # with --reasoning-parser: the <think> part (DeepSeek's and vLLM <= 0.10's name, then vLLM's)
    reasoning_content: str | None = None
    reasoning: str | None = None


class ChatChoice(_Schema):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None
    stop_reason: int | str | None = None  # as CompletionChoice's


class ChatCompletion(_Schema):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


# --- models, tokenizer (vLLM) ---------------------------------------------------------------

class ModelCard(_Schema):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    max_model_len: int | None = None


class ModelList(_Schema):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeCompletionRequest(RequestSchema):
    model: Text | None = None
    prompt: Text
    add_special_tokens: bool = Field(True, description="add BOS etc. if the tokenizer does")
    return_token_strs: bool = False


class TokenizeChatRequest(_ChatTemplateOptions):
    unsupported = frozenset({"chat_template", "mm_processor_kwargs"})
    model: Text | None = None
    messages: list[ChatMessage] = Field(..., min_length=1)
    tools: list[ToolDef] | None = None
    add_special_tokens: bool = False
    return_token_strs: bool = False


class TokenizeResponse(_Schema):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(RequestSchema):
    model: Text | None = None
    tokens: list[Annotated[Int, Field(ge=0, le=2**63 - 1)]]


class DetokenizeResponse(_Schema):
    prompt: str


class OpenAIError(_Schema):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorResponse(_Schema):
    error: OpenAIError
