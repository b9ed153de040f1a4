"""Tiny folded checkpoints for the engine tests, with routers that do not saturate.

(The shared `tiny_lm_dir` fixture scales routers by 50, so scores are near one-hot and two
different routing decisions can pick the same merge; cache-key and equivalence tests need
decisions that really differ.) `reference(dir)` is the model code's own folded model: the
semantics the engine must reproduce.
"""
from __future__ import annotations

from pathlib import Path

import torch

from camex_runtime import CamexConfig, CamexForCausalLM, CamexForSequenceClassification, export
from camex_runtime.checkpoint import load_folded
from camex_runtime.engine.runner import build_model

VOCAB = 61


def build_folded(out_dir: Path, kind: str = "lm", *, T: int = 4, router_scale: float = 8.0,
                 seed: int = 0, **overrides) -> Path:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=VOCAB, d_model=32, n_layer=2, n_head=4, d_ff=64,
               max_position_embeddings=96, num_experts=3, segment_len=T, curvature_rank=1,
               eos_token_id=VOCAB - 1)
    if kind == "classifier":
        cfg.update(num_labels=3, id2label={0: "a", 1: "b", 2: "c"},
                   label2id={"a": 0, "b": 1, "c": 2})
    cfg.update(overrides)
    model = (CamexForCausalLM if kind == "lm" else CamexForSequenceClassification)(
        CamexConfig(**cfg))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".experts." in name:
                p.add_(torch.randn_like(p) * 0.3)
            elif ".router." in name:
                p.mul_(router_scale)
    export(model, out_dir)
    return out_dir


def reference(path: Path, dtype=None) -> torch.nn.Module:
    return build_model(load_folded(path, dtype=dtype))


def full_forward_logprobs(ref, ids: list[int], prompt_len: int, mode: str) -> torch.Tensor:
    """Log-probabilities (L, V) of one full forward of `ref` over `ids`, routed as the engine
    routes a prompt of `prompt_len` tokens followed by its generated tokens."""
    T = ref.config.segment_len
    with torch.no_grad():
        logits = ref(torch.tensor([ids]), routing=mode, route1_len=min(prompt_len, T),
                     prompt_len=prompt_len).logits[0]
    return torch.log_softmax(logits.float(), -1)


def results_alone(path: Path, prompts, params, **engine_kwargs) -> list:
    """Each request's GenerationResult from an engine that runs one request at a time (the
    reference of batched == alone); `params` one SamplingParams for all, or one per prompt."""
    from camex_runtime import Engine

    engine = Engine.from_pretrained(path, max_batch_size=1, **engine_kwargs)
    engine.start()
    try:
        each = params if isinstance(params, list) else [params] * len(prompts)
        return [engine.submit(p, sp).result() for p, sp in zip(prompts, each)]
    finally:
        engine.stop()



def int8_reference(path: Path, dtype=None) -> torch.nn.Module:
    """`reference(path)` as an engine with `expert_deltas="int8"` must reproduce it."""
    from camex_runtime.engine.moe import with_int8_deltas

    return with_int8_deltas(reference(path, dtype))
