"""Strict request validation and error shapes, in-process and without a model (validation
happens before a route needs the engine, so these answers come from the HTTP layer alone).

Misspelt fields are a 422 naming them and the closest valid field, on every route, in TGI's
shape on TGI routes and OpenAI's on the OpenAI/vLLM ones; `--lenient-fields` drops unknown
fields instead. Broken JSON and a missing content-type get sentences, not pydantic's texts.
"""

import json

import pytest

from tests.server.test_http_layer import call, settings


def openai_error(r) -> dict:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize("path,body,field,hint", [
    ("/generate", {"inputs": "hi", "parameters": {"max_new_token": 3}},
     "parameters.max_new_token", "parameters.max_new_tokens"),
    ("/generate_stream", {"inputs": "hi", "parameters": {"temprature": 0.5}},
     "parameters.temprature", "parameters.temperature"),
    ("/", {"inputs": "hi", "streem": True}, "streem", "stream"),
    ("/classify", {"inputs": "hi", "raw_score": True}, "raw_score", "raw_scores"),
])
def test_tgi_routes_name_the_unknown_field_in_tgi_shape(path, body, field, hint):
    r = call(settings(), "POST", path, json=body)
    assert r.status_code == 422
    assert r.json() == {"error": f"Unrecognized request argument supplied: {field} "
                                 f"(did you mean `{hint}`?)", "error_type": "validation"}


@pytest.mark.parametrize("path,body,field,hint", [
    ("/v1/completions", {"prompt": "hi", "max_token": 3}, "max_token", "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "temprature": 0.2}, "temprature", "temperature"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "contents": "hi"}]},
     "messages.0.contents", "messages.0.content"),
    ("/v1/completions", {"prompt": "hi", "stream": True,
                         "stream_options": {"include_usag": True}},
     "stream_options.include_usag", "stream_options.include_usage"),
    ("/tokenize", {"prompt": "hi", "add_special_token": False}, "add_special_token",
     "add_special_tokens"),
    ("/detokenize", {"tokens": [1], "token": [2]}, "token", "tokens"),
])
def test_openai_routes_name_the_unknown_field_in_openai_shape(path, body, field, hint):
    r = call(settings(), "POST", path, json=body)
    assert r.status_code == 422
    err = openai_error(r)
    assert err["message"] == f"Unrecognized request argument supplied: {field} " \
                             f"(did you mean `{hint}`?)"
    assert err["param"] == field and err["type"] == "invalid_request_error"


def test_a_field_with_no_close_match_is_named_without_a_guess():
    r = call(settings(), "POST", "/v1/completions", json={"prompt": "hi", "zzz": 1})
    assert openai_error(r)["message"] == "Unrecognized request argument supplied: zzz"


def test_tgi_tokenize_body_gets_tgi_shaped_errors():
    r = call(settings(), "POST", "/tokenize", json={"inputs": "hi", "parameter": {}})
    assert r.status_code == 422 and r.json()["error_type"] == "validation"
    assert "parameter (did you mean `parameters`?)" in r.json()["error"]


@pytest.mark.parametrize("body,names", [
    ({"messages": [{"role": "user", "content": "hi"}], "functions": [{"name": "f"}],
      "audio": {"voice": "x"}}, "audio, functions"),
    ({"messages": [{"role": "user", "content": "hi"}], "prediction": {"type": "content"}},
     "prediction"),
])
def test_unsupported_openai_fields_are_refused_by_name(body, names):
    r = call(settings(), "POST", "/v1/chat/completions", json=body)
    assert r.status_code == 422
    assert openai_error(r)["message"] == f"not supported by this server: {names}"


def test_unsupported_fields_with_neutral_values_pass_validation():
    # clients that send every field with its default are not refused for it (503: no model)
    body = {"messages": [{"role": "user", "content": "hi"}], "tools": None, "logit_bias": {},
            "presence_penalty": 0, "frequency_penalty": 0.0}
    r = call(settings(), "POST", "/v1/chat/completions", json=body)
    assert r.status_code == 503 and openai_error(r)["code"] == "unavailable"


def test_lenient_fields_ignores_unknown_fields():
    r = call(settings(lenient_fields=True), "POST", "/generate",
             json={"inputs": "hi", "parameters": {"max_new_token": 3}, "extra": 1})
    assert r.status_code == 503  # validated; then refused only because no model is loaded
    r = call(settings(lenient_fields=True), "POST", "/v1/completions",
             json={"prompt": "hi", "max_token": 3})
    assert r.status_code == 503 and openai_error(r)["code"] == "unavailable"
    # lenient is not lax about values or about fields it knows it cannot honour
    r = call(settings(lenient_fields=True), "POST", "/v1/chat/completions",
             json={"messages": [{"role": "user", "content": "hi"}], "tools": [{}]})
    assert r.status_code == 422


