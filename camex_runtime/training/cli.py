"""`camex-train`: the trainer's command line.

    camex-train --preset demo-lm --out runs/demo-lm --export models/demo-lm
    camex-train --task classify --data data/train.jsonl --train-tokenizer --vocab-size 2048 \\
        --d-model 64 --n-layer 2 --num-experts 3 --steps 200 --out runs/clf
    torchrun --nproc_per_node 2 -m camex_runtime.training.cli --preset demo-lm ...   # DDP

Start from a preset (or the TrainConfig defaults), apply every flag given, train, print the final
metrics as one JSON line on stdout. Errors in the input (missing data, bad flags, a checkpoint
that cannot be resumed) exit with status 2 and a one-line message, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields, replace
from pathlib import Path

from .config import SCHEDULES, TASKS, ModelSpec, TrainConfig
from .data import DataError
from .presets import PRESETS, preset
from .state import ResumeError
from .tokenizer import TokenizerError

# flag -> TrainConfig field, for flags that map one to one (type from argparse below).
_TRAIN_FLAGS = {
    "task": "task", "eval_fraction": "eval_fraction", "vocab_size": "vocab_size",
    "block_size": "block_size", "init_from": "init_from", "steps": "steps",
    "batch_size": "batch_size", "grad_accum": "grad_accum", "lr": "lr", "threads": "threads",
    "min_lr_ratio": "min_lr_ratio", "warmup": "warmup", "schedule": "schedule",
    "weight_decay": "weight_decay", "grad_clip": "grad_clip", "seed": "seed", "device": "device",
    "eval_every": "eval_every", "eval_batches": "eval_batches", "log_every": "log_every",
    "out": "out_dir", "save_every": "save_every", "stop_after": "stop_after",
    "export": "export_dir", "max_examples_per_label": "max_examples_per_label",
    "from_dense": "from_dense",
}
# architecture flags that --from-dense replaces by the dense model's own
_ARCH_FLAGS = ("d_model", "n_layer", "n_head", "d_ff")
_MODEL_FLAGS = {f.name for f in fields(ModelSpec)} - {"moe_layers", "dynamic"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="camex-train", description="Train a CAMEx model.")
    p.add_argument("--preset", choices=sorted(PRESETS), help="start from a named configuration")
    g = p.add_argument_group("data")
    g.add_argument("--task", choices=TASKS)
    g.add_argument("--data", nargs="+", metavar="PATH", help="text files/dirs, .jsonl, hf:NAME")
    g.add_argument("--eval-data", nargs="+", metavar="PATH", help="held-out set (default: a split)")
    g.add_argument("--eval-fraction", type=float)
    g.add_argument("--balance-labels", action="store_true", default=None)
    g.add_argument("--max-examples-per-label", type=int)
    g.add_argument("--block-size", type=int, help="LM block / classifier max tokens")
    t = g.add_mutually_exclusive_group()
    t.add_argument("--tokenizer", metavar="DIR", help="load this tokenizer directory")
    t.add_argument("--train-tokenizer", action="store_true", help="train a byte-level BPE")
    g.add_argument("--vocab-size", type=int, help="BPE vocabulary size when training one")
    m = p.add_argument_group("model")
    for f in fields(ModelSpec):
        if f.name in _MODEL_FLAGS:
            kind = type(f.default) if f.default is not None else int
            choices = {"merge_method": ["domain_specific", "ties", "dare"],
                       "routing": ["segment", "prompt"]}.get(f.name)
            m.add_argument("--" + f.name.replace("_", "-"), type=kind, choices=choices)
    m.add_argument("--moe-layers", help="comma-separated block indices, or 'all'")
    m.add_argument("--dynamic", action=argparse.BooleanOptionalAction, default=None)
    m.add_argument("--init-from", metavar="DIR", help="seed matching weights from a checkpoint")
    m.add_argument("--from-dense", metavar="DIR",
                   help="upcycle a dense Hugging Face model directory (gpt2, llama, mistral, "
                        "qwen2, phi3): its architecture, weights and tokenizer; the flags above "
                        "set only the CAMEx layers")
    m.add_argument("--no-verify-upcycle", dest="verify_upcycle", action="store_false",
                   default=None, help="skip comparing the upcycled model with the dense one "
                                      "(it loads the dense model once more)")
    o = p.add_argument_group("optimisation")
    for name, kind in (("steps", int), ("batch-size", int), ("grad-accum", int), ("lr", float),
                       ("min-lr-ratio", float), ("warmup", int), ("weight-decay", float),
                       ("grad-clip", float), ("seed", int)):
        o.add_argument("--" + name, type=kind)
    o.add_argument("--schedule", choices=SCHEDULES)
    o.add_argument("--bf16", action="store_true", default=None, help="bf16 autocast")
    o.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    o.add_argument("--threads", type=int, help="torch CPU threads per process")
    r = p.add_argument_group("evaluation, checkpoints, export")
    for name in ("eval-every", "eval-batches", "log-every", "save-every", "stop-after"):
        r.add_argument("--" + name, type=int)
    r.add_argument("--out", metavar="DIR", help="training checkpoint directory")
    r.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")
    r.add_argument("--overwrite", action="store_true", help="start over even if --out has one")
    r.add_argument("--export", metavar="DIR", help="write a folded serving checkpoint here")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The preset (or defaults) with every given flag applied; ValueError on contradictions."""
    if args.preset is None and not args.data:
        raise ValueError("give --preset NAME or --data PATH... (with --task)")
    cfg = preset(args.preset) if args.preset else TrainConfig()
    changes = {fld: getattr(args, flag) for flag, fld in _TRAIN_FLAGS.items()
               if getattr(args, flag) is not None}
    if args.data:
        changes["data"] = list(args.data)
        changes["data_description"] = None  # the preset's description no longer applies
    if args.eval_data:
        changes["eval_data"] = list(args.eval_data)
    if args.balance_labels:
        changes["balance_labels"] = True
    if args.tokenizer:
        changes["tokenizer"] = args.tokenizer
    elif args.train_tokenizer:
        changes["tokenizer"] = None
    if args.bf16:
        changes["bf16"] = True
    if args.verify_upcycle is not None:
        changes["verify_upcycle"] = args.verify_upcycle
    if args.from_dense:
        given = [f"--{f.replace('_', '-')}" for f in _ARCH_FLAGS if getattr(args, f) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} cannot be combined with --from-dense: the "
                             f"architecture comes from the dense model")
    changes.update(resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    return replace(cfg, model=_model_spec(cfg.model, args), **changes)


def _model_spec(spec: ModelSpec, args: argparse.Namespace) -> ModelSpec:
    changes = {name: getattr(args, name) for name in _MODEL_FLAGS if getattr(args, name) is not None}
    if args.dynamic is not None:
        changes["dynamic"] = args.dynamic
    if args.moe_layers is not None:
        changes["moe_layers"] = _parse_layers(args.moe_layers)
    return replace(spec, **changes)


def _parse_layers(text: str) -> list[int] | None:
    if text.strip().lower() == "all":
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--moe-layers must be 'all' or comma-separated integers, got {text!r}") from None


def check_paths(cfg: TrainConfig) -> None:
    """Fail before any heavy import when a local input does not exist."""
    for source in [*cfg.data, *cfg.eval_data]:
        if not source.startswith("hf:") and not Path(source).exists():
            raise DataError(f"data path {source} does not exist")
    for name in ("tokenizer", "init_from", "from_dense"):
        path = getattr(cfg, name)
        if path and not Path(path).is_dir():
            raise ValueError(f"--{name.replace('_', '-')} {path}: not a directory")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
        cfg.validate()
        check_paths(cfg)
        from .loop import train  # torch and the model code only once the input looks right

        result = train(cfg)
    except (DataError, TokenizerError, ResumeError, FileExistsError, FileNotFoundError,
            ValueError) as e:
        parser.exit(2, f"camex-train: error: {e}\n")
    summary = {"out_dir": result.out_dir, "export_dir": result.export_dir, "steps": result.steps,
               "seconds": round(result.seconds, 2), "metrics": result.metrics}
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
