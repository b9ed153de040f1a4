"""The training loop: learning, accumulation, resume, checkpoint files, metrics and plots."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from camex_runtime.training import train
from camex_runtime.training.batches import BatchOrder
from camex_runtime.training.checkpointing import build_model
from camex_runtime.training.distributed import init_distributed
from camex_runtime.training.loop import train_step
from camex_runtime.training.prepare import prepare_data
from camex_runtime.training.metrics import read_metrics
from camex_runtime.training.optim import lr_factor
from camex_runtime.training.state import ResumeError

from .conftest import tiny_config


def weights(out_dir: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(out_dir) / "model.safetensors"))


def train_losses(out_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(out_dir) if r["kind"] == "train"]


def test_lm_loss_decreases_and_beats_unigram(tmp_path, corpus_dir):
    result = train(tiny_config(tmp_path / "run", [str(corpus_dir)], steps=40, eval_every=20,
                               lr=1e-2))
    losses = train_losses(result.out_dir)
    assert len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert first - last > 1.0  # nats; measured ~1.75 (5.6 -> 3.85)
    m = result.metrics
    assert m["perplexity"] == pytest.approx(math.exp(m["eval_loss"]))
    assert m["perplexity"] < 0.8 * m["unigram_perplexity"]  # measured ~40 vs ~63
    assert not result.model.training


def test_checkpoint_files_metrics_and_plot(tmp_path, corpus_dir):
    out = tmp_path / "run"
    result = train(tiny_config(out, [str(corpus_dir)], steps=6, eval_every=3, log_every=2))
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "trainer_state.json",
            "optimizer.safetensors", "metrics.jsonl", "loss_curve.png"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pkl", ".pth"))]  # no pickle
    assert json.loads((out / "config.json").read_text())["folded"] is False
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = read_metrics(out)
    assert [r["step"] for r in records if r["kind"] == "train"] == [2, 4, 6]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [3, 6]
    assert records[-1]["eval_loss"] == pytest.approx(result.metrics["eval_loss"])
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["trainer"]["step"] == 6 and state["config"]["steps"] == 6
    opt = load_file(str(out / "optimizer.safetensors"))
    assert any(k.endswith(".exp_avg_sq") for k in opt) and "rng.torch" in opt


def test_resume_matches_an_uninterrupted_run(tmp_path, corpus_dir):
    # dare draws random masks every step: the RNG state must be restored too.
    spec = replace(tiny_config(tmp_path, []).model, merge_method="dare", dare_p=0.2)
    common = dict(steps=8, eval_every=4, model=spec)
    full = train(tiny_config(tmp_path / "full", [str(corpus_dir)], **common))
    part = tmp_path / "part"
    first = train(tiny_config(part, [str(corpus_dir)], stop_after=5, **common))
    assert first.steps == 5 and first.export_dir is None
    resumed = train(tiny_config(part, [str(corpus_dir)], resume=True, **common))
    assert resumed.steps == 8
    a, b = weights(tmp_path / "full"), weights(part)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert train_losses(tmp_path / "full") == train_losses(part)
    assert resumed.metrics["eval_loss"] == full.metrics["eval_loss"]


def test_resume_refuses_a_different_model_and_overwrite_is_explicit(tmp_path, corpus_dir):
    out = tmp_path / "run"
    cfg = tiny_config(out, [str(corpus_dir)], steps=2)
    train(cfg)
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg)
    with pytest.raises(ResumeError, match="d_model"):
        train(replace(cfg, resume=True, steps=3, model=replace(cfg.model, d_model=64)))
    assert train(replace(cfg, overwrite=True)).steps == 2


def sgd_step(cfg) -> tuple[dict[str, torch.Tensor], float]:
    """Weights after one train_step with plain SGD: linear in the gradient, unlike Adam, whose
    normalisation turns float noise in near-zero gradients (e.g. the base expert's, which
    cancels when alpha * sum(s) = 1) into full-size updates."""
    ctx = init_distributed("cpu")
    torch.manual_seed(cfg.seed)
    data = prepare_data(cfg, ctx, resuming=False)
    model = build_model(cfg, data, resuming=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    stats = train_step(model, data, BatchOrder(len(data.train_set), cfg.batch_size, cfg.seed),
                       0, opt, replace(cfg, grad_clip=0.0), ctx)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, stats.loss


def test_gradient_accumulation_equals_a_larger_batch(tmp_path, corpus_dir):
    big, big_loss = sgd_step(tiny_config(tmp_path / "big", [str(corpus_dir)], batch_size=8))
    acc, acc_loss = sgd_step(tiny_config(tmp_path / "acc", [str(corpus_dir)], batch_size=4,
                                         grad_accum=2))
    assert acc_loss == pytest.approx(big_loss, rel=1e-5)
    for k in big:
        torch.testing.assert_close(acc[k], big[k], rtol=1e-5, atol=1e-6, msg=k)
    one, _ = sgd_step(tiny_config(tmp_path / "one", [str(corpus_dir)], batch_size=4))
    assert not torch.allclose(one["transformer.wte.weight"], big["transformer.wte.weight"])


def test_bf16_autocast_trains(tmp_path, corpus_dir):
    result = train(tiny_config(tmp_path / "run", [str(corpus_dir)], steps=3, bf16=True))
    assert math.isfinite(result.metrics["eval_loss"])
    assert all(v.dtype == torch.float32 for v in weights(result.out_dir).values())  # master fp32


def test_classifier_learns_separable_topics(tmp_path, labeled_jsonl):
    result = train(tiny_config(tmp_path / "clf", [str(labeled_jsonl)], task="classify",
                               steps=30, batch_size=8, eval_fraction=0.25, eval_batches=None))
    assert result.metrics["chance_accuracy"] == 0.5
    assert result.metrics["accuracy"] >= 0.9
    config = json.loads((tmp_path / "clf" / "config.json").read_text())
    assert config["id2label"] == {"0": "fruit", "1": "vehicles"}


def test_init_from_copies_the_lm_body_into_a_classifier(tmp_path, corpus_dir, labeled_jsonl):
    lm = train(tiny_config(tmp_path / "lm", [str(corpus_dir)], steps=2))
    clf = train(tiny_config(tmp_path / "clf", [str(labeled_jsonl)], task="classify", steps=1,
                            lr=1e-9, warmup=0, tokenizer=lm.out_dir, init_from=lm.out_dir))
    a, b = weights(lm.out_dir), weights(clf.out_dir)
    key = "transformer.h.1.ffn.experts.fc1.weight"
    torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-6)
    assert "score.weight" in b and "score.weight" not in a


def test_lr_schedule_warms_up_then_decays_to_the_floor(tmp_path):
    cfg = tiny_config(tmp_path, ["x"], steps=10, warmup=2, min_lr_ratio=0.1)
    f = [lr_factor(s, cfg) for s in range(10)]
    assert f[0] == 0.5 and f[1] == 1.0 and f[2] == 1.0
    assert all(x >= y for x, y in zip(f[2:], f[3:]))
    assert lr_factor(10, cfg) == pytest.approx(0.1)
    assert lr_factor(5, replace(cfg, schedule="constant")) == 1.0
