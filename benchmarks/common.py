"""Shared pieces of the engine benchmarks: model shapes, random-weight models, timing, output.

Benchmarks use random weights (speed does not depend on them) and build models in memory,
so nothing is downloaded or exported. `--quick` swaps the GPT-2-small shape for a tiny one so
a script can be checked in seconds; the lead runs the full shapes on a quiet machine.
Benchmarks print a table and write JSON to benchmarks/results/; they assert nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout

from camex_runtime import CamexConfig, CamexForCausalLM, CamexForSequenceClassification  # noqa: E402
from camex_runtime.config import PRESETS  # noqa: E402
from camex_runtime.engine.cost_model import best_time  # noqa: E402,F401  (re-exported)
from peer_models import LLAMA_SHAPES  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"

# GPT-2 small with 1 base + 7 routed experts per FFN, T=256 (docs/DESIGN.md §9).
# max_position_embeddings is 2048 so 1024-token prompts plus generation fit.
FULL = dict(vocab_size=50257, d_model=768, n_layer=12, n_head=12, d_ff=3072,
            max_position_embeddings=2048, num_experts=7, segment_len=256)
QUICK = dict(vocab_size=1000, d_model=64, n_layer=2, n_head=4, d_ff=256,
             max_position_embeddings=512, num_experts=7, segment_len=16)
# Llama family: TinyLlama-1.1B's shape (22 blocks, GQA 32/4 heads, SwiGLU 5632) with CAMEx on
# every other block, 1 base + 7 routed experts (CamexConfig preset "tinyllama-1b").
LLAMA_FULL = dict(PRESETS["tinyllama-1b"])
LLAMA_QUICK = dict(family="llama", vocab_size=1000, d_model=64, n_layer=4, n_head=4,
                   num_key_value_heads=2, d_ff=176, max_position_embeddings=512, num_experts=7,
                   moe_layers=[1, 3], segment_len=16, tie_word_embeddings=False)
# A Llama of GPT-2 small's width and depth (RMSNorm, rotary positions, GQA 12/4 heads, SwiGLU
# 2,048 = GPT-2's FFN parameter count, untied head), 1 base + 7 routed experts on every block as
# FULL: read from the table `peer_llamacpp.py --family llama` builds its model from, so the two
# benchmarks measure the same shape.
_PEER_LLAMA = LLAMA_SHAPES["full"]
LLAMA_SMALL = dict(family="llama", vocab_size=_PEER_LLAMA["vocab_size"],
                   d_model=_PEER_LLAMA["hidden_size"], n_layer=_PEER_LLAMA["num_hidden_layers"],
                   n_head=_PEER_LLAMA["num_attention_heads"],
                   num_key_value_heads=_PEER_LLAMA["num_key_value_heads"],
                   d_ff=_PEER_LLAMA["intermediate_size"], max_position_embeddings=2048,
                   num_experts=7, segment_len=256, layer_norm_epsilon=1e-5,
                   tie_word_embeddings=False)
SHAPES = {"gpt2-small": (FULL, QUICK), "tinyllama-1b": (LLAMA_FULL, LLAMA_QUICK),
          "llama-small": (LLAMA_SMALL, LLAMA_QUICK)}


def base_parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes: check the script runs")
    p.add_argument("--shape", default="gpt2-small", choices=sorted(SHAPES),
                   help="model shape (random weights); tinyllama-1b and llama-small (GPT-2 "
                        "small's width and depth): the Llama family")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--reps", type=int, default=3, help="repetitions; the best is kept")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/NAME.json)")
    return p


def setup(args) -> tuple[torch.device, torch.dtype]:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    return torch.device(args.device), getattr(torch, args.dtype)


def shape(args, **overrides) -> dict:
    full, quick = SHAPES[getattr(args, "shape", "gpt2-small")]
    return {**(quick if args.quick else full), **overrides}


def folded_model(cfg: dict, device, dtype, kind: str = "lm", **overrides):
    """A random-weight folded-form model (what export would write), on device/dtype.
    num_experts=0 gives the dense-equivalent model."""
    extra = dict(num_labels=2) if kind == "classifier" else {}
    config = CamexConfig(**{**cfg, **extra, **overrides}, folded=True)
    cls = CamexForCausalLM if kind == "lm" else CamexForSequenceClassification
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in the benchmark dtype: no fp32 copy of a 7 GB model
    try:
        with torch.device(device):
            model = cls(config)
    finally:
        torch.set_default_dtype(previous)
    return model.to(dtype).eval()


def training_model(cfg: dict, device, dtype):
    """The training form (curvature operators, deltas recomputed every forward)."""
    with torch.device(device):
        model = CamexForCausalLM(CamexConfig(**cfg, curvature_rank=1))
    return model.to(dtype).eval()


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def print_table(rows: list[dict], cols: list[str]) -> None:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    widths = [max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(fmt(r.get(c, "")).ljust(w) for c, w in zip(cols, widths)))


def write_results(name: str, args, rows: list[dict], extra: dict | None = None) -> Path:
    out = Path(args.out) if args.out else RESULTS / f"{name}{'-quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(benchmark=name, quick=args.quick, device=str(args.device), dtype=args.dtype,
                torch=torch.__version__, threads=torch.get_num_threads(),
                cpu_count=os.cpu_count(), platform=platform.platform(),
                time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    if torch.device(args.device).type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name()
    out.write_text(json.dumps({"meta": meta, **(extra or {}), "rows": rows}, indent=2))
    print(f"wrote {out}")
    return out
