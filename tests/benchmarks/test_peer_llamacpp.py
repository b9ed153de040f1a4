"""benchmarks/peer_llamacpp.py without llama.cpp: what the comparison rests on, checked quickly.

- the models: one seeded GPT-2 directory llama.cpp's converter can read (``n_ctx``, a GPT-2
  split byte-level BPE), whose camex dense form computes the same logits and whose CAMEx form
  does not (merging does work); the same for the Llama family (``rope_theta`` where the
  converter reads it, grouped-query attention, untied head); prompts of exactly the asked
  token count;
- the converter's requirements never pull a CUDA torch or another package index;
- the camex side end to end: ``--quick --no-llama`` starts real camex-servers on 127.0.0.1 and
  the in-process engine (a worker process), every request completes at full length, the token
  ids read over HTTP are the engine's, and the overhead ratio is the recorded HTTP rate over
  the recorded engine rate;
- the interleaving: one slice of ``concurrency`` requests (B=1: one request) per server or
  engine in turn, order rotated, and the slices joined into one level as if run back to back;
- the report: per-round ratios against llama-server and the issue's table format;
- both readers (``loadtest.wire`` and httpx) turn the same scripted TGI stream into the same
  records.

Building llama.cpp (minutes) never runs here. Asserts nothing about speed.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import llamacpp_build  # noqa: E402
import peer_client  # noqa: E402
from llamacpp_convert import is_gpt2_split  # noqa: E402
import peer_llamacpp  # noqa: E402
from peer_models import LLAMA_SHAPES, SHAPES, build_gpt2, build_models  # noqa: E402
from peer_report import markdown, summarize, targets  # noqa: E402

from tests.wire_script import Script, tgi_stream  # noqa: E402


def bench_env(home: Path) -> dict:
    """A bare environment with its own HOME (nothing from the user's caches), but the native
    kernels' build directory this session uses: a fresh HOME moves torch's extension root, and
    each run would compile them again (tens of seconds), which is not what is tested here."""
    from camex_runtime.kernels import build
    return {"PATH": "/usr/bin:/bin", "TOKENIZERS_PARALLELISM": "false", "HOME": str(home),
            "CAMEX_KERNELS_DIR": str(build.build_dir())}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    return build_models(tmp_path_factory.mktemp("peer") / "work", quick=True, num_prompts=24)


def test_gpt2_directory_is_what_the_converter_reads(models):
    gpt2 = Path(models["gpt2"])
    config = json.loads((gpt2 / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["n_ctx"] == config["n_positions"]
    assert config["vocab_size"] == SHAPES["quick"]["vocab_size"]
    spec = json.loads((gpt2 / "tokenizer.json").read_text())
    assert spec["model"]["type"] == "BPE" and is_gpt2_split(spec["pre_tokenizer"])
    assert max(spec["model"]["vocab"].values()) < config["vocab_size"]  # the converter asserts it
    tok_class = json.loads((gpt2 / "tokenizer_config.json").read_text())["tokenizer_class"]
    assert tok_class == "PreTrainedTokenizerFast"  # a class transformers 4 (the converter's) has


def test_same_seed_same_weights(models, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(Path(models["work"]) / "tokenizer")
    build_gpt2(tmp_path / "again", tok, SHAPES["quick"], models["seed"])
    a = load_file(Path(models["gpt2"]) / "model.safetensors")
    b = load_file(tmp_path / "again" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_camex_forms_of_the_same_weights(models):
    import camex_runtime  # noqa: F401  (registers model_type camex)
    from transformers import AutoModelForCausalLM, GPT2LMHeadModel
    ids = torch.tensor([[5, 17, 300, 42, 7, 99, 1000, 3]])
    with torch.no_grad():
        ref = GPT2LMHeadModel.from_pretrained(models["gpt2"]).eval()(ids).logits
        dense = AutoModelForCausalLM.from_pretrained(models["camex_dense"]).eval()(ids).logits
        moe = AutoModelForCausalLM.from_pretrained(models["camex_7x1"]).eval()
        moe_logits = moe(ids).logits
    assert torch.allclose(dense, ref, atol=1e-4, rtol=1e-4)
    assert moe.config.num_experts == 7
    assert (moe_logits - ref).abs().max() > 1e-2  # experts were spread apart: merges matter


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def llama_models(request, tmp_path_factory) -> dict:
    return build_models(tmp_path_factory.mktemp(f"peer-{request.param}") / "work", quick=True,
                        num_prompts=4, family=request.param)


def test_llama_directory_is_what_the_converter_reads(llama_models):
    family = llama_models["family"]
    llama = Path(llama_models["dense"])
    assert llama_models[family] == str(llama) and llama.name == family
    config = json.loads((llama / "config.json").read_text())
    arch = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}[family]
    assert config["model_type"] == family and config["architectures"] == [arch]
    # written out: Qwen3's default head_dim (128) is not the shape's width per head
    assert config["head_dim"] == config["hidden_size"] // config["num_attention_heads"]
    # the converter's transformers 4 reads the top-level key; transformers 5 the nested one
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 10000.0
    assert config["tie_word_embeddings"] is False
    assert config["num_key_value_heads"] < config["num_attention_heads"]  # grouped-query
    assert config["vocab_size"] == LLAMA_SHAPES["quick"]["vocab_size"]
    spec = json.loads((llama / "tokenizer.json").read_text())
    assert spec["model"]["type"] == "BPE" and is_gpt2_split(spec["pre_tokenizer"])
    assert max(spec["model"]["vocab"].values()) < config["vocab_size"]
    tok_class = json.loads((llama / "tokenizer_config.json").read_text())["tokenizer_class"]
    assert tok_class == "PreTrainedTokenizerFast"


def test_camex_forms_of_the_same_llama_weights(llama_models):
    import camex_runtime  # noqa: F401  (registers model_type camex)
    from transformers import AutoModelForCausalLM
    ids = torch.tensor([[5, 17, 300, 42, 7, 99, 1000, 3]])
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(llama_models["dense"]).eval()(ids).logits
        dense = AutoModelForCausalLM.from_pretrained(llama_models["camex_dense"]).eval()
        moe = AutoModelForCausalLM.from_pretrained(llama_models["camex_7x1"]).eval()
        dense_logits, moe_logits = dense(ids).logits, moe(ids).logits
    assert dense.config.family == "llama" and moe.config.num_experts == 7
    assert dense.config.qk_norm == (llama_models["family"] == "qwen3")
    assert torch.allclose(dense_logits, ref, atol=1e-4, rtol=1e-4)
    assert (moe_logits - ref).abs().max() > 1e-2


def test_unknown_family_is_refused_before_anything_is_built(tmp_path):
    with pytest.raises(ValueError, match="unknown family 'gptj'"):
        build_models(tmp_path / "work", quick=True, family="gptj")
    assert not (tmp_path / "work").exists()


def test_each_family_has_its_own_default_work_dir_and_results_file():
    gpt2 = peer_llamacpp.parse_args(["--quick"])
    llama = peer_llamacpp.parse_args(["--family", "llama"])
    assert (gpt2.work.name, gpt2.out.name) == ("quick-seed0", "peer-llamacpp-quick.json")
    assert (llama.work.name, llama.out.name) == ("full-llama-seed0", "peer-llamacpp-llama.json")


def test_prompts_have_the_asked_token_count(models):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(Path(models["work"]) / "tokenizer")
    prompts = [json.loads(line)["prompt"]
               for line in Path(models["prompts"]).read_text().splitlines()]
    assert len(prompts) == 24 == len(set(prompts))
    assert {len(tok.encode(p, add_special_tokens=False)) for p in prompts} == {32}


def test_a_longer_prompt_list_starts_with_the_shorter_one(models, tmp_path):
    from peer_models import fortune_texts, write_prompts
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(Path(models["work"]) / "tokenizer")
    texts, path = fortune_texts(), tmp_path / "prompts.jsonl"
    short = write_prompts(path, tok, texts, 3, 32, seed=5)
    assert len(short) == 3 and write_prompts(path, tok, texts, 2, 32, seed=5) == short  # kept
    longer = write_prompts(path, tok, texts, 5, 32, seed=5)  # a plan that needs more
    assert len(longer) == 5 and longer[:3] == short
    assert len(path.read_text().splitlines()) == 5


def test_each_prompt_length_gets_its_own_prompts_even_from_one_file(models, tmp_path):
    """A run with longer prompts in the same work dir used to read the 32-token file and
    measure 32-token prompts under the longer length's name; and a length beyond two
    fortunes found no prompt at all."""
    from peer_models import fortune_texts, prompts_path, write_prompts
    from transformers import AutoTokenizer
    work = Path(models["work"])
    tok = AutoTokenizer.from_pretrained(work / "tokenizer")
    assert prompts_path(work, 32) == Path(models["prompts"])  # the fixture asked for 32
    texts, path = fortune_texts(), tmp_path / "prompts.jsonl"
    short = write_prompts(path, tok, texts, 3, 32, seed=5)
    long = write_prompts(path, tok, texts, 3, 400, seed=5)  # the same file, a longer length
    assert long != short and {p["prompt_tokens"] for p in long} == {400}
    assert {len(tok.encode(p["prompt"], add_special_tokens=False)) for p in long} == {400}
    assert json.loads(path.read_text().splitlines()[0])["prompt_tokens"] == 400


def test_prompt_and_new_tokens_must_fit_the_models_positions(capsys):
    with pytest.raises(SystemExit):
        peer_llamacpp.parse_args(["--prompt-tokens", "1000", "--new-tokens", "64"])
    assert "must fit the model's 1024 positions" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        peer_llamacpp.parse_args(["--quick", "--prompt-tokens", "250"])  # + 16 > 256
    args = peer_llamacpp.parse_args(["--prompt-tokens", "512", "--new-tokens", "64"])
    assert (args.prompt_tokens, args.new_tokens) == (512, 64)


def test_converter_requirements_stay_on_our_torch(tmp_path):
    req = tmp_path / "requirements"
    req.mkdir()
    (req / "requirements-convert_hf_to_gguf.txt").write_text(
        "-r ./requirements-convert_legacy_llama.txt\n"
        "--extra-index-url https://download.pytorch.org/whl/cpu\n"
        "## comment\ntorch==2.11.0\n")
    (req / "requirements-convert_legacy_llama.txt").write_text(
        "numpy~=2.2.6\ntransformers==4.57.6  # pinned\ngguf>=0.1.0\n")
    got = llamacpp_build.converter_requirements(tmp_path)
    assert got[0] == f"torch=={torch.__version__.split('+')[0]}"
    assert got[1:] == ["numpy~=2.2.6", "transformers==4.57.6", str(tmp_path / "gguf-py")]


def test_gpt2_split_is_recognised_and_nothing_else():
    assert is_gpt2_split({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True})
    assert is_gpt2_split({"type": "Sequence", "pretokenizers": [
        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}]})
    assert not is_gpt2_split({"type": "ByteLevel", "add_prefix_space": True, "use_regex": True})
    assert not is_gpt2_split({"type": "ByteLevel", "add_prefix_space": False, "use_regex": False})
    assert not is_gpt2_split({"type": "Metaspace", "replacement": "▁"})
    assert not is_gpt2_split(None)


@pytest.mark.e2e
@pytest.mark.timeout(480)
def test_quick_camex_side_end_to_end(models, tmp_path):
    out = tmp_path / "peer.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "peer_llamacpp.py"), "--quick", "--no-llama",
         "--threads", "1", "--dtypes", "fp32", "--runs", "1", "--concurrency", "4",
         "--b1-requests", "2", "--concurrent-requests", "4", "--new-tokens", "6",
         "--work", models["work"], "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=450,
        env=bench_env(tmp_path))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    doc = json.loads(out.read_text())
    assert doc["llama_cpp"] is None and doc["commit"]
    assert {"model_name", "flags", "loadavg_start", "contended"} <= doc["machine"].keys()
    # the CPU's family and model numbers (Zen 3, 4 and 5 all name themselves "AMD EPYC")
    cpuinfo = Path("/proc/cpuinfo").read_text()
    family = next(int(line.split(":")[1]) for line in cpuinfo.splitlines()
                  if line.startswith("cpu family"))
    assert doc["machine"]["cpu_family"] == family and doc["machine"]["vendor"]
    kinds = sorted((r["kind"], r["system"]) for r in doc["runs"])
    assert kinds == [("engine", "camex-7x1"), ("engine", "camex-dense"),
                     ("http", "camex-7x1"), ("http", "camex-dense")]
    for run in doc["runs"]:
        assert [lv["concurrency"] for lv in run["levels"]] == [1, 4]
        assert [lv["slices"] for lv in run["levels"]] == [2, 1]  # B=1: request by request
        assert [len(lv["slice_durations_s"]) for lv in run["levels"]] == [2, 1]
        for lv, n in zip(run["levels"], (2, 4)):
            rep = lv["report"]
            assert rep["completed"] == rep["sent"] == n, rep["failures_by_status"]
            assert rep["total_output_tokens"] == n * 6 and lv["finish_reasons"] == ["length"]
            assert rep["output_token_throughput"] > 0 and len(lv["cpu"]["loadavg_before"]) == 3
            if run["kind"] == "engine":
                assert lv["prompt_tokens"] == [32]  # the engine tokenizes the text as planned
        if run["kind"] == "http":
            cpus = sorted(os.sched_getaffinity(0))
            assert all(lv["client_cpus"] == (cpus[:1] if len(cpus) > 1 else None)
                       for lv in run["levels"])
            assert ("--threads" in run["cmd"]
                    and run["cmd"][run["cmd"].index("--dtype") + 1] == "float32")
            for lv in run["levels"]:  # the event loop and the client worked for every token
                per_token = lv["cpu_per_token_ms"]
                assert set(per_token) == {"server_main_thread", "client"}
                assert per_token["server_main_thread"] > 0 and per_token["client"] > 0
    assert doc["settings"]["client"] == "wire"  # the lean reader (loadtest/wire.py)
    for system in ("camex-dense", "camex-7x1"):  # greedy, same weights: what the client read
        over_http, in_engine = (next(r for r in doc["runs"] if r["kind"] == kind
                                     and r["system"] == system) for kind in ("http", "engine"))
        assert ([lv["token_ids"] for lv in over_http["levels"]]
                == [lv["token_ids"] for lv in in_engine["levels"]])
    for run in doc["runs"]:  # each engine's start-up cost profile, which steers its scheduling
        profile = run["cost_profile"]
        if run["system"] == "camex-dense":
            assert profile is None
        else:
            assert profile["merge_ms"] > 0 and len(profile["merged_ms"]) == len(profile["points"])
    logs = out.with_name(out.stem + "-logs")
    worker_log = (logs / "engine-camex-7x1-fp32-t1-r0.log").read_text()
    assert "warm-up: merge pool and cost model ready" in worker_log  # the engine's own lines
    dense = next(r for r in doc["rows"] if r["system"] == "camex-dense")
    http = next(r for r in doc["runs"] if r["kind"] == "http" and r["system"] == "camex-dense")
    eng = next(r for r in doc["runs"] if r["kind"] == "engine" and r["system"] == "camex-dense")
    assert dense["b1_overhead"] == [pytest.approx(
        http["levels"][0]["report"]["output_token_throughput"]
        / eng["levels"][0]["report"]["output_token_throughput"])]
    assert "| server | dtype | threads | B=1 tok/s | 4 concurrent, total tok/s |" in proc.stdout
    assert "3. HTTP / engine, camex-dense B=1" in proc.stdout


def fake_run(kind: str, system: str, rnd: int, b1: float, conc: float,
             ids: tuple[list[int], ...] = ([1, 2], [3, 4])) -> dict:
    def level(c, tok_s):
        stats = {"median": 0.05, "p99": 0.1}
        return {"concurrency": c, "cpu": {"other_cores": 0.1 * rnd}, "token_ids": list(ids),
                "report": {"output_token_throughput": tok_s, "ttft": stats, "itl": stats}}
    return {"kind": kind, "system": system, "dtype_pair": "fp32", "threads": 1, "round": rnd,
            "levels": [level(1, b1), level(8, conc)]}


def test_client_is_confined_only_where_the_servers_leave_a_cpu():
    import peer_llamacpp

    cpus = sorted(os.sched_getaffinity(0))
    assert peer_llamacpp.client_cpus("auto", len(cpus)) is None  # every CPU computes
    assert peer_llamacpp.client_cpus("auto", len(cpus) - 1) == cpus[:1]
    assert peer_llamacpp.client_cpus("none", 1) is None
    assert peer_llamacpp.client_cpus(str(cpus[-1]), 1) == [cpus[-1]]
    with pytest.raises(SystemExit, match="may run on"):
        peer_llamacpp.client_cpus("4096", 1)
    with peer_llamacpp.confined(cpus[-1:]):
        assert os.sched_getaffinity(0) == {cpus[-1]}
    assert sorted(os.sched_getaffinity(0)) == cpus  # restored for the servers started next


def test_report_ratios_are_per_round_against_llama():
    doc = {"settings": {"concurrency": 8, "runs": 2, "prompt_tokens": 32, "new_tokens": 64},
           "runs": [fake_run("http", "llama.cpp", 0, 20.0, 80.0),
                    fake_run("http", "camex-dense", 0, 10.0, 40.0),
                    fake_run("engine", "camex-dense", 0, 12.5, 50.0),
                    fake_run("http", "camex-7x1", 0, 9.0, 20.0),
                    fake_run("http", "llama.cpp", 1, 25.0, 80.0),
                    fake_run("http", "camex-dense", 1, 20.0, 60.0),
                    fake_run("engine", "camex-dense", 1, 20.0, 60.0),
                    fake_run("http", "camex-7x1", 1, 20.0, 30.0, ids=([1, 2], [3, 5])),
                    fake_run("engine", "camex-7x1", 0, 10.0, 25.0),
                    fake_run("engine", "camex-7x1", 1, 20.0, 20.0)]}
    rows = {r["system"]: r for r in summarize(doc)}
    assert list(rows) == ["llama.cpp", "camex-dense", "camex-7x1"]
    dense = rows["camex-dense"]
    assert dense["b1_tok_s"] == [10.0, 20.0]
    assert dense["b1_vs_llama"] == [0.5, 0.8]  # 10/20 and 20/25: never 10/25 or 20/20
    assert dense["b1_overhead"] == [0.8, 1.0] and dense["conc_overhead"] == [0.8, 1.0]
    moe = rows["camex-7x1"]
    assert moe["b1_vs_dense"] == [0.9, 1.0]
    assert moe["conc_vs_dense"] == [0.5, 0.5]  # 20/40, 30/60
    assert moe["conc_engine_vs_dense"] == pytest.approx([0.5, 1 / 3])  # 25/50, 20/60
    assert moe["conc_vs_dense_over_engine"] == pytest.approx([1.0, 1.5])
    assert dense["other_cores_max"] == pytest.approx(0.1)
    assert dense["same_tokens_as_llama"] == [8, 8]  # 2 rounds x 2 levels x 2 requests
    assert rows["camex-7x1"]["same_tokens_as_llama"] == [6, 8]  # round 1: [3, 5] != [3, 4]
    table = markdown(doc)
    assert "| camex-server, dense-equivalent model | float32 | 1 | 10.0–20.0 (0.50–0.80×) | " \
           "40.0–60.0 (0.50–0.75×) |" in table
    assert "| llama.cpp `llama-server -np 8` | f32 | 1 | 20.0–25.0 | 80.0 |" in table
    assert ("| camex-7x1 | float32 | 1 | 50 | 50.0 | 50.0 | 10.0–20.0 | 20.0–25.0 | 0.90–1.00 | "
            "0.80–1.50 | 0.90–1.00 | 0.50 (0.33–0.50) | 6/8 | 0.10 |") in table
    assert "2 runs each, alternating servers" in table  # a document from before interleaving
    doc["settings"]["interleaved"] = "B=1 request by request"
    assert "2 runs each, interleaved request by request at B=1" in markdown(doc)
    two = {**doc, "settings": {**doc["settings"], "concurrency": 2}}  # run with -np 2
    assert "| llama.cpp `llama-server -np 2` | f32 | 1 |" in markdown(two)
    lines = targets(doc)
    assert "1. dense / llama-server, B=1, fp32, 1 thread(s): worst 0.50 (>= 1.0: NOT met)" in lines
    assert "2. CAMEx / dense, B=1, fp32, 1 thread(s): worst 0.90 (>= 0.9: met)" in lines
    assert ("2. CAMEx / dense, concurrent, over HTTP / in the engine, fp32, 1 thread(s): "
            "worst 1.00 (>= 1.0: met)") in lines
    # with each wave's duration recorded, the ratio is also read wave by wave (round 0 here)
    waves = {("http", "camex-7x1"): [2.0, 4.0], ("engine", "camex-7x1"): [2.0, 2.0],
             ("http", "camex-dense"): [1.0, 1.0], ("engine", "camex-dense"): [1.0, 1.0]}
    for run in doc["runs"]:
        if run["round"] == 0 and (run["kind"], run["system"]) in waves:
            run["levels"][1]["slice_durations_s"] = waves[run["kind"], run["system"]]
    moe = {r["system"]: r for r in summarize(doc)}["camex-7x1"]
    assert moe["conc_vs_dense_over_engine_waves"] == [1.0, 0.5]  # round 1 has none
    assert ("2. CAMEx / dense, concurrent, over HTTP / in the engine, fp32, 1 thread(s): "
            "worst 1.00 (>= 1.0: met); 2 waves one by one: 0.50–1.00, median 0.75; paired mean "
            "0.71 (95 % interval 0.01–57.80)") in targets(doc)  # two waves say next to nothing
    # target 3 read slice by slice too: HTTP over its engine for each wave (each B=1 request)
    assert ("3. HTTP / engine, camex-7x1 concurrent, fp32, 1 thread(s): worst 0.80 (>= 0.95: "
            "NOT met); 2 waves one by one: 0.50–1.00, median 0.75; paired mean 0.71 (95 % "
            "interval 0.01–57.80)") in targets(doc)
    for run in doc["runs"]:
        if run["round"] == 1 and run["system"] == "camex-dense":
            run["levels"][0]["slice_durations_s"] = [1.0, 2.0] if run["kind"] == "http" \
                else [1.5, 1.0]
    assert summarize(doc)[1]["b1_overhead_slices"] == [1.5, 0.5]
    assert ("3. HTTP / engine, camex-dense B=1, fp32, 1 thread(s): worst 0.80 (>= 0.95: NOT "
            "met); 2 requests one by one: 0.50–1.50, median 1.00; paired mean 0.87 (95 % "
            "interval 0.00–930.43)") in targets(doc)
    assert "3. HTTP / engine, camex-dense concurrent, fp32, 1 thread(s): worst 0.80 (>= 0.95: " \
           "NOT met); 2 waves one by one: 1.00, median 1.00; paired mean 1.00 (95 % interval " \
           "1.00–1.00)" in targets(doc)


def test_report_cli_prints_each_document_and_refuses_what_is_not_one(tmp_path, capsys):
    import peer_report

    doc = {"settings": {"concurrency": 8, "runs": 1, "prompt_tokens": 32, "new_tokens": 64},
           "runs": [fake_run("http", "llama.cpp", 0, 20.0, 80.0),
                    fake_run("http", "camex-dense", 0, 10.0, 40.0)]}
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    one.write_text(json.dumps(doc))
    doc["runs"][1] = fake_run("http", "camex-dense", 0, 30.0, 40.0)
    two.write_text(json.dumps(doc))
    assert peer_report.main([str(one)]) == 0
    out = capsys.readouterr().out
    assert "| server | dtype | threads |" in out and "worst 0.50 (>= 1.0: NOT met)" in out
    assert peer_report.main(["--targets-only", str(one), str(two)]) == 0
    out = capsys.readouterr().out
    assert "| server |" not in out  # no tables
    first, second = out.split(f"## {two}")
    assert f"## {one}" in first and "B=1, fp32, 1 thread(s): worst 0.50" in first
    assert "B=1, fp32, 1 thread(s): worst 1.50 (>= 1.0: met)" in second
    with pytest.raises(SystemExit) as exit_:
        peer_report.main(["--help"])
    assert exit_.value.code == 0 and "results JSON" in capsys.readouterr().out
    (tmp_path / "other.json").write_text("{}")
    for arg, why in ((tmp_path / "missing.json", "cannot read"),
                     (tmp_path / "other.json", "not a peer_llamacpp.py results document")):
        with pytest.raises(SystemExit) as exit_:
            peer_report.main([str(arg)])
        assert exit_.value.code == 2 and why in capsys.readouterr().err


def test_results_say_dirty_for_a_changed_tracked_file_not_an_untracked_one(tmp_path,
                                                                           tmp_path_factory):
    import peer_llamacpp

    def git(*a):
        subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)
    git("init", "-q")
    (tmp_path / "engine.py").write_text("x = 1\n")
    git("add", "engine.py")
    git("-c", "user.name=t", "-c", "user.email=t@example.invalid", "commit", "-q", "-m", "one")
    state = peer_llamacpp.git_state(tmp_path)
    assert len(state["commit"]) == 40 and state["dirty"] is False
    assert state["commit"].startswith(state["short"])
    (tmp_path / "peer-round-1.json").write_text("{}")  # the previous run's results
    assert peer_llamacpp.git_state(tmp_path)["dirty"] is False
    (tmp_path / "engine.py").write_text("x = 2\n")
    assert peer_llamacpp.git_state(tmp_path)["dirty"] is True
    outside = tmp_path_factory.mktemp("unpacked")  # a source tree without .git: nothing claimed
    assert peer_llamacpp.git_state(outside) == {"commit": None, "short": None, "dirty": None}


def test_report_shows_each_units_startup_merge_cost_where_recorded():
    """Server and engine baseline measure their cost profiles apart; the report puts the two
    merge times side by side per cell and round, and says nothing for older documents."""
    import peer_report
    runs = [fake_run("http", "camex-7x1", 0, 10, 20), fake_run("engine", "camex-7x1", 0, 10, 20),
            fake_run("http", "camex-7x1", 1, 10, 20), fake_run("engine", "camex-dense", 0, 9, 9)]
    assert peer_report.profiles({"runs": runs}) is None
    for run, ms in zip(runs, (3.5, 4.88, 5.25, None)):
        run["cost_profile"] = None if ms is None else {"merge_ms": ms}
    line = peer_report.profiles({"runs": runs})
    assert line.endswith("camex-7x1 fp32 1 thread(s): 3.5 / 4.9, 5.2 / -.")  # rounds 0 and 1
    assert "camex-dense" not in line


def test_paired_interval_is_a_t_interval_on_the_logs_and_narrows_with_more_waves():
    from peer_report import paired_interval
    assert paired_interval([]) is None and paired_interval([0.9]) is None
    ups_downs = [math.exp(0.1), math.exp(-0.1)] * 2  # logs: mean 0, sd 0.1155, 3 dof
    mean, lo, hi = paired_interval(ups_downs)
    half = 3.182 * math.sqrt(4 * 0.01 / 3) / 2
    assert mean == pytest.approx(1.0)
    assert (lo, hi) == (pytest.approx(math.exp(-half)), pytest.approx(math.exp(half)))
    _, lo40, hi40 = paired_interval(ups_downs * 10)  # 39 dof: the normal quantile
    assert hi40 == pytest.approx(math.exp(1.96 * math.sqrt(40 * 0.01 / 39) / math.sqrt(40)))
    assert lo < lo40 < 1.0 < hi40 < hi
    assert paired_interval([1.2, 0.0, None, 1.2]) == (pytest.approx(1.2),) * 3  # unusable skipped


def test_other_cores_cell_shows_the_stolen_part_when_recorded():
    from peer_report import other_cores
    assert other_cores({"other_cores_max": None}) == "-"
    assert other_cores({"other_cores_max": 0.1234, "steal_cores_max": None}) == "0.12"
    assert other_cores({"other_cores_max": 0.3, "steal_cores_max": 0.21}) == "0.30 (0.21 stolen)"


def test_cpu_meter_reports_stolen_time_apart():
    from machine import CpuMeter
    with CpuMeter() as meter:  # busy for 0.1 s of CPU: /proc counts it in 10 ms ticks, and a
        start = time.process_time()  # fixed loop can finish inside one on a fast core
        while time.process_time() - start < 0.1:
            sum(i * i for i in range(10_000))
    got = meter.result
    assert got["own_cores"] > 0 and 0.0 <= got["steal_cores"] <= got["busy_cores"]


def test_cpu_meter_reports_named_parts_such_as_one_thread():
    import threading

    from machine import CpuMeter, main_thread_cpu_s, process_cpu_s
    pid = os.getpid()

    def spin():
        sum(i * i for i in range(300_000))

    with CpuMeter(parts={"main": lambda: main_thread_cpu_s(pid),
                         "process": lambda: process_cpu_s(pid)}) as meter:
        worker = threading.Thread(target=spin)  # CPU on another thread: not the main one's
        worker.start()
        worker.join()
    parts = meter.result["cpu_s"]
    assert set(parts) == {"main", "process"} and parts["process"] > 0
    assert 0 <= parts["main"] < parts["process"]
    with CpuMeter(parts={"main": lambda: main_thread_cpu_s(pid)}) as meter:
        spin()
    assert meter.result["cpu_s"]["main"] > 0
    assert main_thread_cpu_s(2 ** 22 + 7) == 0.0  # no such process


def fake_level(starts_ends: list[tuple[float, float]], first_token: float = 0.1,
               ids: int = 0) -> peer_client.LevelResult:
    from loadtest.records import RequestRecord
    from loadtest.report import build_report
    recs = [RequestRecord(index=i, kind="stream", start=s, end=e, ok=True, output_tokens=3,
                          token_times=[s + first_token, (s + e) / 2, e])
            for i, (s, e) in enumerate(starts_ends)]
    return peer_client.LevelResult(build_report(recs, len(recs), {"concurrency": 1}),
                                   [32] * len(recs), {i: [ids + i] for i in range(len(recs))})


def test_slices_join_as_if_run_back_to_back():
    a = fake_level([(0.0, 1.0)], ids=10)
    b = fake_level([(0.0, 2.0), (2.0, 3.0)], first_token=0.3, ids=20)
    joined = peer_client.concatenate([a, b])
    rep = joined.report
    assert rep.duration_s == pytest.approx(4.0) and rep.planned == rep.completed == 3
    assert rep.output_token_throughput == pytest.approx(9 / 4.0)  # never 9 / 3.0 (max of parts)
    assert [r.start for r in rep.records] == pytest.approx([0.0, 1.0, 3.0])
    assert rep.ttft.max == pytest.approx(0.3) and rep.ttft.min == pytest.approx(0.1)
    assert rep.e2e.max == pytest.approx(2.0)  # a request's own span is unchanged
    assert joined.token_ids == {0: [10], 1: [20], 2: [21]} and joined.prompt_tokens == [32] * 3
    assert rep.run["slices"] == 2 and "client_cpu_s" not in rep.run
    a.report.run["client_cpu_s"], b.report.run["client_cpu_s"] = 0.25, 0.5
    assert peer_client.concatenate([a, b]).report.run["client_cpu_s"] == 0.75
    back = peer_client.LevelResult.from_dict({**joined.to_dict(),
                                              "report": rep.to_dict(with_records=True)})
    assert back.report.output_token_throughput == rep.output_token_throughput
    assert back.token_ids == joined.token_ids


def test_cpu_of_slices_is_weighted_by_their_wall_time():
    import peer_llamacpp
    parts = [{"loadavg_before": [1, 1, 1], "loadavg_after": [2, 2, 2], "wall_s": 1.0,
              "busy_cores": 1.0, "own_cores": 1.0, "other_cores": 0.0},
             {"loadavg_before": [2, 2, 2], "loadavg_after": [3, 3, 3], "wall_s": 3.0,
              "busy_cores": 2.0, "own_cores": 1.0, "other_cores": 1.0}]
    got = peer_llamacpp.combine_cpu(parts)
    assert got["wall_s"] == 4.0 and got["loadavg_before"] == [1, 1, 1]
    assert got["loadavg_after"] == [3, 3, 3]
    assert got["busy_cores"] == 1.75 and got["other_cores"] == 0.75
    assert got["other_cores_slice_max"] == 1.0
    assert "cpu_s" not in got
    parts[0]["cpu_s"] = {"server_main_thread": 0.25, "client": 0.5}
    parts[1]["cpu_s"] = {"server_main_thread": 0.5, "client": 0.25}
    got = peer_llamacpp.combine_cpu(parts)
    assert got["cpu_s"] == {"server_main_thread": 0.75, "client": 0.75}
    assert peer_llamacpp.cpu_per_token_ms(got, 1500) == {"server_main_thread": 0.5,
                                                         "client": 0.5}
    assert peer_llamacpp.cpu_per_token_ms(got, 0) == {}


def test_levels_interleave_request_by_request_with_rotated_order():
    import peer_llamacpp
    calls = []

    def unit(kind, system):
        def measure(prompts, c, n):
            calls.append((f"{system}/{kind}", tuple(prompts), c, n))
            return fake_level([(0.0, 1.0)] * len(prompts)), {
                "loadavg_before": [0, 0, 0], "loadavg_after": [0, 0, 0], "wall_s": 1.0}
        return peer_llamacpp.Unit(kind, system, ["cmd"], 0.5, measure, client_cpus=None)

    units = [unit("http", "a"), unit("http", "b"), unit("engine", "b")]
    plan = {"max_new_tokens": 64, "warmup_new_tokens": 4}
    b1 = {"concurrency": 1, "prompts": ["p0", "p1", "p2"], "warmup_prompts": ["w"]}
    levels = peer_llamacpp.measure_level(units, b1, plan, rnd=0)
    assert calls[:3] == [(u, ("w",), 1, 4) for u in ("a/http", "b/http", "b/engine")]
    measured = [(u, p) for u, p, c, n in calls[3:]]
    assert measured == [("a/http", ("p0",)), ("b/http", ("p0",)), ("b/engine", ("p0",)),
                        ("b/http", ("p1",)), ("b/engine", ("p1",)), ("a/http", ("p1",)),
                        ("b/engine", ("p2",)), ("a/http", ("p2",)), ("b/http", ("p2",))]
    assert set(levels) == {"a", "b", "b (engine)"}
    assert levels["a"]["report"]["planned"] == 3 and levels["a"]["slices"] == 3
    assert levels["a"]["client_cpus"] is None and "client_cpus" not in levels["b (engine)"]
    calls.clear()
    conc = {"concurrency": 2, "prompts": ["q0", "q1", "q2", "q3"], "warmup_prompts": ["w0", "w1"]}
    levels = peer_llamacpp.measure_level(units, conc, plan, rnd=1)
    assert [(u, p, c) for u, p, c, n in calls[3:]] == [  # waves of 2, from the round's rotation
        ("b/http", ("q0", "q1"), 2), ("b/engine", ("q0", "q1"), 2), ("a/http", ("q0", "q1"), 2),
        ("b/engine", ("q2", "q3"), 2), ("a/http", ("q2", "q3"), 2), ("b/http", ("q2", "q3"), 2)]
    assert levels["b"]["slices"] == 2 and levels["b"]["report"]["planned"] == 4
    assert levels["b"]["slice_durations_s"] == [1.0, 1.0]  # each wave's own, for paired ratios


def children(pid: int) -> set[int]:
    try:
        return {int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
    except OSError:
        return set()


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_sigterm_ends_the_rounds_servers_too(models, tmp_path):
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "benchmarks" / "peer_llamacpp.py"), "--quick", "--no-llama",
         "--threads", "1", "--dtypes", "fp32", "--systems", "camex-dense", "--runs", "1",
         "--work", models["work"], "--out", str(tmp_path / "peer.json")],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=bench_env(tmp_path))
    started: set[int] = set()
    try:
        deadline = time.monotonic() + 240
        while len(children(proc.pid)) < 2 and time.monotonic() < deadline:  # server + worker
            time.sleep(0.2)
        started = children(proc.pid)
        assert len(started) == 2, "the round's server and engine worker never started"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
        for pid in started:
            assert not Path(f"/proc/{pid}").exists() or \
                Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in started:  # what a failed run left behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_engine_client_threads_run_where_the_http_client_runs():
    """The engine worker's reader threads are confined as the HTTP client is (unconfined, they
    preempted the engine thread on its core); the engine's own thread and the caller keep
    every CPU."""
    import peer_engine
    from camex_runtime.engine.outputs import TokenEvent

    cpus = sorted(os.sched_getaffinity(0))
    seen = []

    class Handle:
        prompt_token_ids = [1, 2]

        def __iter__(self):
            yield TokenEvent(token_id=7, text="x", logprob=0.0, index=0, finish_reason="length")

    class Engine:
        def submit(self, prompt, params):
            seen.append(os.sched_getaffinity(0))
            return Handle()

    result = peer_engine.closed_loop(Engine(), ["a", "b", "c"], 2, 1, client_cpus=cpus[-1:])
    assert seen == [{cpus[-1]}] * 3 and result.report.completed == 3
    assert sorted(os.sched_getaffinity(0)) == cpus  # this thread was not confined
    seen.clear()
    peer_engine.closed_loop(Engine(), ["a"], 1, 1)
    assert seen == [set(cpus)]


def test_results_json_keeps_number_lists_on_one_line_and_reads_back_the_same():
    from peer_llamacpp import results_json
    doc = {"runs": [{"levels": [{"token_ids": [[50256, 13, 0], [7, 7]],
                                 "slice_durations_s": [2.037, 1.5e-05, -0.25]}],
                     "argv": ["--threads", "1,2"], "note": "ids like [1, 2] stay text"}],
           "flags": [True, False], "mixed": [1, "x"], "empty": [], "nan": float("nan")}
    text = results_json(doc)
    back = json.loads(text)
    assert math.isnan(back.pop("nan")) and back == {k: v for k, v in doc.items() if k != "nan"}
    assert '"token_ids": [\n' in text and "[50256,13,0]" in text and "[7,7]" in text
    assert '"slice_durations_s": [2.037,1.5e-05,-0.25]' in text
    assert '"note": "ids like [1, 2] stay text"' in text  # strings are never touched
    assert "true,\n" in text  # only numbers are packed
    assert len(text) < len(json.dumps(doc, indent=1))


def test_llama_server_events_that_skip_a_token_id_leave_the_ids_unknown():
    """llama-server names only the last token of an event that completes a held-back UTF-8
    character: those ids would compare as a disagreement, so they are not kept."""
    from loadtest.records import RequestRecord
    from peer_client import LlamaCppDialect, Reading

    def read(events):
        ids: list[int] = []
        reading = Reading(LlamaCppDialect(), RequestRecord(index=0, kind="stream", start=0.0),
                          0.0, ids)
        for ev in events:
            reading.event(json.dumps(ev), arrived=1.0)
        reading.end()
        return reading.rec.output_tokens, ids

    whole = [{"tokens": [5], "tokens_predicted": 1}, {"tokens": [7], "tokens_predicted": 2},
             {"tokens": [], "tokens_predicted": 2, "stop": True, "stop_type": "limit"}]
    assert read(whole) == (2, [5, 7])
    held = [{"tokens": [5], "tokens_predicted": 1}, {"tokens": [9], "tokens_predicted": 3},
            {"tokens": [], "tokens_predicted": 3, "stop": True, "stop_type": "limit"}]
    assert read(held) == (3, [])  # three tokens counted, one id never named


@pytest.mark.parametrize("client", ["wire", "httpx"])
def test_both_harness_clients_read_a_tgi_stream_into_the_same_records(client):
    script = Script([tgi_stream([5, 6, 7]), tgi_stream([8, 9, 10], error_after=1)])

    async def main():
        server = await asyncio.start_server(script.handle, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        try:
            return await peer_client.closed_loop(url, peer_client.TgiDialect(), ["a", "b"], 1, 3,
                                                 30.0, client)
        finally:
            server.close()

    result = asyncio.run(main())
    ok, failed = sorted(result.report.records, key=lambda r: r.index)
    assert (ok.ok, ok.output_tokens, ok.finish_reason) == (True, 3, "length")
    assert len(ok.token_times) == 3
    assert ok.token_times == sorted(ok.token_times) and ok.end == ok.token_times[-1]
    assert result.token_ids == {0: [5, 6, 7], 1: [8]}
    assert (failed.ok, failed.failure, failed.output_tokens) == (False, "stream_error", 1)
    assert "overloaded: engine stopped" in failed.error
    assert result.report.run["client"] == client and result.report.run["client_cpu_s"] >= 0


def test_stream_cpu_compares_this_checkout_with_a_baseline_worktree(models, tmp_path):
    """benchmarks/stream_cpu.py: real camex-servers from this checkout and from a temporary
    worktree of a ref, in alternating order per round, the same greedy requests to each; the
    ratio is of the recorded medians, and the worktree is removed afterwards."""
    out = tmp_path / "stream-cpu.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "stream_cpu.py"), "--quick",
         "--compare", "HEAD", "--rounds", "2", "--requests", "2", "--concurrency", "2",
         "--new-tokens", "4", "--work", models["work"], "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=450, env=bench_env(tmp_path))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    doc = json.loads(out.read_text())
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()
    assert doc["commits"] == {"this": head, "baseline": head}
    runs = doc["runs"]
    assert [(r["round"], r["checkout"]) for r in runs if r["level"] == "B=1"] == \
        [(0, "this"), (0, "baseline"), (1, "baseline"), (1, "this")]
    assert {r["level"] for r in runs} == {"B=1", "c=2", "openai B=1"}
    for r in runs:  # every request streamed its tokens; the event loop worked for each
        assert r["tokens"] == (4 if r["level"] == "c=2" else 2) * 4 and r["us_per_token"] > 0
    for level in ("B=1", "c=2"):  # greedy, the same weights and code: the same tokens
        digests = {r["token_ids_digest"] for r in runs if r["level"] == level}
        assert len(digests) == 1
    rows = {(r["checkout"], r["level"]): r for r in doc["rows"]}
    for level in ("B=1", "c=2", "openai B=1"):
        this, base = rows["this", level], rows["baseline", level]
        assert this["us_per_token_rounds"] == [
            r["us_per_token"] for r in runs if r["checkout"] == "this" and r["level"] == level]
        assert this["us_per_token"] == pytest.approx(sum(this["us_per_token_rounds"]) / 2,
                                                     abs=0.051)  # rounded to 0.1
        assert this["vs_baseline"] == pytest.approx(
            this["us_per_token"] / base["us_per_token"], abs=1e-3)
    worktrees = subprocess.run(["git", "worktree", "list"], cwd=ROOT, capture_output=True,
                               text=True).stdout
    assert "stream-cpu-" not in worktrees
    assert "vs_baseline" in proc.stdout
