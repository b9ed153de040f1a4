"""Loading is lazy and in place: a folded checkpoint of N bytes becomes a serving engine with a
peak resident-memory growth of at most 1.3 N, bf16 served in bf16 without an fp32 copy.

Measured in a fresh process (its VmHWM high-water mark against its VmRSS before the load, after
a tiny checkpoint's load paid the one-time costs), on
a Llama-family checkpoint where the expert stacks are most of the bytes: the runner restacks
[E_m; Δ] layer by layer, and every layer's old layout must be gone before the next one's."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from camex_runtime import CamexConfig, CamexForCausalLM
from camex_runtime.checkpoint import save_folded

MEASURE = r"""
import json, os, sys
import torch
import camex_runtime as cr

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

from camex_runtime import kernels

def load(path):
    return cr.Engine.from_pretrained(path, dtype=sys.argv[2], max_batch_size=1,
                                     max_total_tokens=32, strategy="merged", merge_cache_bytes=1)

# One-time costs are not the checkpoint's: the kernels' library, the code pages and thread pools
# a first load touches. A tiny checkpoint of the same family and dtype pays them first; then
# the high-water mark is reset (Linux >= 4.0) and the real load is measured from here.
del_me = load(sys.argv[3])
del del_me
from camex_runtime.checkpoint import release_freed_memory
release_freed_memory()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status("VmRSS")
engine = load(sys.argv[1])
peak = status("VmHWM")
# every matrix (linear and embedding weights, expert stacks); mixed precision keeps only the
# 1-d parameters (norms, biases) in fp32, see engine/precision.py
dtypes = {str(p.dtype) for p in engine.runner.model.parameters() if p.dim() > 1}
dtypes |= {str(t.dtype) for m in engine.runner.moe for t in (m.w1, m.w2)}
print(json.dumps({"grew": peak - before, "dtypes": sorted(dtypes), "kernels": kernels.status()}))
"""


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("mem")
    torch.manual_seed(0)
    out = {}
    for name, size in (("big", dict(d_model=256, n_layer=8, d_ff=768)),
                       ("tiny", dict(d_model=32, n_layer=2, d_ff=64))):
        cfg = CamexConfig(family="llama", vocab_size=1000, n_head=8, num_key_value_heads=2,
                          max_position_embeddings=64, num_experts=7, segment_len=16,
                          folded=True, tie_word_embeddings=False, **size)
        cfg.architectures = ["CamexForCausalLM"]
        model = CamexForCausalLM(cfg)
        for dtype in (torch.float32, torch.bfloat16):
            path = root / f"{name}-{str(dtype).replace('torch.', '')}"
            save_folded({k: v.to(dtype) for k, v in model.state_dict().items()}, cfg, path)
            out[name, dtype] = path
    return out


@pytest.mark.slow
@pytest.mark.parametrize("file_dtype,serve_dtype", [
    (torch.bfloat16, "bfloat16"), (torch.float32, "float32"), (torch.float32, "bfloat16")])
def test_peak_memory_of_a_load_is_at_most_1_3_checkpoints(checkpoints, file_dtype, serve_dtype):
    path: Path = checkpoints["big", file_dtype]
    n = (path / "model.safetensors").stat().st_size
    out = subprocess.run([sys.executable, "-c", MEASURE, str(path), serve_dtype,
                          str(checkpoints["tiny", file_dtype])],
                         capture_output=True, text=True, timeout=300, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["dtypes"] == [f"torch.{serve_dtype}"]  # no fp32 copy of any weight matrix
    assert got["grew"] <= 1.3 * n, f"peak grew {got['grew'] / n:.2f} x the checkpoint size"
