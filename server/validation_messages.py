"""FastAPI/pydantic validation errors as sentences a user understands.

Pydantic reports "Input should be a valid dictionary or object to extract fields from" when a
body was not sent as JSON, and "JSON decode error" at a character offset for broken JSON; this
module turns those into "send `Content-Type: application/json`" and "invalid JSON at line L,
column C", and the strict-fields errors of `server.protocol.RequestSchema` into OpenAI's
"Unrecognized request argument supplied: …" with the closest valid name. Knows no routes.
"""

from __future__ import annotations

from typing import Any

BODY_NOT_OBJECT = {"model_attributes_type", "dict_type", "model_type"}


def describe(errors: list[dict], body: Any = None,
             content_type: str | None = None) -> tuple[str, str | None]:
    """(one readable message, the first offending field as a dotted path or None)."""
    parts, params = [], []
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        text, param = _one(err, loc, body, content_type)
        parts.append(text)
        params.append(param)
    param = next((p for p in params if p), None)
    return "; ".join(dict.fromkeys(parts)) or "invalid request", param


def _one(err: dict, loc: list[str], body: Any, content_type: str | None):
    kind, ctx = err.get("type", ""), err.get("ctx") or {}
    where = ".".join(loc)
    if kind == "json_invalid":
        return _json_error(err, body), None
    if not loc and kind == "missing":
        return "the request body is empty: send a JSON object with " \
               "`Content-Type: application/json`", None
    if not loc and kind in BODY_NOT_OBJECT:
        if not _is_json(content_type):
            got = f"`{content_type}`" if content_type else "no Content-Type header"
            return "the body was not read as JSON: send it with `Content-Type: " \
                   f"application/json` (got {got})", None
        return f"the request body must be a JSON object, got {json_type(err.get('input'))}", None
    prefix = where + "." if where else ""
    if kind == "unknown_field":
        names = [f"{prefix}{k}" + (f" (did you mean `{prefix}{hint}`?)" if hint else "")
                 for k, hint in ctx.get("hints", {}).items()]
        first = next(iter(ctx.get("hints", {})), "")
        return "Unrecognized request argument supplied: " + ", ".join(names), prefix + first
    if kind == "unsupported_field":
        names = [prefix + n for n in ctx.get("names", [])]
        return f"not supported by this server: {', '.join(names)}", (names or [None])[0]
    message = str(err.get("msg", "invalid"))
    if kind == "value_error" and message.startswith("Value error, "):
        message = message[len("Value error, "):]
    return (f"{where}: {message}" if where else message), where or None


def _json_error(err: dict, body: Any) -> str:
    reason = (err.get("ctx") or {}).get("error", "invalid JSON")
    pos = next((p for p in err.get("loc", ()) if isinstance(p, int)), None)
    if not isinstance(body, (str, bytes)) or pos is None:
        return f"invalid JSON: {reason}"
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    line = text.count("\n", 0, pos) + 1
    column = pos - (text.rfind("\n", 0, pos) + 1) + 1
    return f"invalid JSON at line {line}, column {column}: {reason}"


def _is_json(content_type: str | None) -> bool:
    if not content_type:
        return False
    main = content_type.split(";")[0].strip().lower()
    return main == "application/json" or (main.startswith("application/")
                                          and main.endswith("+json"))


def json_type(value: Any) -> str:
    """What a parsed JSON value is, in JSON's words ("an array", "null")."""
    names = {list: "an array", dict: "an object", str: "a string", int: "a number",
             float: "a number", bool: "a boolean", type(None): "null", bytes: "raw bytes"}
    return names.get(type(value), type(value).__name__)
