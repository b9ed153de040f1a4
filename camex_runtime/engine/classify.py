"""Batched sequence classification on the runner's weights: padding-aware, one merge per
sequence and MoE layer (docs/DESIGN.md §2: the router sees the masked mean of the FFN inputs).

Right-pads the batch and runs the model's own block loop (`CamexModel.run`) with its attention
(bidirectional, or causal for classifiers upcycled from a decoder) under a padding mask; each
MoE layer is applied with merged weights (merged in chunks, never cached: a classification
merge serves exactly one sequence once) or the mixture strategy; then the model's pooling and
head. Knows nothing about labels or tokenizers; returns raw logits.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from camex_runtime.engine.moe import apply_mixture
from camex_runtime.experts import merged_ffn
from camex_runtime.layers import FullAttention

MERGE_CHUNK = 8  # sequences merged at once: bounds the transient memory of merged weights
CLASSIFY_BATCH = 64  # sequences per forward when classifying a long list
MIXTURE_CHUNK = 1024  # tokens per mixture call


@torch.inference_mode()
def classify_logits(runner, batch: Sequence[Sequence[int]]) -> Tensor:
    """Token id lists -> logits (B, num_labels) of the runner's classifier model."""
    model, tr, dev = runner.model, runner.tr, runner.device
    L = max(len(ids) for ids in batch)
    lengths = [len(seq) for seq in batch]
    # padded on the host, one copy to the device
    ids = torch.tensor([list(seq) + [0] * (L - len(seq)) for seq in batch], device=dev)
    mask = torch.arange(L, device=dev) < torch.tensor(lengths, device=dev).unsqueeze(1)  # (B, L)
    attn = FullAttention(causal=model.config.classifier_causal, key_padding_mask=mask)
    hidden = tr.run(ids, torch.arange(L, device=dev), attn, _ClassifyRouting(runner, mask, lengths))
    return model.score(model.pool(hidden, mask))  # (B, num_labels)


class _ClassifyRouting:
    """Routing context of a classification batch: one merge per sequence and MoE layer."""

    def __init__(self, runner, mask: Tensor, lengths: list[int]):
        self.runner, self.mask, self.lengths = runner, mask, lengths

    def apply(self, layer: int, h: Tensor) -> Tensor:
        return _classify_moe(self.runner, self.runner.moe_of[layer], h, self.mask, self.lengths)


def _classify_moe(runner, m: int, h: Tensor, mask: Tensor, lengths: list[int]) -> Tensor:
    moe = runner.moe[m]
    B, L, d = h.shape
    w = mask.to(h.dtype).unsqueeze(-1)  # (B, L, 1)
    mean = (h * w).sum(1) / w.sum(1).clamp_min(1.0)  # (B, d)
    scores = moe.scores(mean)  # (B, E)
    runner._record_routing(m, None, [], scores)
    strategy = runner.strategy
    if strategy == "auto":
        strategy = runner.cost.choose(lengths, B, batched_merges=True)
    if strategy == "mixture":
        # padded positions go through too: keys are masked, so they only affect themselves
        x, s = h.reshape(B * L, d), scores.repeat_interleave(L, 0)  # (B*L, d), (B*L, E)
        # chunks bound the (n, E+1, d_ff) intermediates (GPT-2-small: 100 KB per token)
        return torch.cat([apply_mixture(x[i:i + MIXTURE_CHUNK], moe, s[i:i + MIXTURE_CHUNK])
                          for i in range(0, B * L, MIXTURE_CHUNK)]).view(B, L, d)
    bank = moe.bank()
    return torch.cat([merged_ffn(h[c:c + MERGE_CHUNK], bank, scores[c:c + MERGE_CHUNK])
                      for c in range(0, B, MERGE_CHUNK)], dim=0)


def classify_texts(engine, texts, truncate: bool, raw_scores: bool,
                   function: str | None = None):
    """Engine.classify: tokenize, check lengths, batch by similar length, score, label."""
    from camex_runtime.engine.outputs import ClassificationResult
    from camex_runtime.errors import InputValidationError
    from camex_runtime.modeling import classification_scores

    if isinstance(texts, str) or not len(texts):
        raise InputValidationError("classify takes a non-empty list of texts")
    limit = engine.scheduler.config.max_input_tokens
    batch = []
    for i, t in enumerate(texts):
        ids = engine._encode(t)
        if not ids:
            raise InputValidationError(f"text {i} is empty (0 tokens)")
        if len(ids) > limit:
            if not truncate:
                raise InputValidationError(f"text {i} has {len(ids)} tokens; max_input_tokens "
                                           f"is {limit} (pass truncate=True to cut it)")
            ids = ids[:limit]
        batch.append(ids)
    cfg = engine.config
    labels = [(cfg.id2label or {}).get(j, f"LABEL_{j}") for j in range(cfg.num_labels)]
    order = sorted(range(len(batch)), key=lambda i: len(batch[i]))  # less padding per chunk
    chunk = max(engine.scheduler.config.max_batch_size, CLASSIFY_BATCH)
    results = [None] * len(batch)
    for c in range(0, len(order), chunk):
        idx = order[c:c + chunk]
        with engine._model_lock:
            logits = classify_logits(engine.runner, [batch[i] for i in idx])
        scores = logits.float() if raw_scores else classification_scores(cfg, logits, function)
        for i, row in zip(idx, scores.tolist()):
            pairs = sorted(zip(labels, row), key=lambda p: p[1], reverse=True)
            results[i] = ClassificationResult(scores=pairs, num_tokens=len(batch[i]))
    return results
