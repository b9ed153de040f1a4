"""One reader per file shape: plain text, JSONL/JSON, CSV/TSV, and `hf:` datasets.

Each reader turns one file (or dataset) into `TextExample`s; `data.load_examples` decides which
reader a source gets and what a label means. Plain text is split into documents by
`ReadOptions.text_split`:

- `percent`: lines holding only `%` separate documents (the strfile format of `fortune`);
- `paragraph`: blank lines separate documents;
- `line`: every non-empty line is a document (one example per line);
- `chunk`: consecutive lines are packed into documents of about `chunk_chars` characters;
- `file`: the whole file is one document;
- `auto`: `percent` if the file has a `%` line, else `paragraph` if it has at least two
  paragraphs, else `line` for classification (one example per line) and `chunk` for language
  modelling (so one long text still gives documents to hold out). A file in a
  one-folder-per-label layout (`whole_file=True`) is one document unless it has `%` lines.

Knows nothing about tokenizers, tensors or the training task beyond "is a label required".
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

TEXT_SPLITS = ("auto", "percent", "paragraph", "line", "chunk", "file")
STRUCTURED_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")

# What a user can give; every "this data cannot be used" error ends with it.
ACCEPTED_SHAPES = (
    "accepted: plain-text files or folders of them (split into documents on `%` lines, blank "
    "lines, single lines or ~N-character chunks: --text-split), JSONL or a JSON list of objects "
    "with a text field, CSV/TSV with a header naming a text column (--text-field, --label-field), "
    "or hf:NAME; classifiers take labels from a label field/column, from file names (one file "
    "per label) or from folder names (one folder per label)")

_PERCENT = re.compile(r"^%[ \t]*$", re.MULTILINE)
_BLANK = re.compile(r"\n(?:[ \t]*\n)+")
# Backspace overstriking (old `ul`-style underlining) and other C0 controls except \t and \n.
_CONTROL = re.compile(r".\x08|[\x00-\x08\x0b-\x1f\x7f]")
_CSV_DELIMITERS = (",", "\t", ";")


class DataError(ValueError):
    """Training data is missing or malformed; the message names the source."""


@dataclass(frozen=True)
class TextExample:
    text: str
    label: str | None = None  # classification target; None for language-modelling text
    source: str = ""          # where it came from, for error messages and provenance


@dataclass(frozen=True)
class ReadOptions:
    """How sources are read; one set per training run (TrainConfig fields of the same names)."""

    text_split: str = "auto"    # see the module docstring
    chunk_chars: int = 2000     # `chunk` documents: about this many characters (~500 tokens)
    text_field: str = "text"    # JSONL/JSON key, CSV/TSV column, hf: column holding the text
    label_field: str = "label"  # ... holding the classifier label

    def __post_init__(self) -> None:
        if self.text_split not in TEXT_SPLITS:
            raise DataError(f"text_split must be one of {', '.join(TEXT_SPLITS)}, "
                            f"got {self.text_split!r}")
        if self.chunk_chars < 1:
            raise DataError(f"chunk_chars must be >= 1, got {self.chunk_chars}")


# -- plain text -----------------------------------------------------------------------------


def clean(text: str) -> str:
    """Drop overstriking and control characters; trim surrounding blank lines and spaces."""
    return _CONTROL.sub("", text).strip("\n").rstrip()


def read_text_documents(text: str) -> list[str]:
    """Split `%`-separated text into cleaned, non-empty documents."""
    return _nonempty(_PERCENT.split(text))


def split_text(text: str, mode: str, task: str, chunk_chars: int,
               whole_file: bool = False) -> list[str]:
    """Documents of one plain-text file under split `mode` (see the module docstring)."""
    if mode == "auto":
        mode = _auto_mode(text, task, whole_file)
    if mode == "percent":
        return read_text_documents(text)
    if mode == "paragraph":
        return _nonempty(_BLANK.split(text))
    if mode == "line":
        return _nonempty(text.splitlines())
    if mode == "chunk":
        return _nonempty(_chunks(text, chunk_chars))
    return _nonempty([text])


def _auto_mode(text: str, task: str, whole_file: bool) -> str:
    if _PERCENT.search(text):
        return "percent"
    if whole_file:
        return "file"
    if len(_nonempty(_BLANK.split(text))) >= 2:
        return "paragraph"
    return "line" if task == "classify" else "chunk"


def _nonempty(docs: Iterable[str]) -> list[str]:
    return [d for d in map(clean, docs) if d.strip()]


def _chunks(text: str, size: int) -> Iterator[str]:
    """Whole lines packed into pieces of about `size` characters; a longer line is cut at the
    last space before `size` (or at `size` when it has none)."""
    piece = ""
    for line in text.splitlines(keepends=True):
        while len(line) > size:
            cut = line.rfind(" ", 1, size) + 1 or size
            head, line = line[:cut], line[cut:]
            if piece:
                yield piece
                piece = ""
            yield head
        if piece and len(piece) + len(line) > size:
            yield piece
            piece = ""
        piece += line
    if piece:
        yield piece


def read_text_file(path: Path, label: str | None, task: str, opts: ReadOptions,
                   whole_file: bool = False) -> Iterator[TextExample]:
    text = path.read_text(encoding="utf-8", errors="replace")
    for doc in split_text(text, opts.text_split, task, opts.chunk_chars, whole_file):
        yield TextExample(doc, label, str(path))


# -- structured rows ------------------------------------------------------------------------


def read_rows(path: Path, task: str, opts: ReadOptions) -> Iterator[TextExample]:
    """Examples from a .jsonl, .json (a list of objects), .csv or .tsv file."""
    rows = _csv_rows(path, opts) if path.suffix in (".csv", ".tsv") else _json_rows(path)
    for where, row in rows:
        text = row.get(opts.text_field)
        if not isinstance(text, str):
            raise DataError(f'{where}: expected a string "{opts.text_field}" field (found: '
                            f'{", ".join(map(str, row)) or "none"}); --text-field names another')
        if not text.strip():
            continue  # an empty cell is no example; skipping it loses nothing
        yield TextExample(text, _label(row, where, task, opts), where)


def _label(row: dict, where: str, task: str, opts: ReadOptions) -> str | None:
    label = row.get(opts.label_field)
    if label is None or label == "":
        if task == "classify":
            raise DataError(f'{where}: classification data needs a "{opts.label_field}" field '
                            f"(--label-field names another)")
        return None
    if isinstance(label, (dict, list)):
        raise DataError(f'{where}: "{opts.label_field}" must be one string or number, '
                        f"got {type(label).__name__}")
    return str(label)


def _json_rows(path: Path) -> Iterator[tuple[str, dict]]:
    if path.suffix == ".json":
        try:
            doc = json.loads(path.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON at line {e.lineno} column {e.colno} "
                            f"({e.msg}); one object per line belongs in a .jsonl file") from None
        if not isinstance(doc, list):
            raise DataError(f"{path}: expected a JSON list of objects, got {type(doc).__name__}")
        for i, row in enumerate(doc):
            yield f"{path}[{i}]", _object(row, f"{path}[{i}]")
        return
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                where = f"{path}:{lineno}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: invalid JSON ({e.msg})") from None
                yield where, _object(row, where)


def _object(row, where: str) -> dict:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return row


def _csv_rows(path: Path, opts: ReadOptions) -> Iterator[tuple[str, dict]]:
    """Rows of a CSV/TSV with a header row; a .csv may use `,`, `;` or tabs (whichever makes
    the header name the text column). Header names match case-insensitively."""
    csv.field_size_limit(2**31 - 1)  # documents may be long; the default limit is 128 KiB
    with open(path, encoding="utf-8-sig", newline="") as f:
        first = f.readline()
        delimiter = _delimiter(path, first, opts.text_field)
        header = next(csv.reader([first], delimiter=delimiter), [])
        names = [h.strip() for h in header]
        fold = {n.lower(): n for n in names}
        for want in (opts.text_field, opts.label_field):
            if want not in names and want.lower() in fold:
                names[names.index(fold[want.lower()])] = want
        for lineno, values in enumerate(csv.reader(f, delimiter=delimiter), 2):
            if any(v.strip() for v in values):
                yield f"{path}:{lineno}", dict(zip(names, values))


def _delimiter(path: Path, header_line: str, text_field: str) -> str:
    candidates = ("\t",) if path.suffix == ".tsv" else _CSV_DELIMITERS
    for d in candidates:
        header = next(csv.reader([header_line], delimiter=d), [])
        if text_field.lower() in (h.strip().lower() for h in header):
            return d
    shown = header_line.strip()[:120] or "(empty)"
    raise DataError(f'{path}: the first row must be a header naming a "{text_field}" column '
                    f"(e.g. text,label); found {shown!r}. --text-field names another column")


# -- Hugging Face datasets --------------------------------------------------------------------


def read_hf(spec: str, opts: ReadOptions) -> Iterator[TextExample]:
    """`NAME[:CONFIG][@SPLIT]` through the optional `datasets` package (needs a network)."""
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
    text_col, label_col = opts.text_field, opts.label_field
    if text_col not in ds.features:
        raise DataError(f"hf:{spec} has no {text_col!r} column (columns: {sorted(ds.features)})")
    feature = ds.features.get(label_col)
    names = getattr(feature, "names", None)  # ClassLabel: ids -> names
    for i, row in enumerate(ds):
        label = row.get(label_col)
        if label is not None and names is not None:
            label = names[label]
        if row[text_col].strip():
            yield TextExample(row[text_col], None if label is None else str(label),
                              f"hf:{spec}#{i}")
