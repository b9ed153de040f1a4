"""/v1/completions against a real tiny engine, in-process: what a refused prompt in a batch of
prompts leaves behind in the engine (nothing)."""

from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import ServerSettings
from tests.server.test_health_inprocess import wait_ready


def test_refused_prompt_in_a_batch_cancels_the_prompts_already_submitted(tiny_lm_dir):
    app = create_app(ServerSettings(model=str(tiny_lm_dir), max_input_tokens=8))
    with TestClient(app) as client:
        wait_ready(client)
        engine = app.state.serving.lm
        handles, submit = [], engine.submit

        def spy(prompt, params):  # records the handles the route creates
            handles.append(submit(prompt, params))
            return handles[-1]
        engine.submit = spy
        r = client.post("/v1/completions", json={
            "prompt": ["the", "the", "the quick brown fox " * 10], "max_tokens": 100,
            "ignore_eos": True, "temperature": 0})
        err = r.json()["error"]
        assert r.status_code == 422 and err["code"] == "context_length_exceeded"
        assert err["param"] == "prompt" and "at most 8 may be input" in err["message"]
        assert len(handles) == 2
        assert [h.result(timeout=10).finish_reason for h in handles] == ["cancelled"] * 2
        stats = engine.stats()
        assert (stats.running, stats.waiting) == (0, 0)
