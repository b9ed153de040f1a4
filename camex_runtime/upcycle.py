"""Upcycling: build a CAMEx LM from a dense GPT-2 checkpoint directory (`transformers` format).

Every expert starts as a copy of the dense FFN (τ = 0), the curvature starts at the identity and
routers at N(0, 0.02), so at init the CAMEx model computes exactly the dense model's logits.

Dynamic-Merg cannot copy every layer's FFN into a base it does not own: layer 1's base is that
layer's FFN, and each later layer's *experts* are that layer's dense FFN, so τ^l = FFN_l − E_m^l.
With α = 1 the merged expert (Σ s_i = 1) and the next derived base then equal the dense FFN_l
again, so the dynamic model also starts at the dense model (up to rounding); with α ≠ 1 it
does not, and no assignment of its parameters can make it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .config import CamexConfig
from .modeling import CamexForCausalLM


def config_from_gpt2(gpt2_config, **overrides: Any) -> CamexConfig:
    g = gpt2_config
    base = dict(vocab_size=g.vocab_size, d_model=g.n_embd, n_layer=g.n_layer, n_head=g.n_head,
                d_ff=g.n_inner or 4 * g.n_embd, max_position_embeddings=g.n_positions,
                layer_norm_epsilon=g.layer_norm_epsilon, bos_token_id=g.bos_token_id,
                eos_token_id=g.eos_token_id)
    if getattr(g, "activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"unsupported GPT-2 activation {g.activation_function!r}; CAMEx uses gelu_new")
    return CamexConfig(**{**base, **overrides})


@torch.no_grad()
def upcycle_from_dense(path: str | Path, **config_overrides: Any) -> CamexForCausalLM:
    """A training-form CamexForCausalLM initialised from the dense GPT-2 at ``path``."""
    from transformers import GPT2LMHeadModel

    dense = GPT2LMHeadModel.from_pretrained(path, dtype=torch.float32)
    cfg = config_from_gpt2(dense.config, **config_overrides)
    model = CamexForCausalLM(cfg)
    src, dst = dense.transformer, model.transformer
    dst.wte.weight.copy_(src.wte.weight)
    dst.wpe.weight.copy_(src.wpe.weight)
    dst.ln_f.load_state_dict(src.ln_f.state_dict())
    for i, (sb, db) in enumerate(zip(src.h, dst.h)):
        db.ln_1.load_state_dict(sb.ln_1.state_dict())
        db.ln_2.load_state_dict(sb.ln_2.state_dict())
        # GPT-2's Conv1D stores weights as (in, out); nn.Linear wants (out, in).
        db.attn.c_attn.weight.copy_(sb.attn.c_attn.weight.T)
        db.attn.c_attn.bias.copy_(sb.attn.c_attn.bias)
        db.attn.c_proj.weight.copy_(sb.attn.c_proj.weight.T)
        db.attn.c_proj.bias.copy_(sb.attn.c_proj.bias)
        ffn = {"fc1": (sb.mlp.c_fc.weight.T, sb.mlp.c_fc.bias),
               "fc2": (sb.mlp.c_proj.weight.T, sb.mlp.c_proj.bias)}
        if not db.is_moe:
            for name, (w, b) in ffn.items():
                getattr(db.ffn, name).weight.copy_(w)
                getattr(db.ffn, name).bias.copy_(b)
            continue
        for name, (w, b) in ffn.items():
            if db.ffn.base is not None:
                getattr(db.ffn.base, name).weight.copy_(w)
                getattr(db.ffn.base, name).bias.copy_(b)
            experts = getattr(db.ffn.experts, name)
            experts.weight.copy_(w.expand_as(experts.weight))
            experts.bias.copy_(b.expand_as(experts.bias))
        db.ffn.router.weight.normal_(0.0, 0.02)
    model.config.provenance = {**model.config.provenance, "upcycled_from": str(path)}
    return model
