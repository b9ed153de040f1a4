"""End to end with the clients people evaluate and benchmark with, installed from the package
index (Makefile: `.venv-tools`, their own venv): lm-eval (`local-completions` loglikelihood and
generate_until, `local-chat-completions`), GuideLLM, and the `openai` SDK's chat API, against a
real `camex-server` on 127.0.0.1. The lm-eval tasks (YAML + jsonl data) ship under
`lm_eval_data/` and run from the repository root, as the README shows; nothing touches the
network (HF_*_OFFLINE).

Answers are compared with the model in this process: lm-eval's per-sample loglikelihoods with
the model's own full forward, its generations with the engine's greedy output.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from camex_runtime import Engine
from camex_runtime.checkpoint import load_folded
from camex_runtime.engine.runner import build_model
from tests.server.live_server import ROOT, live_server

pytestmark = pytest.mark.e2e
TOOLS = Path(os.environ.get("CAMEX_TOOLS_VENV", ROOT / ".venv-tools")) / "bin"
DATA = Path(__file__).parent / "lm_eval_data"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}" \
           "{% if add_generation_prompt %}assistant:{% endif %}"
STOP, MAX_GEN = ".", 6  # camex_tiny_generate.yaml's generation_kwargs


@pytest.fixture(scope="module")
def template_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tpl") / "chat.jinja"
    path.write_text(TEMPLATE)
    return path


@pytest.fixture(scope="module")
def server(tiny_lm_dir, template_file, tmp_path_factory):
    with live_server(tmp_path_factory.mktemp("srv"), "--model", str(tiny_lm_dir),
                     "--model-id", "tiny", "--chat-template", str(template_file),
                     "--max-batch-size", "4") as srv:
        yield srv


@pytest.fixture(scope="module")
def engine(tiny_lm_dir):
    e = Engine.from_pretrained(tiny_lm_dir, max_batch_size=2)
    e.start()
    yield e
    e.stop()


def tool(name: str, *args: str, cwd: Path = ROOT, timeout: float = 400) -> str:
    exe = TOOLS / name
    assert exe.exists(), f"{exe} is missing: `make tools` builds .venv-tools"
    proc = subprocess.run([str(exe), *args], cwd=cwd, env={**os.environ, **OFFLINE},
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def samples(out: Path, task: str) -> list[dict]:
    (path,) = out.rglob(f"samples_{task}_*.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


def lm_eval_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's TemplateLM._encode_pair: trailing spaces move to the continuation, which is
    the whole's tokens after the context's."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    return ctx, whole[len(ctx):]


def loglikelihood(model, ctx: list[int], cont: list[int]) -> float:
    ids = ctx + cont
    T = model.config.segment_len
    with torch.no_grad():  # the whole request is the prompt: route1_len = min(L, T)
        logits = model(torch.tensor([ids]), route1_len=min(len(ids), T)).logits[0]
    lp = torch.log_softmax(logits.float(), -1)
    return sum(lp[t - 1, ids[t]].item() for t in range(len(ctx), len(ids)))


def greedy(engine, ids: list[int]) -> str:
    res = engine.generate(ids, max_new_tokens=MAX_GEN, stop=[STOP])
    return res.text[:-len(STOP)] if res.finish_reason == "stop_sequence" else res.text


def test_lm_eval_local_completions(server, tiny_lm_dir, engine, tmp_path):
    out = tmp_path / "out"
    log = tool("lm_eval", "--model", "local-completions", "--model_args",
               f"base_url={server.base_url}/v1/completions,model=tiny,max_retries=1",
               "--include_path", str(DATA), "--tasks", "camex_tiny_choice,camex_tiny_generate",
               "--output_path", str(out), "--log_samples")
    assert "Using remote tokenizer" in log  # found /tokenizer_info + /tokenize
    model, tok = build_model(load_folded(tiny_lm_dir)), engine.tokenizer
    scored = samples(out, "camex_tiny_choice")
    assert len(scored) == 4
    for s in scored:
        for i, resp in enumerate(s["resps"]):
            args = s["arguments"][f"gen_args_{i}"]
            want = loglikelihood(model, *lm_eval_pair(tok, args["arg_0"], args["arg_1"]))
            assert float(resp[0][0]) == pytest.approx(want, abs=1e-3), (args, resp)
    generated = samples(out, "camex_tiny_generate")
    assert len(generated) == 3
    for s in generated:
        ids = tok(s["doc"]["prompt"], add_special_tokens=False)["input_ids"]
        assert s["resps"][0][0] == greedy(engine, ids)


def test_lm_eval_local_chat_completions(server, engine, tmp_path):
    out = tmp_path / "out"
    tool("lm_eval", "--model", "local-chat-completions", "--model_args",
         f"base_url={server.base_url}/v1/chat/completions,model=tiny,max_retries=1",
         "--apply_chat_template", "--include_path", str(DATA), "--tasks", "camex_tiny_generate",
         "--output_path", str(out), "--log_samples")
    generated = samples(out, "camex_tiny_generate")
    assert len(generated) == 3
    for s in generated:
        prompt = f"user: {s['doc']['prompt']}\nassistant:"  # TEMPLATE, one user turn
        ids = engine.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert s["resps"][0][0] == greedy(engine, ids)


def test_guidellm_run_has_no_failed_requests(server, tiny_lm_dir, tmp_path):
    report = tmp_path / "guidellm.json"
    tool("guidellm", "run", "--backend", f"kind=openai_http,target={server.base_url},model=tiny",
         "--profile", "kind=synchronous", "--constraint", "kind=max_requests,count=6",
         "--data", "kind=synthetic_text,prompt_tokens=16,output_tokens=8",
         "--tokenizer", f"kind=huggingface_auto,model={tiny_lm_dir}",
         "--output", f"kind=json,path={report}", "--disable-console-interactive", cwd=tmp_path)
    (bench,) = json.loads(report.read_text())["benchmarks"]
    totals = bench["metrics"]["request_totals"]
    assert totals == {"successful": 6, "errored": 0, "incomplete": 0, "total": 6}
    # streamed chat with ignore_eos: every request produced exactly the asked-for tokens
    assert bench["metrics"]["output_token_count"]["successful"]["total_sum"] == 6 * 8


def test_openai_sdk_chat_plain_and_streamed(server):
    from openai import OpenAI

    client = OpenAI(base_url=server.base_url + "/v1", api_key="unused")
    messages = [{"role": "user", "content": "the quick brown fox"}]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6,
                                         temperature=0, logprobs=True, top_logprobs=2)
    choice = out.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert out.usage.completion_tokens == len(choice.logprobs.content) <= 6
    assert all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens
    n2 = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, n=2,
                                        seed=5, temperature=1.0)
    assert [c.index for c in n2.choices] == [0, 1]


def test_huggingface_hub_chat_completion_by_url(server):
    """InferenceClient given the server's URL sends `model: "dummy"` (TGI ignores the field):
    it is taken for the served model, plain and streamed, as TGI's own `"tgi"` is."""
    from huggingface_hub import InferenceClient
    from openai import OpenAI

    client = InferenceClient(base_url=server.base_url)
    messages = [{"role": "user", "content": "the quick brown fox"}]
    out = client.chat_completion(messages=messages, max_tokens=6, temperature=0)
    assert out.model == "tiny" and out.choices[0].message.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat_completion(
        messages=messages, max_tokens=6, temperature=0, stream=True) if c.choices)
    assert streamed == out.choices[0].message.content
    sdk = OpenAI(base_url=server.base_url + "/v1", api_key="unused")
    tgi = sdk.chat.completions.create(model="tgi", messages=messages, max_tokens=6,
                                      temperature=0)
    assert tgi.choices[0].message.content == out.choices[0].message.content


def test_openai_sdk_shows_the_servers_error_message(server):
    import openai

    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused")
    with pytest.raises(openai.UnprocessableEntityError) as err:
        client.completions.create(model="tiny", prompt="hi", extra_body={"max_token": 3})
    assert "Unrecognized request argument supplied: max_token (did you mean `max_tokens`?)" \
        in str(err.value)
    assert err.value.body["param"] == "max_token"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user",
                                                                  "content": "hi"}])
    with pytest.raises(openai.UnprocessableEntityError, match="--tool-call-parser hermes"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                       tools=[{"type": "function", "function": {"name": "f"}}])
