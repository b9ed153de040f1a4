"""`camex-server` with prefix caching (the default) over real HTTP with the `openai` client:
a conversation's next turn resumes from what its last turn left in the KV cache, the response
says how many prompt tokens that was (`usage.prompt_tokens_details.cached_tokens`, OpenAI's
field), /metrics counts them, and the answers are those of a server started with
`--no-prefix-caching`."""

import httpx
import pytest

from tests.server.live_server import live_server

pytestmark = pytest.mark.e2e

TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}" \
           "{% if add_generation_prompt %}assistant:{% endif %}"


def completions_turns(base_url: str, tokenizer, first: list[int], turns: int) -> list:
    """Token-id prompts, each the last one, its completion's text tokenized and two more
    ids."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url + "/v1", api_key="unused")
    prompt, outs = list(first), []
    for t in range(turns):
        out = client.completions.create(model="tiny", prompt=prompt, max_tokens=6,
                                        temperature=0, extra_body={"ignore_eos": True})
        outs.append(out)
        text = out.choices[0].text
        prompt = prompt + tokenizer(text, add_special_tokens=False)["input_ids"] + [11 + t]
    return outs


def test_a_conversation_resumes_from_its_last_turn(tiny_lm_dir, tmp_path):
    from openai import OpenAI

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_lm_dir))
    first = list(range(20, 33))  # 13 tokens: segment routing needs a whole first segment (4)
    answers = {}
    for cache in (False, True):
        flags = ("--prefix-caching", "--prefix-cache-slots", "2") if cache \
            else ("--no-prefix-caching",)
        (tmp_path / str(cache)).mkdir()
        with live_server(tmp_path / str(cache), "--model", str(tiny_lm_dir), "--model-id",
                         "tiny", "--chat-template", str(write(tmp_path, TEMPLATE)),
                         *flags) as srv:
            info = httpx.get(srv.base_url + "/info", timeout=10).json()
            assert info["models"]["causal-lm"]["prefix_caching"] is info["prefix_caching"] \
                is cache
            lm = info["models"]["causal-lm"]
            assert info["prefix_cache_slots"] == lm["prefix_cache_slots"] == (2 if cache else 0)
            slots = info["max_batch_size"] + info["prefix_cache_slots"]
            assert lm["kv_cache_bytes"] > 0 and lm["kv_cache_bytes"] % slots == 0
            outs = completions_turns(srv.base_url, tokenizer, first, 3)
            answers[cache] = [o.choices[0].text for o in outs]
            details = [o.usage.prompt_tokens_details for o in outs]
            if not cache:
                assert details == [None] * 3  # the field only where the server caches
                continue
            cached = [d.cached_tokens for d in details]
            assert cached[0] == 0 and all(0 < c < o.usage.prompt_tokens
                                          for c, o in zip(cached[1:], outs[1:]))
            client = OpenAI(base_url=srv.base_url + "/v1", api_key="unused")
            messages = [{"role": "system", "content": "you are a tiny model " * 4},
                        {"role": "user", "content": "the quick brown fox"}]
            one = client.chat.completions.create(model="tiny", messages=messages,
                                                 max_tokens=4, temperature=0)
            messages += [{"role": "assistant", "content": one.choices[0].message.content},
                         {"role": "user", "content": "jumps over"}]
            two = client.chat.completions.create(model="tiny", messages=messages,
                                                 max_tokens=4, temperature=0, stream=True,
                                                 stream_options={"include_usage": True})
            usage = list(two)[-1].usage
            assert usage.prompt_tokens_details.cached_tokens >= 4
            metrics = httpx.get(srv.base_url + "/metrics", timeout=10).text
            counted = [line for line in metrics.splitlines()
                       if line.startswith("camex_prompt_tokens_cached_total ")]
            assert counted and float(counted[0].split()[1]) == \
                sum(cached) + usage.prompt_tokens_details.cached_tokens
    assert answers[True] == answers[False]


def write(tmp_path, text: str):
    path = tmp_path / "chat.jinja"
    path.write_text(text)
    return path
