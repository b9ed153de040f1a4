"""Named training presets: a registry of functions returning a complete `TrainConfig`.

- `demo-lm`: causal LM on every Debian fortune (all topics, offensive ones never included).
- `demo-classifier`: topic classifier over `fortunes.CLASSIFIER_CATEGORIES`, labels balanced,
  stratified held-out split. Pass the LM's directory as `tokenizer` to reuse its tokenizer (the
  demo does, and also seeds the classifier's body from the LM with `init_from`).
- `tiny-lm`: seconds-long smoke run on the fortunes (CI, trying the CLI).
- `llama-upcycle`: the bring-your-own-model path on a model made locally — a small random dense
  Llama (GQA, SwiGLU; `random_dense.py`, built under `runs/tiny-llama-dense` when training
  starts) is upcycled to CAMEx and fine-tuned on the fortunes. Pass `--from-dense DIR` for your
  own model.

Each demo preset is sized to finish in under 5 minutes on 2 CPU cores; the measured numbers are
in docs/training.md. Presets only build configs; the CLI applies user overrides on top.
"""

from __future__ import annotations

from dataclasses import replace
from collections.abc import Callable

from .config import ModelSpec, TrainConfig
from .fortunes import CLASSIFIER_CATEGORIES, fortune_files

# The demo architecture (both presets): 4 blocks, all merged-expert, rank-1 curvature.
DEMO_MODEL = ModelSpec(d_model=128, n_layer=4, n_head=4, d_ff=512, num_experts=4,
                       moe_layers=None, segment_len=32, curvature_rank=1)


def demo_lm(**overrides) -> TrainConfig:
    files = [str(p) for p in fortune_files()]
    cfg = TrainConfig(
        task="lm", data=files, eval_fraction=0.03,
        data_description=f"Debian fortunes, all {len(files)} non-offensive topic files",
        vocab_size=4096, block_size=128, model=replace(DEMO_MODEL),
        steps=300, batch_size=16, lr=3e-3, warmup=30, schedule="cosine",
        eval_every=100, eval_batches=40, out_dir="runs/demo-lm")
    return replace(cfg, **overrides)


def demo_classifier(**overrides) -> TrainConfig:
    files = [str(p) for p in fortune_files(categories=CLASSIFIER_CATEGORIES)]
    cfg = TrainConfig(
        task="classify", data=files, balance_labels=True, eval_fraction=0.2,
        data_description=("Debian fortunes topic classification ("
                          + ", ".join(CLASSIFIER_CATEGORIES) + "), balanced"),
        vocab_size=4096, block_size=128, model=replace(DEMO_MODEL, dropout=0.1),
        steps=300, batch_size=16, lr=1e-3, warmup=30, schedule="cosine",
        eval_every=50, eval_batches=None, out_dir="runs/demo-classifier")
    return replace(cfg, **overrides)


def tiny_lm(**overrides) -> TrainConfig:
    files = [str(p) for p in fortune_files(categories=("food", "law"))]
    cfg = TrainConfig(
        task="lm", data=files, vocab_size=512, block_size=32,
        model=ModelSpec(d_model=32, n_layer=2, n_head=4, d_ff=64, num_experts=3, segment_len=8),
        steps=30, batch_size=8, lr=3e-3, warmup=3, eval_batches=10, out_dir="runs/tiny-lm")
    return replace(cfg, **overrides)


def llama_upcycle(**overrides) -> TrainConfig:
    files = [str(p) for p in fortune_files()]
    cfg = TrainConfig(
        task="lm", data=files, eval_fraction=0.03, from_dense="random-llama:runs/tiny-llama-dense",
        data_description=f"Debian fortunes, all {len(files)} non-offensive topic files",
        block_size=128, model=ModelSpec(num_experts=4, segment_len=32, curvature_rank=1),
        steps=200, batch_size=16, lr=2e-3, warmup=20, schedule="cosine",
        eval_every=100, eval_batches=40, out_dir="runs/llama-upcycle")
    return replace(cfg, **overrides)


PRESETS: dict[str, Callable[..., TrainConfig]] = {
    "demo-lm": demo_lm,
    "demo-classifier": demo_classifier,
    "tiny-lm": tiny_lm,
    "llama-upcycle": llama_upcycle,
}


def preset(name: str, **overrides) -> TrainConfig:
    """The named preset with `overrides` applied (TrainConfig field names)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name](**overrides)
