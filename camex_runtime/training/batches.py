"""Tokenized datasets and the deterministic batch order.

- LM: documents are tokenized, concatenated with eos after each, and cut into blocks of
  `block_size` tokens (the ragged tail is dropped). Labels are the inputs; the model shifts.
- Classification: each text is tokenized (truncated to `max_length`), batches are right-padded
  with the pad id and carry an attention mask.

Batch order is a pure function of (seed, micro-step, rank): an epoch-wise seeded permutation,
read as one long stream that every rank slices at its own offset. Resuming therefore needs only
the step counter, and data-parallel ranks never see the same example in one step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .data import DataError, TextExample


@dataclass
class LMBlocks:
    blocks: torch.Tensor  # (N, block_size) int64 token ids

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        ids = self.blocks[list(indices)]  # (B, block_size)
        return {"input_ids": ids, "labels": ids}


@dataclass
class ClassificationSet:
    input_ids: list[list[int]]  # ragged token ids, already truncated
    labels: list[int]           # index into label_names
    label_names: list[str]      # id -> label string, becomes config.id2label
    pad_id: int

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        rows = [self.input_ids[i] for i in indices]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)  # (B, W)
        mask = torch.zeros((len(rows), width), dtype=torch.long)            # (B, W)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, :len(r)] = 1
        labels = torch.tensor([self.labels[i] for i in indices], dtype=torch.long)  # (B,)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def build_lm_blocks(examples: Sequence[TextExample], tokenizer, block_size: int,
                    what: str = "data") -> LMBlocks:
    """Concatenate tokenized documents (eos after each) and cut into full blocks; `what` names
    the set in the error when it is too short for one block."""
    eos = tokenizer.eos_token_id
    # The Rust backend directly: documents are longer than model_max_length on purpose (they are
    # cut into blocks below), and transformers would warn about every one of them.
    encoded = [enc.ids for enc in tokenizer.backend_tokenizer.encode_batch(
        [e.text for e in examples], add_special_tokens=False)]
    stream: list[int] = []
    for ids in encoded:
        stream.extend(ids)
        stream.append(eos)
    n = len(stream) // block_size
    if n == 0:
        raise DataError(f"{what}: {len(stream)} tokens are not enough for one block of "
                        f"{block_size}; give more text, a larger --eval-fraction or a smaller "
                        f"--block-size")
    blocks = torch.tensor(stream[: n * block_size], dtype=torch.long).view(n, block_size)
    return LMBlocks(blocks)


def build_classification_set(examples: Sequence[TextExample], tokenizer, max_length: int,
                             label_names: Sequence[str]) -> ClassificationSet:
    """Tokenize and map labels to ids; labels outside `label_names` are an error."""
    index = {name: i for i, name in enumerate(label_names)}
    unknown = sorted({e.label for e in examples if e.label not in index}, key=str)
    if unknown:
        raise DataError(f"labels {unknown} do not occur in the training data")
    encoded = tokenizer([e.text for e in examples], add_special_tokens=False,
                        truncation=True, max_length=max_length)["input_ids"]
    # An empty text would give a row with no attended token; keep one eos so pooling is defined.
    encoded = [ids if ids else [tokenizer.eos_token_id] for ids in encoded]
    return ClassificationSet(encoded, [index[e.label] for e in examples], list(label_names),
                             tokenizer.pad_token_id)


class BatchOrder:
    """Which example indices micro-batch `micro_step` of `rank` uses: seeded, stateless."""

    def __init__(self, num_examples: int, batch_size: int, seed: int, world_size: int = 1):
        if num_examples < 1:
            raise DataError("no training examples")
        self.n, self.batch_size = num_examples, batch_size
        self.seed, self.world_size = seed, world_size
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            if len(self._perms) > 4:  # only the current epoch or two are ever needed again
                self._perms.clear()
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms[epoch] = torch.randperm(self.n, generator=g).tolist()
        return self._perms[epoch]

    def indices(self, micro_step: int, rank: int = 0) -> list[int]:
        start = (micro_step * self.world_size + rank) * self.batch_size
        return [self._perm(p // self.n)[p % self.n] for p in range(start, start + self.batch_size)]


def eval_batches(n: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 max_batches: int | None = None) -> list[list[int]]:
    """Fixed, in-order held-out batches; this rank's share (round-robin over batches)."""
    batches = [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    if max_batches is not None:
        batches = batches[:max_batches]
    return batches[rank::world_size]
