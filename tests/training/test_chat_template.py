"""The demo LM's chat template: added to a tokenizer directory without one, never over one."""

import json
import shutil

from transformers import AutoTokenizer

from camex_runtime.training.chat_template import DEMO_CHAT_TEMPLATE, ensure_chat_template


def test_template_is_added_once_and_renders_a_conversation(tiny_lm_dir, tmp_path):
    d = shutil.copytree(tiny_lm_dir, tmp_path / "lm")
    assert AutoTokenizer.from_pretrained(d).chat_template is None
    assert ensure_chat_template(d) == d
    before = (d / "tokenizer_config.json").read_text()
    ensure_chat_template(d)  # idempotent
    assert (d / "tokenizer_config.json").read_text() == before
    tok = AutoTokenizer.from_pretrained(d)
    text = tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "hi"},
                                    {"role": "assistant", "content": "hello"},
                                    {"role": "user", "content": "a fortune?"}],
                                   add_generation_prompt=True, tokenize=False)
    assert text == "Be brief.\n\nUser: hi\nAssistant: hello\nUser: a fortune?\nAssistant:"


def test_an_existing_template_is_left_alone(tiny_lm_dir, tmp_path):
    d = shutil.copytree(tiny_lm_dir, tmp_path / "lm")
    config = json.loads((d / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ messages[0]['content'] }}"
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    ensure_chat_template(d)
    kept = json.loads((d / "tokenizer_config.json").read_text())["chat_template"]
    assert kept == "{{ messages[0]['content'] }}" != DEMO_CHAT_TEMPLATE
