"""The demo LM's chat template, so `/v1/chat/completions` works on the demo out of the box.

The demo LM is trained on plain text, not on conversations: this template only gives chat
clients a readable, consistent prompt ("User: …\nAssistant:"), it does not make the model a
chat model. A system (or developer) message is written as a plain first paragraph.

`ensure_chat_template(dir)` adds it to a tokenizer directory that has no template of its own
(`tokenizer_config.json` `chat_template`, the key transformers loads), leaving one that has a
template alone; it is cheap and idempotent, so demo checkpoints built before it get it too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

DEMO_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] in ('system', 'developer') -%}"
    "{{ message['content'] + '\\n\\n' }}"
    "{%- else -%}"
    "{{ (message['role'] | capitalize) + ': ' + message['content'] + '\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Assistant:' }}{%- endif -%}"
)


def ensure_chat_template(tokenizer_dir: str | Path) -> Path:
    """Give `tokenizer_dir` the demo template unless it has one; returns the directory."""
    path = Path(tokenizer_dir)
    config_file = path / "tokenizer_config.json"
    if not config_file.is_file() or (path / "chat_template.jinja").is_file():
        return path
    config = json.loads(config_file.read_text())
    if config.get("chat_template"):
        return path
    config["chat_template"] = DEMO_CHAT_TEMPLATE
    tmp = config_file.with_name(config_file.name + ".tmp")
    tmp.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, config_file)  # atomic: a server reading the directory never sees half
    return path
