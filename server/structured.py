"""Structured output on the wire: the request fields that ask for it, as one engine `Constraint`.

- OpenAI (`/v1/chat/completions`, and `/v1/completions` as vLLM accepts it): `response_format`
  `{"type": "json_object"}` (any JSON object) or `{"type": "json_schema", "json_schema":
  {"name", "schema", "strict"}}`; `{"type": "text"}` is no constraint. TGI's chat clients send
  `{"type": "json" | "json_object", "value": <schema>}` or `{"type": "regex", "value": ...}`,
  accepted too.
- vLLM: `structured_outputs` `{"json" | "regex" | "choice" | "grammar" | "json_object": ...}`
  and its older top-level `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`.
  Grammars are Lark (llguidance's dialect), not GBNF.
- TGI `/generate`: `parameters.grammar` `{"type": "json" | "regex" | "json_schema", "value": ...}`
  (a schema object or its JSON text; json_schema: `{"name", "schema"}`).
- Forced tool calls (`tool_choice` "required" or a named function) are JSON Schemas too,
  vLLM's: the named function's parameters, or a list of `{"name", "parameters"}` calls.

A request names at most one; it is checked here against llguidance without the vocabulary, so
an unknown schema keyword, a bad regex or a Lark error is a 422 naming the field (the engine
compiles it again with the vocabulary). A schema is strict (keywords that cannot be enforced
are refused) where the client said `strict: true`, lenient otherwise, as OpenAI's non-strict
schemas are. Knows no routes.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import Field

from camex_runtime import Constraint
from camex_runtime.engine.structured import check
from camex_runtime.errors import InputValidationError
from server import errors
from server.protocol import RequestSchema, Text

class JsonSchemaFormat(RequestSchema):
    name: Text | None = Field(None, description="the schema's name (not used)")
    description: Text | None = None
    schema_: dict[str, Any] | bool | None = Field(
        None, alias="schema", description="the JSON Schema; absent: any JSON value")
    strict: bool | None = Field(None, description="true: keywords that cannot be enforced "
                                                  "are refused (422), not ignored")


class ResponseFormat(RequestSchema):
    type: Literal["text", "json_object", "json_schema", "json", "regex"] = Field(
        ..., description='OpenAI: text, json_object, json_schema; TGI: json (or json_object) '
                         'and regex with `value`')
    json_schema: JsonSchemaFormat | None = None
    value: Any | None = Field(None, description="TGI: the schema (json) or pattern (regex)")


class StructuredOutputs(RequestSchema):
    """vLLM's `structured_outputs`: exactly one of these."""
    json_: dict[str, Any] | bool | str | None = Field(None, alias="json",
                                                      description="a JSON Schema")
    regex: Text | None = None
    choice: list[Text] | None = None
    grammar: Text | None = Field(None, description="a Lark grammar (llguidance's dialect)")
    json_object: bool | None = None


def checked(constraint: Constraint, field: str) -> Constraint:
    """The constraint, validated; a 422 naming `field` with llguidance's reason if not."""
    try:
        check(constraint)
    except InputValidationError as e:
        raise errors.validation(f"`{field}`: {e}", param=field) from None
    return constraint