@pytest.mark.parametrize("path", ["/generate", "/v1/completions"])
def test_invalid_json_says_line_and_column(path):
    raw = b'{"inputs": "hi",\n  "parameters": {"max_new_tokens": 3,}}' if path == "/generate" \
        else b'{"prompt": "hi",\n  "max_tokens": 3,}'
    r = call(settings(), "POST", path, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400  # unparsable: 400 as TGI, OpenAI and vLLM (schema errors: 422)
    message = r.json()["error"] if path == "/generate" else openai_error(r)["message"]
    with pytest.raises(json.JSONDecodeError) as err:  # where Python's own parser points
        json.loads(raw)
    assert err.value.lineno == 2
    assert message == f"invalid JSON at line 2, column {err.value.colno}: Expecting property " \
                      "name enclosed in double quotes"


@pytest.mark.parametrize("headers,got", [({}, "no Content-Type header"),
                                         ({"content-type": "text/plain"}, "`text/plain`")])
def test_missing_content_type_says_to_send_json(headers, got):
    r = call(settings(), "POST", "/generate", content=b'{"inputs": "hi"}', headers=headers)
    assert r.status_code == 422
    assert r.json()["error"] == "the body was not read as JSON: send it with `Content-Type: " \
                                f"application/json` (got {got})"


def test_empty_body_and_non_object_json():
    r = call(settings(), "POST", "/v1/completions", headers={"content-type": "application/json"})
    assert "the request body is empty" in openai_error(r)["message"]
    r = call(settings(), "POST", "/generate", json=["hi"])
    assert r.json()["error"] == "the request body must be a JSON object, got an array"


def test_openai_routes_answer_auth_and_not_found_in_openai_shape():
    r = call(settings(api_key="k"), "POST", "/v1/chat/completions", json={"messages": []})
    assert r.status_code == 401 and openai_error(r)["type"] == "authentication_error"
    r = call(settings(), "GET", "/v1/nope")
    assert r.status_code == 404 and openai_error(r)["code"] == "not_found"
    r = call(settings(max_body_bytes=10), "POST", "/v1/completions", json={"prompt": "x" * 50})
    assert r.status_code == 413 and "10 bytes" in openai_error(r)["message"]
    # TGI routes keep TGI's shape for the same refusals
    r = call(settings(api_key="k"), "POST", "/generate", json={"inputs": "hi"})
    assert r.json()["error_type"] == "unauthorized"


@pytest.mark.parametrize("body,needle", [
    ({"prompt": []}, "`prompt` must be a string, a list of strings, a list of token ids"),
    ({"prompt": [[1, 2], []]}, "none of them empty"),
    ({"prompt": [1, "a"]}, "`prompt` must be"),
    ({"prompt": "hi", "logprobs": 6}, "less than or equal to 5"),
])
def test_prompt_shapes_are_checked_with_one_clear_message(body, needle):
    r = call(settings(), "POST", "/v1/completions", json=body)
    assert r.status_code == 422 and needle in openai_error(r)["message"]


def chat(content=None, role="user") -> dict:
    return {"messages": [{"role": role, **({} if content is None else {"content": content})}]}


@pytest.mark.parametrize("body,message,param", [
    # an image (audio, file) part is named, not reported as two failed union branches
    (chat([{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "x"}}]),
     'messages.0.content: content part 1 has type `image_url`: this model reads text only '
     '(`content` must be a string, or a list of parts {"type": "text", "text": "..."})',
     "messages.0.content"),
    (chat(5), 'messages.0.content: `content` must be a string, or a list of parts '
              '{"type": "text", "text": "..."}', "messages.0.content"),
    (chat([{"type": "text"}]), "messages.0.content.0.text: Field required",
     "messages.0.content.0.text"),
    (chat([{"type": "text", "text": "hi", "cache_control": {}}]),
     "Unrecognized request argument supplied: messages.0.content.0.cache_control",
     "messages.0.content.0.cache_control"),
    (chat("\ud800"), "messages.0.content: text is not valid Unicode: lone surrogate at "
                     "character 0", "messages.0.content"),
    (chat([{"type": "text", "text": "\ud800"}]), "messages.0.content.0.text: text is not valid "
                                                 "Unicode: lone surrogate at character 0",
     "messages.0.content.0.text"),
    (chat("x", role="function"), "messages.0.role: `function` messages are not supported: "
                                 "send tool results as `tool` messages with their "
                                 "`tool_call_id` (roles: system, developer, user, assistant, "
                                 "tool)", "messages.0.role"),
    (chat("x", role="bot"), "messages.0.role: Input should be 'system', 'developer', 'user', "
                            "'assistant' or 'tool'", "messages.0.role"),
])
def test_chat_message_errors_name_the_part_or_role_in_one_sentence(body, message, param):
    raw = json.dumps(body).encode("utf-8", "surrogatepass")  # (a lone surrogate, as JSON allows)
    r = call(settings(), "POST", "/v1/chat/completions", content=raw,
             headers={"content-type": "application/json"})
    assert r.status_code == 422
    err = openai_error(r)
    assert (err["message"], err["param"]) == (message, param)


