"""Training text: where it comes from and how it is split.

Sources (`load_examples`), each a string:
- a plain-text file: documents separated by lines holding only `%` (the strfile convention of
  `fortune`; a file without such lines is one document). For classification its label is the
  file name without extension (`.../fortunes/food` -> "food").
- a directory: every text file under it, recursively, in sorted order (hidden entries, binary
  files, strfile `.dat` indexes and symlinks to files already seen are skipped).
- a `.jsonl` file: one `{"text": ..., "label": ...}` object per line (`label` required for
  classification, ignored for language modelling).
- `hf:NAME[:CONFIG][@SPLIT]`: a Hugging Face `datasets` dataset (needs the optional `datasets`
  package and a network; the import is lazy). Uses its `text` and, if present, `label` columns.

This module knows nothing about tokenizers or tensors; `batches.py` turns examples into batches.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

_SEPARATOR = re.compile(r"^%[ \t]*$", re.MULTILINE)
# Backspace overstriking (old `ul`-style underlining) and other C0 controls except \t and \n.
_CONTROL = re.compile(r".\x08|[\x00-\x08\x0b-\x1f\x7f]")
_SKIP_SUFFIXES = (".dat", ".pyc", ".gz", ".zip", ".png", ".jpg", ".safetensors", ".bin")


class DataError(ValueError):
    """Training data is missing or malformed; the message names the source."""


@dataclass(frozen=True)
class TextExample:
    text: str
    label: str | None = None  # classification target; None for language-modelling text
    source: str = ""          # where it came from, for error messages and provenance


def load_examples(sources: Sequence[str], task: str = "lm") -> list[TextExample]:
    """All examples from `sources`, in order. `task` is "lm" or "classify"."""
    if task not in ("lm", "classify"):
        raise DataError(f"unknown task {task!r}; expected 'lm' or 'classify'")
    if not sources:
        raise DataError("no training data given")
    examples: list[TextExample] = []
    for source in sources:
        found = list(_load_source(str(source), task))
        if not found:
            raise DataError(f"data source {source} holds no text")
        examples.extend(found)
    if task == "classify":
        unlabeled = [e.source for e in examples if e.label is None]
        if unlabeled:
            raise DataError(f"classification needs a label for every example; none in {unlabeled[0]}")
        if len({e.label for e in examples}) < 2:
            raise DataError("classification needs at least two distinct labels")
    return examples


def _load_source(source: str, task: str) -> Iterable[TextExample]:
    if source.startswith("hf:"):
        return _load_hf(source[3:], task)
    path = Path(source)
    if not path.exists():
        raise DataError(f"data path {source} does not exist")
    if path.is_dir():
        return _load_dir(path)
    if path.suffix == ".jsonl":
        return _load_jsonl(path, task)
    return _load_text_file(path)


def _load_dir(root: Path) -> Iterable[TextExample]:
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            real = os.path.realpath(path)
            if name.startswith(".") or name.endswith(_SKIP_SUFFIXES) or real in seen:
                continue
            seen.add(real)
            if path.suffix == ".jsonl":
                raise DataError(f"{path}: pass JSONL files explicitly, not inside a directory")
            if not _is_binary(path):
                yield from _load_text_file(path)


def _is_binary(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\x00" in f.read(8192)


def read_text_documents(text: str) -> list[str]:
    """Split `%`-separated text into cleaned, non-empty documents."""
    docs = (_CONTROL.sub("", d).strip("\n") for d in _SEPARATOR.split(text))
    return [d.rstrip() for d in docs if d.strip()]


def _load_text_file(path: Path) -> Iterable[TextExample]:
    text = path.read_text(encoding="utf-8", errors="replace")
    label = path.stem if path.suffix else path.name
    for doc in read_text_documents(text):
        yield TextExample(doc, label, str(path))


def _load_jsonl(path: Path, task: str) -> Iterable[TextExample]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise DataError(f'{where}: expected an object with a string "text" field')
            label = row.get("label")
            if task == "classify" and label is None:
                raise DataError(f'{where}: classification data needs a "label" field')
            yield TextExample(row["text"], None if label is None else str(label), where)


def _load_hf(spec: str, task: str) -> Iterable[TextExample]:
    try:
        import datasets  # optional dependency: pip install camex-serve[datasets]
    except ImportError:
        raise DataError(f"hf:{spec} needs the `datasets` package "
                        f"(pip install 'camex-serve[datasets]')") from None
    name, _, split = spec.partition("@")
    name, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as e:  # no network, unknown name or split: datasets raises many types
        raise DataError(f"cannot load hf:{spec}: {type(e).__name__}: {e}") from None
    if "text" not in ds.features:
        raise DataError(f"hf:{spec} has no 'text' column (columns: {sorted(ds.features)})")
    names = ds.features["label"].names if "label" in ds.features and hasattr(
        ds.features["label"], "names") else None
    for i, row in enumerate(ds):
        label = row.get("label")
        if label is not None and names is not None:
            label = names[label]
        if row["text"].strip():
            yield TextExample(row["text"], None if label is None else str(label), f"hf:{spec}#{i}")


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
            raise DataError(f"too few examples ({len(group)}) for a held-out split"
                            + (f" of label {key!r}" if key is not None else ""))
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
