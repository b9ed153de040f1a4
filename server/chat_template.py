"""Chat messages -> prompt text, with the checkpoint's chat template (or `--chat-template`).

The template is the tokenizer's own (`tokenizer_config.json` `chat_template`, as transformers
loads it) unless the server was started with a template file, as vLLM's `--chat-template`.
Rendering is transformers' `apply_chat_template`, with the request's rendering options
(`add_generation_prompt`, default true; `continue_final_message`; `chat_template_kwargs`, more
template variables such as Qwen3's `enable_thinking`, as vLLM). A model without a template is a
clear 400 naming the fix, never a guess at a format. Knows no routes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from server import errors

log = logging.getLogger("camex.server")


@lru_cache(maxsize=4)
def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def template_for(engine, settings) -> str | None:
    """The template in force: the `--chat-template` file, else the tokenizer's, else None."""
    if settings.chat_template:
        return _read(settings.chat_template)
    return getattr(engine.tokenizer, "chat_template", None) or None


def require_template(engine, settings) -> str:
    template = template_for(engine, settings)
    if template is None:
        raise errors.ApiError(400, "validation", f"the model `{engine.name}` has no chat template "
                              "(its tokenizer_config.json has no `chat_template`): start the "
                              "server with `--chat-template PATH` (a Jinja file), or send plain "
                              "prompts to /v1/completions", code="chat_template_missing")
    return template


def render(engine, template: str, messages: Sequence, add_generation_prompt: bool = True,
           continue_final_message: bool = False,
           template_kwargs: dict[str, Any] | None = None,
           tools: Sequence | None = None) -> str:
    """The prompt text for `messages` (ChatMessage models). A template that refuses them
    itself (`raise_exception`, e.g. a role order) is a 422 carrying its message; a template
    that is broken (a syntax error, an undefined name) is the server's fault: a 500, and the
    reason goes to the log — unless it renders without the client's `template_kwargs`,
    `continue_final_message` and `tools`: then those broke it, a 422 naming them."""
    plain = [_message(m) for m in messages]
    tool_defs = [t.model_dump(exclude_none=True) for t in tools] if tools else None
    extras = {**({"continue_final_message": True} if continue_final_message else {}),
              **(template_kwargs or {})}
    try:
        return _apply(engine, template, plain, add_generation_prompt, tool_defs, **extras)
    except BrokenTemplate as exc:
        given = [name for name, value in (("chat_template_kwargs", template_kwargs),
                                          ("tools", tool_defs),
                                          ("continue_final_message", continue_final_message))
                 if value]
        if given and _renders(engine, template, plain, add_generation_prompt, None):
            raise errors.validation(f"the chat template cannot render with this "
                                    f"{' / '.join(given)}: {exc}", param=given[0]) from None
        log.error("the chat template cannot be rendered: %s", exc)
        raise errors.ApiError(500, "internal", "the server's chat template failed to render "
                              "(a server configuration error; see its log)") from None
    except TemplateRefusal as exc:
        raise errors.validation(f"the chat template refused these messages: {exc}",
                                param="messages") from None


class TemplateRefusal(Exception):
    """The template raised on purpose (transformers' `raise_exception`)."""


class BrokenTemplate(Exception):
    """The template itself fails: syntax, undefined names, type errors."""


def _message(m) -> dict:
    """A ChatMessage as templates read it: role, content, name; an assistant's `tool_calls`
    with their arguments as objects (templates `tojson` them; vLLM passes them so), a tool
    result's `tool_call_id`."""
    out = {"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
    if m.tool_calls:
        out["tool_calls"] = [{"id": c.id, "type": c.type, "function": {
            "name": c.function.name, "arguments": _arguments(c.function.arguments)}}
            for c in m.tool_calls]
    if m.tool_call_id:
        out["tool_call_id"] = m.tool_call_id
    return out


def _arguments(text: str) -> Any:
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, dict) else text


def _renders(engine, template: str, messages: list[dict], add_generation_prompt: bool,
             tools: list | None) -> bool:
    try:
        _apply(engine, template, messages, add_generation_prompt, tools)
    except (BrokenTemplate, TemplateRefusal):
        return False
    return True


def _apply(engine, template: str, messages: list[dict], add_generation_prompt: bool,
           tools: list | None = None, continue_final_message: bool = False,
           **template_kwargs: Any) -> str:
    from jinja2 import TemplateError

    try:
        return engine.tokenizer.apply_chat_template(
            messages, tools=tools, chat_template=template,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message, tokenize=False, **template_kwargs)
    except TemplateError as exc:
        # raise_exception raises TemplateError itself; Jinja's own failures are subclasses
        # (TemplateSyntaxError, UndefinedError, ...)
        if type(exc) is TemplateError:
            raise TemplateRefusal(str(exc)) from None
        raise BrokenTemplate(f"{type(exc).__name__}: {exc}") from None
    except (TypeError, ValueError, AttributeError, KeyError, IndexError) as exc:
        raise BrokenTemplate(f"{type(exc).__name__}: {exc}") from None


def check_template(engine, settings) -> None:
    """At start-up: the template in force renders a one-message conversation, which every
    chat template must. A `--chat-template` file that cannot is refused (ValueError: the
    server does not start); a checkpoint's own template that cannot is logged, and chat
    requests answer 500 until it is replaced."""
    template = template_for(engine, settings)
    if template is None:
        return
    try:
        _apply(engine, template, [{"role": "user", "content": "hello"}], True)
    except TemplateRefusal:
        return  # it judged the messages: it renders
    except BrokenTemplate as exc:
        if settings.chat_template:
            raise ValueError(f"--chat-template {settings.chat_template} cannot render a "
                             f"one-message conversation: {exc}") from None
        log.error("the checkpoint's chat template cannot render a one-message conversation "
                  "(%s): /v1/chat/completions will answer 500; start the server with "
                  "--chat-template PATH", exc)
