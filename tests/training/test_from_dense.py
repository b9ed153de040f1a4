"""`camex-train --from-dense`: a dense Llama-family directory (weights, tokenizer with a chat
template, generation config with several EOS ids) is upcycled, checked, fine-tuned, resumed,
trained data-parallel, exported, and served — and what travels arrives in the folded dir."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import camex_runtime as cr
from camex_runtime.training.cli import main as train_main

from tests.conftest import make_tokenizer
from tests.dense_models import build_dense

from .conftest import REPO, subprocess_env
from .test_ddp import free_port

TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}<|assistant|>"


@pytest.fixture
def dense_dir(tmp_path: Path) -> Path:
    """A random dense Qwen2 (q/k/v biases, GQA) with its own tokenizer and two EOS ids."""
    tok = make_tokenizer(tmp_path / "tok")
    tok.chat_template = TEMPLATE
    d = build_dense(tmp_path / "dense", "qwen2", vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                    bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    tok.save_pretrained(d)
    gen = {"bos_token_id": tok.bos_token_id, "eos_token_id": [tok.eos_token_id, 7]}
    (d / "generation_config.json").write_text(json.dumps(gen))
    return d


def run_cli(argv, capsys) -> tuple[dict, str]:
    """(the final JSON summary, stderr) of one camex-train run."""
    assert train_main(argv) == 0
    captured = capsys.readouterr()
    return json.loads(captured.out.strip().splitlines()[-1]), captured.err


def test_from_dense_trains_exports_and_serves(tmp_path, capsys, corpus_dir, dense_dir):
    out, folded = tmp_path / "run", tmp_path / "folded"
    common = ["--data", str(corpus_dir), "--from-dense", str(dense_dir), "--num-experts", "3",
              "--segment-len", "4", "--block-size", "16", "--batch-size", "4", "--lr", "3e-3",
              "--warmup", "2", "--eval-batches", "2", "--out", str(out), "--no-progress",
              "--steps", "8"]
    summary, err = run_cli([*common, "--stop-after", "4"], capsys)
    # the upcycle check ran and the upcycled model is the dense one up to fp32 rounding (bit
    # equality is CPU-dependent: 0 on a Zen 4 core, 3.2e-07 on a Xeon with AMX)
    found = re.search(r"max relative logit error against the dense model (\S+)", err)
    assert found and float(found.group(1)) <= 1e-6, err
    assert summary["steps"] == 4 and (out / "trainer_state.json").is_file()
    summary, _ = run_cli([*common, "--resume", "--export", str(folded)], capsys)
    assert summary["steps"] == 8 and summary["export_dir"]
    cfg = json.loads((folded / "config.json").read_text())
    assert cfg["family"] == "llama" and cfg["num_key_value_heads"] == 2 and cfg["attention_bias"]
    assert cfg["provenance"]["source_model_type"] == "qwen2"
    # the tokenizer (with its chat template) and the generation config travelled
    gen = json.loads((folded / "generation_config.json").read_text())
    assert sorted(gen["eos_token_id"]) == sorted([7, json.loads(
        (dense_dir / "generation_config.json").read_text())["eos_token_id"][0]])
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(folded)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == \
        "<|user|>hi<|assistant|>"
    engine = cr.Engine.from_pretrained(folded)
    assert 7 in engine.eos_token_ids and tok.eos_token_id in engine.eos_token_ids
    res = engine.generate("the quick brown fox", max_new_tokens=5, ignore_eos=True)
    assert len(res.token_ids) == 5


def test_from_dense_takes_a_sparse_moe_and_its_experts(tmp_path, capsys, corpus_dir):
    """A Mixtral directory: its experts per layer, not --num-experts; no exactness check (a
    merged model is not its source), said on stderr; trained and exported."""
    from tests.model.test_sparse_sources import build_sparse

    tok = make_tokenizer(tmp_path / "tok")
    src = build_sparse(tmp_path / "mixtral", "mixtral", vocab_size=len(tok),
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id)
    tok.save_pretrained(src)
    folded = tmp_path / "folded"
    summary, err = run_cli(["--data", str(corpus_dir), "--from-dense", str(src),
                            "--num-experts", "7", "--segment-len", "4", "--block-size", "16",
                            "--batch-size", "4", "--steps", "2", "--eval-batches", "1",
                            "--out", str(tmp_path / "run"), "--no-progress",
                            "--export", str(folded)], capsys)
    assert "a sparse MoE (mixtral)" in err and "--num-experts / --moe-layers ignored" in err
    assert "max relative logit error" not in err
    cfg = json.loads((folded / "config.json").read_text())
    assert summary["steps"] == 2 and cfg["num_experts"] == 4 and cfg["moe_layers"] == [0, 1]
    assert cfg["provenance"]["source_model_type"] == "mixtral"


def test_from_dense_takes_gpt_oss_as_published_and_trains_its_sinks(tmp_path, capsys,
                                                                    corpus_dir):
    """A GPT-OSS directory with MXFP4 experts (OpenAI's layout): imported, fine-tuned (the
    sinks, routers' biases and clamped experts get gradients and move), exported as format 6
    and served."""
    from safetensors.torch import load_file

    from tests.dense_models import build_dense
    from tests.model.test_gpt_oss import quantize_mxfp4

    tok = make_tokenizer(tmp_path / "tok")
    src = build_dense(tmp_path / "src", "gpt_oss", vocab_size=len(tok),
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    quantize_mxfp4(src, tmp_path / "q")
    tok.save_pretrained(tmp_path / "q")
    folded = tmp_path / "folded"
    summary, err = run_cli(["--data", str(corpus_dir), "--from-dense", str(tmp_path / "q"),
                            "--segment-len", "4", "--block-size", "16", "--batch-size", "4",
                            "--steps", "3", "--lr", "1e-2", "--eval-batches", "1",
                            "--out", str(tmp_path / "run"), "--no-progress",
                            "--export", str(folded)], capsys)
    assert "a sparse MoE (gpt_oss)" in err and summary["steps"] == 3
    cfg = json.loads((folded / "config.json").read_text())
    assert cfg["format_version"] == 6 and cfg["attention_sinks"] and cfg["router_bias"]
    assert cfg["hidden_act"] == "swigluoai" and cfg["num_experts"] == 3
    trained = load_file(str(folded / "model.safetensors"))
    theirs = load_file(str(src / "model.safetensors"))
    for name in ("model.layers.0.self_attn.sinks", "model.layers.1.mlp.router.bias"):
        ours = name.replace("model.layers", "transformer.h").replace("self_attn", "attn") \
            .replace("mlp.router", "ffn.router")
        assert not torch.allclose(trained[ours], theirs[name]), name  # trained, not copied
    engine = cr.Engine.from_pretrained(folded)
    try:
        out = engine.generate(tok("hello there")["input_ids"], max_new_tokens=5, ignore_eos=True)
        assert len(out.token_ids) == 5
    finally:
        engine.stop()


def test_from_dense_takes_an_fp8_release(tmp_path, capsys, corpus_dir, dense_dir):
    """A fine-grained FP8 directory (as Qwen's -FP8 releases): dequantized as it is read, and
    the upcycle check compares with transformers' dequantized model, not the bf16 original."""
    from tests.dense_models import quantize_fp8

    fp8 = quantize_fp8(dense_dir, tmp_path / "fp8", block=(16, 32))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (dense_dir / name).is_file():
            (fp8 / name).write_bytes((dense_dir / name).read_bytes())
    summary, err = run_cli(["--data", str(corpus_dir), "--from-dense", str(fp8),
                            "--num-experts", "3", "--segment-len", "4", "--block-size", "16",
                            "--batch-size", "4", "--steps", "2", "--eval-batches", "1",
                            "--out", str(tmp_path / "run"), "--no-progress"], capsys)
    found = re.search(r"max relative logit error against the dense model (\S+)", err)
    assert found and float(found.group(1)) <= 1e-5, err
    assert summary["steps"] == 2


def test_from_dense_refuses_architecture_flags(capsys, corpus_dir, dense_dir):
    with pytest.raises(SystemExit) as exc:
        train_main(["--data", str(corpus_dir), "--from-dense", str(dense_dir), "--d-model", "64"])
    assert exc.value.code == 2
    assert "--d-model cannot be combined with --from-dense" in capsys.readouterr().err


def test_from_dense_classifier(tmp_path, capsys, labeled_jsonl, dense_dir):
    """A classifier upcycled from a dense LM: decoder pooling, fresh head, labels from the data."""
    folded = tmp_path / "clf"
    run_cli(["--task", "classify", "--data", str(labeled_jsonl), "--from-dense", str(dense_dir),
             "--num-experts", "2", "--segment-len", "4", "--block-size", "16", "--steps", "4",
             "--batch-size", "4", "--out", str(tmp_path / "run"), "--no-progress",
             "--export", str(folded)], capsys)
    engine = cr.Engine.from_pretrained(folded)
    assert engine.kind == "classifier" and engine.config.classifier_pooling == "last"
    labels = {label for label, _ in engine.classify(["a red apple"])[0].scores}
    assert labels == {"fruit", "vehicles"}


@pytest.mark.slow
def test_two_gloo_ranks_train_an_upcycled_model(tmp_path, corpus_dir, dense_dir):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           str(Path(__file__).with_name("ddp_worker.py")), str(corpus_dir), str(out),
           str(dense_dir)]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((out / f"hash-{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["sha256"] == ranks[1]["sha256"] and ranks[0]["world_size"] == 2
