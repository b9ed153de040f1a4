"""Held-out evaluation: perplexity for language models, accuracy for classifiers.

Sums are token- (LM) or example- (classifier) weighted and reduced over data-parallel ranks, so
the numbers do not depend on batch size or world size. Also the trivial baselines a result must
beat: a unigram model's perplexity and chance accuracy.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from .batches import ClassificationSet, LMBlocks, eval_batches
from .distributed import DistContext


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: LMBlocks | ClassificationSet, batch_size: int,
             ctx: DistContext, max_batches: int | None = None,
             bf16: bool = False) -> dict[str, float]:
    was_training = model.training
    model.eval()
    loss_sum = count = correct = 0.0
    autocast = (torch.autocast(ctx.device.type, dtype=torch.bfloat16) if bf16 else nullcontext())
    for idx in eval_batches(len(dataset), batch_size, ctx.rank, ctx.world_size, max_batches):
        batch = {k: v.to(ctx.device) for k, v in dataset.batch(idx).items()}
        with autocast:
            out = model(**batch)
        if isinstance(dataset, LMBlocks):
            n = batch["input_ids"].numel() - batch["input_ids"].shape[0]  # shifted targets
        else:
            n = batch["labels"].shape[0]
            correct += (out.logits.argmax(-1) == batch["labels"]).sum().item()
        loss_sum += out.loss.float().item() * n
        count += n
    loss_sum, count, correct = ctx.all_reduce_sum([loss_sum, count, correct])
    model.train(was_training)
    if count == 0:
        raise ValueError("the held-out set is empty")
    loss = loss_sum / count
    if isinstance(dataset, LMBlocks):
        return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0))}
    return {"eval_loss": loss, "accuracy": correct / count}


def unigram_perplexity(train_counts: list[int], eval_set: LMBlocks) -> float:
    """Perplexity of add-one-smoothed training token frequencies on the held-out targets."""
    counts = torch.tensor(train_counts, dtype=torch.float64) + 1.0  # (V,)
    logp = (counts / counts.sum()).log()
    targets = eval_set.blocks[:, 1:].flatten()  # what the LM is scored on
    return math.exp(-logp[targets].mean().item())


def chance_accuracy(dataset: ClassificationSet) -> float:
    """Accuracy of always answering the most frequent held-out label."""
    labels = torch.tensor(dataset.labels)
    return labels.bincount().max().item() / len(labels)
