"""`camex-server --expert-deltas int8` over real HTTP: the setting reaches the engine process
(its /info says so, the classifier beside it keeps full deltas) and /generate answers with the
tokens an in-process engine with int8 deltas gives."""

import httpx
import pytest

from camex_runtime import Engine, SamplingParams
from tests.server.live_server import live_server

pytestmark = pytest.mark.e2e


def test_int8_deltas_reach_the_engine_and_serve(tiny_lm_dir, tiny_classifier_dir, tmp_path):
    engine = Engine.from_pretrained(tiny_lm_dir, max_batch_size=1, expert_deltas="int8")
    engine.start()
    try:
        prompt = "the quick brown fox"
        ids = engine.tokenizer(prompt)["input_ids"]
        want = engine.submit(ids, SamplingParams(max_new_tokens=8, ignore_eos=True)).result()
    finally:
        engine.stop()
    with live_server(tmp_path, "--model", str(tiny_lm_dir), "--classifier",
                     str(tiny_classifier_dir), "--expert-deltas", "int8") as srv:
        info = httpx.get(srv.base_url + "/info", timeout=10).json()
        assert info["expert_deltas"] == "int8"
        assert info["models"]["causal-lm"]["expert_deltas"] == "int8"
        assert info["models"]["classifier"]["expert_deltas"] == "full"
        lm, clf = info["models"]["causal-lm"], info["models"]["classifier"]
        assert 0 < lm["expert_bytes"] < clf["expert_bytes"]  # the same shapes, int8 vs full
        body = {"inputs": prompt, "parameters": {"max_new_tokens": 8, "details": True}}
        r = httpx.post(srv.base_url + "/generate", json=body, timeout=60)
        assert r.status_code == 200, r.text
        got = [t["id"] for t in r.json()["details"]["tokens"]]
        assert got == want.token_ids[:len(got)] and len(got) >= 1
