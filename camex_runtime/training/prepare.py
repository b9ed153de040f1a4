"""From a TrainConfig to tokenized train/held-out sets and the tokenizer that made them.

Every rank runs this and gets identical results (seeded splits, deterministic tokenization);
only a freshly trained tokenizer is made once, by rank 0, and read back by the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .batches import (ClassificationSet, LMBlocks, build_classification_set, build_lm_blocks)
from .config import TrainConfig
from .data import (ReadOptions, TextExample, balance_labels, describe_sources, load_examples,
                   split_examples)
from .distributed import DistContext
from .tokenizer import load_tokenizer, train_bpe_tokenizer


@dataclass
class PreparedData:
    tokenizer: object                         # PreTrainedTokenizerFast
    train_set: LMBlocks | ClassificationSet
    eval_set: LMBlocks | ClassificationSet
    label_names: list[str] | None             # classifier labels (id order); None for LM
    description: str                          # provenance: what the model was trained on
    unigram_counts: list[int] | None = None   # LM: token counts of the training blocks (baseline)


def prepare_data(cfg: TrainConfig, ctx: DistContext, resuming: bool) -> PreparedData:
    train_ex, eval_ex = _examples(cfg)
    tokenizer = _tokenizer(cfg, ctx, train_ex, resuming)
    description = cfg.data_description or describe_sources(cfg.data, train_ex + eval_ex)
    if cfg.task == "lm":
        train_set = build_lm_blocks(train_ex, tokenizer, cfg.block_size, "training set")
        eval_set = build_lm_blocks(eval_ex, tokenizer, cfg.block_size, "held-out set")
        counts = train_set.blocks.flatten().bincount(minlength=len(tokenizer)).tolist()
        return PreparedData(tokenizer, train_set, eval_set, None, description, counts)
    labels = sorted({e.label for e in train_ex})
    train_set = build_classification_set(train_ex, tokenizer, cfg.block_size, labels)
    eval_set = build_classification_set(eval_ex, tokenizer, cfg.block_size, labels)
    return PreparedData(tokenizer, train_set, eval_set, labels,
                        f"{description}; labels: {', '.join(labels)}")


def _examples(cfg: TrainConfig) -> tuple[list[TextExample], list[TextExample]]:
    opts = ReadOptions(cfg.text_split, cfg.chunk_chars, cfg.text_field, cfg.label_field)
    examples = load_examples(cfg.data, cfg.task, opts)
    classify = cfg.task == "classify"
    if classify and (cfg.balance_labels or cfg.max_examples_per_label):
        examples = balance_labels(examples, cfg.seed, cfg.max_examples_per_label)
    if cfg.eval_data:
        return examples, load_examples(cfg.eval_data, cfg.task, opts)
    return split_examples(examples, cfg.eval_fraction, cfg.seed, stratify=classify)


def _tokenizer(cfg: TrainConfig, ctx: DistContext, train_ex: list[TextExample], resuming: bool):
    out = Path(cfg.out_dir)
    if resuming:
        return load_tokenizer(out)  # the checkpoint's own tokenizer, whatever made it
    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer)
    if cfg.from_dense:  # the dense model's own tokenizer (and chat template) travel with it
        from .random_dense import resolve_dense

        return load_tokenizer(resolve_dense(cfg.from_dense))
    if ctx.is_main:
        tok = train_bpe_tokenizer((e.text for e in train_ex), cfg.vocab_size,
                                  model_max_length=cfg.block_size)
        out.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(str(out))
    ctx.barrier()  # the other ranks read what rank 0 trained (single node: shared out_dir)
    return load_tokenizer(out)
