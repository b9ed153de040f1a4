"""Resumable training state without pickle.

A training checkpoint directory (docs/INTERFACES.md §4) holds the model (`save_pretrained`,
safetensors) plus what this module writes:
- `optimizer.safetensors`: every optimizer state tensor, flattened to `state.{param}.{key}`, and
  the RNG states as uint8 tensors (`rng.torch`, `rng.cuda.{i}`).
- `trainer_state.json`: step, scalars that are not tensors (optimizer param groups, scheduler
  state, Python RNG state), and the training config it belongs to. Written last, so its presence
  marks a complete checkpoint.

Knows nothing about models or data; `loop.py` decides when to save and what to restore.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

TRAINER_STATE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
FORMAT_VERSION = 1


class ResumeError(RuntimeError):
    """A checkpoint cannot be resumed from (missing, incomplete or for another setup)."""


@dataclass
class TrainerState:
    step: int = 0                  # optimizer steps completed
    tokens: int = 0                # training tokens (or examples) seen, all ranks
    elapsed_s: float = 0.0         # training wall time before this process started
    last_eval: dict[str, float] = field(default_factory=dict)  # last eval metrics
    world_size: int | None = None  # ranks that trained it (the batch order depends on it);
                                   # None in checkpoints written before it was recorded


def has_checkpoint(out_dir: str | Path) -> bool:
    return (Path(out_dir) / TRAINER_STATE).is_file()


def save_training_state(out_dir: str | Path, state: TrainerState, optimizer: torch.optim.Optimizer,
                        scheduler: Any, config: dict) -> None:
    """Write optimizer tensors + RNG, then trainer_state.json (atomically, last)."""
    out = Path(out_dir)
    opt = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in opt["state"].items():
        for key, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"state.{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    save_file(tensors, str(out / OPTIMIZER_FILE))
    doc = {
        "format_version": FORMAT_VERSION,
        "trainer": state.__dict__,
        "optimizer": {"param_groups": opt["param_groups"], "scalars": scalars},
        "scheduler": scheduler.state_dict(),
        "python_rng": _encode_py_rng(random.getstate()),
        "config": config,
    }
    tmp = out / (TRAINER_STATE + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=_json_default))
    os.replace(tmp, out / TRAINER_STATE)


def load_training_state(out_dir: str | Path, optimizer: torch.optim.Optimizer,
                        scheduler: Any) -> tuple[TrainerState, dict]:
    """Restore optimizer, scheduler and RNG in place; return the trainer state and saved config."""
    out = Path(out_dir)
    if not has_checkpoint(out) or not (out / OPTIMIZER_FILE).is_file():
        raise ResumeError(f"{out} holds no complete training checkpoint "
                          f"({TRAINER_STATE} + {OPTIMIZER_FILE})")
    doc = json.loads((out / TRAINER_STATE).read_text())
    if doc.get("format_version") != FORMAT_VERSION:
        raise ResumeError(f"{out}/{TRAINER_STATE}: format_version {doc.get('format_version')} "
                          f"is not {FORMAT_VERSION}")
    tensors = load_file(str(out / OPTIMIZER_FILE))
    optimizer.load_state_dict(_rebuild_optimizer_state(doc["optimizer"], tensors))
    scheduler.load_state_dict(doc["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    cuda_states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    random.setstate(_decode_py_rng(doc["python_rng"]))
    known = {f.name for f in fields(TrainerState)}
    return TrainerState(**{k: v for k, v in doc["trainer"].items() if k in known}), doc["config"]


def _rebuild_optimizer_state(saved: dict, tensors: dict[str, torch.Tensor]) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("state."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    for pid, extra in saved["scalars"].items():
        state.setdefault(int(pid), {}).update(extra)
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g
              for g in saved["param_groups"]]
    return {"state": state, "param_groups": groups}


def _encode_py_rng(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _decode_py_rng(doc: list) -> tuple:
    version, internal, gauss = doc
    return (version, tuple(internal), gauss)


def _json_default(value: Any) -> Any:
    if torch.is_tensor(value) and value.numel() == 1:
        return value.item()
    if isinstance(value, (tuple, set)):
        return list(value)
    raise TypeError(f"cannot store {type(value).__name__} in {TRAINER_STATE}")