def json_constraint(schema: Any, field: str, strict: bool = False) -> Constraint:
    """A JSON Schema given as an object, `true`, or JSON text -> a json constraint."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise errors.validation(f"`{field}` is not valid JSON: {e}", param=field) from None
    if schema is None:
        schema = {}
    if not isinstance(schema, (dict, bool)):
        raise errors.validation(f"`{field}` must be a JSON Schema (an object), got "
                                f"{type(schema).__name__}", param=field)
    return checked(Constraint("json", json.dumps(schema), lenient=not strict), field)


def from_response_format(fmt: ResponseFormat | None) -> Constraint | None:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_schema":
        spec = fmt.json_schema
        if spec is None:
            raise errors.validation('`response_format` of type "json_schema" needs its '
                                    '`json_schema` ({"name", "schema"})',
                                    param="response_format")
        return json_constraint(spec.schema_, "response_format.json_schema.schema",
                               strict=bool(spec.strict))
    if fmt.type == "regex":
        if not isinstance(fmt.value, str) or not fmt.value:
            raise errors.validation('`response_format` of type "regex" needs the pattern as '
                                    '`value`', param="response_format")
        return checked(Constraint("regex", fmt.value), "response_format.value")
    if fmt.value is None:  # json_object: any JSON object
        return json_constraint({"type": "object"}, "response_format")
    return json_constraint(fmt.value, "response_format.value")


def from_structured_outputs(spec: StructuredOutputs, field: str) -> Constraint:
    given = [k for k in ("json_", "regex", "choice", "grammar", "json_object")
             if getattr(spec, k) not in (None, False)]
    if len(given) != 1:
        raise errors.validation(f"`{field}` needs exactly one of json, regex, choice, grammar, "
                                f"json_object (got {len(given)})", param=field)
    kind = given[0]
    if kind == "json_":
        return json_constraint(spec.json_, f"{field}.json")
    if kind == "json_object":
        return json_constraint({"type": "object"}, field)
    value = tuple(spec.choice) if kind == "choice" else getattr(spec, kind)
    return checked(Constraint("lark" if kind == "grammar" else kind, value), f"{field}.{kind}")


def openai_constraint(body) -> Constraint | None:
    """The one constraint an OpenAI-route request asks for (None: plain text)."""
    asked = [(name, getattr(body, name)) for name in
             ("response_format", "structured_outputs", "guided_json", "guided_regex",
              "guided_choice", "guided_grammar")
             if getattr(body, name, None) is not None]
    if isinstance(getattr(body, "response_format", None), ResponseFormat) and \
            body.response_format.type == "text":
        asked = [a for a in asked if a[0] != "response_format"]
    if len(asked) > 1:
        names = ", ".join(f"`{n}`" for n, _ in asked)
        raise errors.validation(f"{names}: a request asks for one output format",
                                param=asked[1][0])
    if not asked:
        return None
    name, value = asked[0]
    if name == "response_format":
        return from_response_format(value)
    if name == "structured_outputs":
        return from_structured_outputs(value, name)
    if name == "guided_json":
        return json_constraint(value, name)
    if name == "guided_choice":
        if not value:
            raise errors.validation("`guided_choice` needs at least one string", param=name)
        return checked(Constraint("choice", tuple(value)), name)
    return checked(Constraint("regex" if name == "guided_regex" else "lark", value), name)


def tgi_constraint(grammar: Any) -> Constraint | None:
    """TGI's `parameters.grammar` -> a constraint."""
    field = "parameters.grammar"
    if grammar is None:
        return None
    if not isinstance(grammar, dict) or set(grammar) - {"type", "value"} or \
            grammar.get("type") not in ("json", "json_object", "json_schema", "regex"):
        raise errors.validation(f'`{field}` must be {{"type": "json" | "regex" | "json_schema", '
                                f'"value": ...}}', param=field)
    kind, value = grammar["type"], grammar.get("value")
    if kind == "regex":
        if not isinstance(value, str) or not value:
            raise errors.validation(f"`{field}`: a regex grammar needs the pattern as `value`",
                                    param=field)
        return checked(Constraint("regex", value), field)
    if kind == "json_schema":
        if not isinstance(value, dict) or "schema" not in value:
            raise errors.validation(f'`{field}`: a json_schema grammar\'s value is '
                                    f'{{"name", "schema"}}', param=field)
        value = value["schema"]
    return json_constraint(value, field)


def tool_constraint(tools, choice, parallel: bool = True) -> tuple[Constraint, str | None]:
    """A forced tool call's constraint and the named function (None: "required", any number
    of calls, or one where `parallel` is false). Strict where the functions all say so."""
    functions = {t.function.name: t.function for t in tools or ()}
    if not functions:
        raise errors.validation("`tool_choice` forces a call, but the request has no `tools`",
                                param="tool_choice")
    if choice != "required":
        name = choice.function.name
        if name not in functions:
            raise errors.validation(f"`tool_choice` names `{name}`, which is not in `tools` "
                                    f"({', '.join(sorted(functions))})", param="tool_choice")
        function = functions[name]
        return json_constraint(parameters_of(function), "tool_choice",
                               strict=bool(function.strict)), name
    calls = [{"type": "object", "properties": {"name": {"type": "string", "enum": [f.name]},
                                               "parameters": parameters_of(f)},
              "required": ["name", "parameters"], "additionalProperties": False}
             for f in functions.values()]
    schema = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if not parallel:
        schema["maxItems"] = 1
    strict = all(f.strict for f in functions.values())
    return json_constraint(schema, "tools", strict=strict), None


def parameters_of(function) -> dict:
    return function.parameters or {"type": "object", "properties": {}}
