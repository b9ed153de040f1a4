"""Chat messages -> prompt text, with the checkpoint's chat template (or `--chat-template`).

The template is the tokenizer's own (`tokenizer_config.json` `chat_template`, as transformers
loads it) unless the server was started with a template file, as vLLM's `--chat-template`.
Rendering is transformers' `apply_chat_template(..., add_generation_prompt=True)`. A model
without a template is a clear 400 naming the fix, never a guess at a format. Knows no routes.
"""

from __future__ import annotations

from functools import lru_cache
from collections.abc import Sequence

from server import errors


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


def render(engine, template: str, messages: Sequence, add_generation_prompt: bool = True) -> str:
    """The prompt text for `messages` (ChatMessage models). A template that raises (e.g. a
    role order it refuses) is a 422 carrying its message."""
    from jinja2 import TemplateError

    plain = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
             for m in messages]
    try:
        return engine.tokenizer.apply_chat_template(
            plain, chat_template=template, add_generation_prompt=add_generation_prompt,
            tokenize=False)
    except TemplateError as exc:
        raise errors.validation(f"the chat template refused these messages: {exc}",
                                param="messages") from None
