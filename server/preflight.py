"""Checks of --model/--classifier that run before anything heavy is imported or any port is
bound, so a wrong path or a swapped flag fails at once with one line (the CLI exits 2).

Reads only directory entries and config.json; everything deeper (tensors, dtypes, shapes) is
the loader's `CheckpointError`, reported once the model loads.
"""

from __future__ import annotations

import json
from pathlib import Path

from server.settings import ServerSettings

FLAG_OF = {"causal-lm": "--model", "classifier": "--classifier"}


def preflight(settings: ServerSettings) -> None:
    """Cheap checks of --model/--classifier before the port is bound (ValueError, one line):
    the directory exists and holds a config.json, and the checkpoint is of the kind its flag
    serves. Everything deeper (tensors, dtypes) is the loader's CheckpointError."""
    for flag, path, kind in (("--model", settings.model, "causal-lm"),
                             ("--classifier", settings.classifier, "classifier")):
        if path is None:
            continue
        where = Path(path)
        if not where.exists():
            raise ValueError(f"{flag} {path}: no such directory")
        if not where.is_dir():
            raise ValueError(f"{flag} {path}: not a directory (give the checkpoint directory "
                             "that holds config.json)")
        config = where / "config.json"
        if not config.is_file():
            raise ValueError(f"{flag} {path}: no config.json (is this a checkpoint directory?)")
        try:
            archs = json.loads(config.read_text()).get("architectures") or []
        except (OSError, ValueError, AttributeError) as exc:
            raise ValueError(f"{flag} {path}: unreadable config.json ({exc})") from None
        found = kind_of_architecture(archs[0]) if archs else None
        if found is not None and found != kind:
            raise ValueError(f"{flag} {path} is a {found} checkpoint ({archs[0]}): pass it "
                             f"with {FLAG_OF[found]}")


def kind_of_architecture(name: str) -> str | None:
    """`...ForCausalLM` -> causal-lm, `...ForSequenceClassification` -> classifier."""
    if name.endswith("ForCausalLM"):
        return "causal-lm"
    if name.endswith("ForSequenceClassification"):
        return "classifier"
    return None
