"""The Debian `fortunes` corpus as demo training data.

`apt-get install -y fortunes` puts plain-text "cookie" files in /usr/share/games/fortunes/: one
file per topic, fortunes separated by lines holding only `%`, each file accompanied by a binary
`.dat` index (strfile) and a `.u8` symlink to itself. Offensive fortunes live in an `off/`
subdirectory (package fortunes-off); we never use them.

This module only knows where the files are and which ones are usable; parsing the `%` format is
`data.read_text_documents`, shared with any other plain-text input.
"""

from __future__ import annotations

import os
from pathlib import Path

FORTUNE_DIR = Path(os.environ.get("CAMEX_FORTUNE_DIR", "/usr/share/games/fortunes"))

# Topic files with distinct vocabularies and >= 548 fortunes each (zippy is the smallest): the
# demo classifier's labels. Balanced to the smallest category at training time.
CLASSIFIER_CATEGORIES = ("computers", "definitions", "politics", "science", "songs-poems", "zippy")

_SKIP_SUFFIXES = (".dat", ".u8")


class FortunesMissingError(FileNotFoundError):
    """The fortunes package is not installed (or CAMEX_FORTUNE_DIR points nowhere)."""


def fortune_files(root: Path | str | None = None,
                  categories: tuple[str, ...] | None = None) -> list[Path]:
    """Sorted topic files under `root` (default FORTUNE_DIR), optionally only `categories`.

    Skips the strfile indexes (`.dat`), the `.u8` symlinks, hidden files and the `off/` directory
    (only top-level files are considered at all).
    """
    root = Path(root) if root is not None else FORTUNE_DIR
    if not root.is_dir():
        raise FortunesMissingError(
            f"fortune directory {root} not found; install it with `apt-get install -y fortunes` "
            f"or point CAMEX_FORTUNE_DIR at a directory of fortune files")
    files = sorted(p for p in root.iterdir()
                   if p.is_file() and not p.is_symlink() and not p.name.startswith(".")
                   and not p.name.endswith(_SKIP_SUFFIXES))
    if categories is not None:
        by_name = {p.name: p for p in files}
        missing = [c for c in categories if c not in by_name]
        if missing:
            raise FortunesMissingError(f"fortune categories {missing} not found in {root}")
        files = [by_name[c] for c in categories]
    if not files:
        raise FortunesMissingError(f"no fortune files in {root}")
    return files