@pytest.mark.parametrize("content", ["hi", [{"type": "text", "text": "h"}, {"type": "text",
                                                                             "text": "i"}], None])
def test_chat_content_as_string_parts_or_null_passes_validation(content):
    r = call(settings(), "POST", "/v1/chat/completions", json=chat(content))
    assert r.status_code == 503 and openai_error(r)["code"] == "unavailable"  # (no model)


@pytest.mark.parametrize("path,body,message", [
    ("/v1/completions", {"prompt": "hi", "stop": 5},
     "stop: must be a string or a list of strings"),
    ("/v1/completions", {"prompt": "hi", "stop": ["a", 3]},
     "stop: must be a string or a list of strings (item 1 is a number)"),
    ("/v1/completions", {"prompt": "hi", "stop": ["a", "\udc00"]},
     "stop: item 1: text is not valid Unicode: lone surrogate at character 0"),
    ("/classify", {"inputs": {"text": "hi"}}, "inputs: must be a string or a list of strings"),
    ("/classify", {"inputs": ["a", None]},
     "inputs: must be a string or a list of strings (item 1 is null)"),
])
def test_string_or_strings_fields_get_one_message_not_one_per_union_member(path, body, message):
    raw = json.dumps(body).encode("utf-8", "surrogatepass")
    r = call(settings(), "POST", path, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422
    if path.startswith("/v1/"):
        assert (openai_error(r)["message"], openai_error(r)["param"]) == (message, "stop")
    else:
        assert r.json()["error"] == message


@pytest.mark.parametrize("path,raw,message", [
    ("/generate", b'{"inputs": "caf\xe9"}',
     "the body is not valid UTF-8 (byte 0xe9 at offset 15): send JSON encoded as UTF-8"),
    ("/v1/completions", b'{"prompt": "\xc3("}',
     "the body is not valid UTF-8 (byte 0xc3 at offset 12): send JSON encoded as UTF-8"),
    ("/generate", b"[" * 100_000 + b"]" * 100_000, "the JSON body nests too deeply to be parsed"),
])
def test_a_body_the_json_parser_cannot_read_says_why(path, raw, message):
    # (FastAPI's own answer to both: "There was an error parsing the body")
    r = call(settings(), "POST", path, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert (openai_error(r)["message"] if path.startswith("/v1/") else r.json()["error"]) \
        == message


def _numeric_request_fields():
    """(schema, field name, adapter) for every int/float field of every request schema."""
    import typing

    from pydantic import TypeAdapter

    import server.openai_protocol  # noqa: F401  (registers its RequestSchema subclasses)
    from server.protocol import RequestSchema

    def numeric(tp) -> bool:
        if tp in (int, float):
            return True
        return any(numeric(a) for a in typing.get_args(tp) if a is not type(None))

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    for schema in dict.fromkeys(subclasses(RequestSchema)):
        for name, info in schema.model_fields.items():
            if numeric(info.annotation):
                tp = typing.Annotated[(info.annotation, *info.metadata)] if info.metadata \
                    else info.annotation
                adapter = TypeAdapter(tp)
                yield pytest.param(adapter, id=f"{schema.__name__}.{name}")


@pytest.mark.parametrize("adapter", list(_numeric_request_fields()))
def test_no_numeric_request_field_reads_a_boolean_as_a_number(adapter):
    """pydantic's lax mode reads JSON `true` as 1 and `false` as 0; every count, seed and
    temperature of every request schema refuses them instead (found by walking the schemas, so
    a new field without `Int`/`Float` fails here)."""
    from pydantic import ValidationError

    for value in (True, False, [True], [False]):  # the list forms for lists of ids
        with pytest.raises(ValidationError):
            adapter.validate_python(value)


@pytest.mark.parametrize("path,body,message", [
    ("/generate", {"inputs": "hi", "parameters": {"max_new_tokens": True}},
     "parameters.max_new_tokens: must be a number, not true"),
    ("/v1/completions", {"prompt": "hi", "seed": False}, "seed: must be a number, not false"),
])
def test_a_boolean_where_a_number_belongs_is_a_422_naming_the_field(path, body, message):
    r = call(settings(), "POST", path, json=body)
    assert r.status_code == 422
    got = r.json()["error"]
    assert (got if isinstance(got, str) else got["message"]) == message
