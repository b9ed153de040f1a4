"""Training text: where it comes from, what its labels are, and how it is split.

Sources (`load_examples`), each a string:
- a plain-text file: split into documents (`ReadOptions.text_split`, see `readers`: `%` lines,
  blank-line paragraphs, single lines or fixed-size chunks). For classification its label is
  the file name without extension (`.../fortunes/food` -> "food"): one file per label.
- a directory: every text file under it, recursively, in sorted order (hidden entries, binary
  files, strfile `.dat` indexes and symlinks to files already seen are skipped). A file directly
  inside it is read as above; a file inside a subdirectory is labelled with that first-level
  folder's name (`train/pos/1.txt` -> "pos", the one-folder-per-label layout) and is one
  document unless it has `%` lines or `text_split` says otherwise.
- `.jsonl`, `.json` (a list of objects), `.csv` or `.tsv` (header row): one example per row,
  text and label from the `text_field` / `label_field` columns (label required for
  classification, ignored for language modelling).
- `hf:NAME[:CONFIG][@SPLIT]`: a Hugging Face `datasets` dataset (needs the optional `datasets`
  package and a network; the import is lazy), same text and label columns.

This module knows nothing about tokenizers or tensors; `batches.py` turns examples into batches.
"""

from __future__ import annotations

import os
import random
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from .readers import (ACCEPTED_SHAPES, STRUCTURED_SUFFIXES, DataError, ReadOptions, TextExample,
                      read_hf, read_rows, read_text_documents, read_text_file)

__all__ = ["ACCEPTED_SHAPES", "DataError", "ReadOptions", "TextExample", "balance_labels",
           "describe_sources", "load_examples", "read_text_documents", "split_examples"]

_SKIP_SUFFIXES = (".dat", ".pyc", ".gz", ".zip", ".png", ".jpg", ".safetensors", ".bin")


def load_examples(sources: Sequence[str], task: str = "lm",
                  opts: ReadOptions | None = None) -> list[TextExample]:
    """All examples from `sources`, in order. `task` is "lm" or "classify"."""
    if task not in ("lm", "classify"):
        raise DataError(f"unknown task {task!r}; expected 'lm' or 'classify'")
    if not sources:
        raise DataError(f"no training data given; {ACCEPTED_SHAPES}")
    opts = opts or ReadOptions()
    examples: list[TextExample] = []
    for source in sources:
        found = list(_load_source(str(source), task, opts))
        if not found:
            raise DataError(f"data source {source} holds no text; {ACCEPTED_SHAPES}")
        examples.extend(found)
    if task == "classify":
        unlabeled = [e.source for e in examples if e.label is None]
        if unlabeled:
            raise DataError(f"classification needs a label for every example; none in "
                            f"{unlabeled[0]}; {ACCEPTED_SHAPES}")
        labels = {e.label for e in examples}
        if len(labels) < 2:
            raise DataError(f"classification needs at least two distinct labels, found "
                            f"{sorted(map(str, labels))} in {', '.join(map(str, sources))}; "
                            f"{ACCEPTED_SHAPES}")
    return examples


def _load_source(source: str, task: str, opts: ReadOptions) -> Iterable[TextExample]:
    if source.startswith("hf:"):
        return read_hf(source[3:], opts)
    path = Path(source)
    if not path.exists():
        raise DataError(f"data path {source} does not exist")
    if path.is_dir():
        return _load_dir(path, task, opts)
    if path.suffix in STRUCTURED_SUFFIXES:
        return read_rows(path, task, opts)
    return read_text_file(path, _file_label(path), task, opts)


def _file_label(path: Path) -> str:
    return path.stem if path.suffix else path.name


def _load_dir(root: Path, task: str, opts: ReadOptions) -> Iterator[TextExample]:
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            real = os.path.realpath(path)
            if name.startswith(".") or name.endswith(_SKIP_SUFFIXES) or real in seen:
                continue
            seen.add(real)
            if path.suffix in STRUCTURED_SUFFIXES:
                # A folder often holds train and test files side by side: mixing them silently
                # would train on the test set.
                raise DataError(f"{path}: pass {path.suffix} files to --data explicitly, not "
                                f"inside a directory")
            if _is_binary(path):
                continue
            parts = path.relative_to(root).parts
            if len(parts) == 1:  # one file per label (fortune layout): split by content
                yield from read_text_file(path, _file_label(path), task, opts)
            else:                # one folder per label: each file is one example
                yield from read_text_file(path, parts[0], task, opts, whole_file=True)


def _is_binary(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\x00" in f.read(8192)


def balance_labels(examples: Sequence[TextExample], seed: int,
                   max_per_label: int | None = None) -> list[TextExample]:
    """Downsample every label to the size of the smallest (or `max_per_label`), seeded."""
    by_label = _group(examples)
    n = min(len(v) for v in by_label.values())
    if max_per_label is not None:
        n = min(n, max_per_label)
    rng = random.Random(seed)
    out: list[TextExample] = []
    for label in sorted(by_label):
        out.extend(rng.sample(by_label[label], n))
    return out


def split_examples(examples: Sequence[TextExample], eval_fraction: float, seed: int,
                   stratify: bool = False) -> tuple[list[TextExample], list[TextExample]]:
    """Seeded (train, held-out) split; `stratify` keeps label proportions in both parts."""
    if not 0.0 < eval_fraction < 1.0:
        raise DataError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    groups = _group(examples) if stratify else {None: list(examples)}
    rng = random.Random(seed)
    train, held = [], []
    for key in sorted(groups, key=str):
        group = list(groups[key])
        rng.shuffle(group)
        n_eval = max(1, round(len(group) * eval_fraction))
        if n_eval >= len(group):
            of_label = f" of label {key!r}" if key is not None else ""
            raise DataError(
                f"too few examples ({len(group)}){of_label} for a held-out split: give more "
                f"text, a held-out set (--eval-data), or split the text into more documents "
                f"(--text-split line/chunk); {ACCEPTED_SHAPES}")
        held.extend(group[:n_eval])
        train.extend(group[n_eval:])
    rng.shuffle(train)
    return train, held


def _group(examples: Iterable[TextExample]) -> dict[str | None, list[TextExample]]:
    groups: dict[str | None, list[TextExample]] = defaultdict(list)
    for e in examples:
        groups[e.label].append(e)
    return groups


def describe_sources(sources: Sequence[str], examples: Sequence[TextExample]) -> str:
    """One line for checkpoint provenance: what was trained on."""
    return f"{len(examples)} examples from {', '.join(map(str, sources))}"
