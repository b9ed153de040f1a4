"""`camex-train`: the trainer's command line.

    camex-train --preset demo-lm --out runs/demo-lm --export models/demo-lm
    camex-train --data book.txt --steps 300 --out runs/book --export models/book
    camex-train --task classify --data reviews.csv --d-model 64 --n-layer 2 --out runs/clf
    torchrun --nproc_per_node 2 -m camex_runtime.training.cli --preset demo-lm ...   # DDP

Start from a preset (or the TrainConfig defaults), apply every flag given, train, print the final
metrics as one JSON line on stdout (progress and one line per evaluation go to stderr). Errors in
the input (missing data, bad flags, a checkpoint that cannot be resumed) exit with status 2 and
a one-line message, never a traceback.

Every flag's default shown by `--help` is read from TrainConfig / ModelSpec, so help and
behaviour cannot drift apart; a preset replaces those defaults with its own values.
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
from .readers import TEXT_SPLITS
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
    "from_dense": "from_dense", "text_split": "text_split", "chunk_chars": "chunk_chars",
    "text_field": "text_field", "label_field": "label_field",
}
# architecture flags that --from-dense replaces by the dense model's own
_ARCH_FLAGS = ("d_model", "n_layer", "n_head", "d_ff")
_MODEL_FLAGS = {f.name for f in fields(ModelSpec)} - {"moe_layers", "dynamic"}

# What each architecture flag means; the default is appended from ModelSpec.
_MODEL_HELP = {
    "d_model": "hidden width",
    "n_layer": "number of transformer blocks",
    "n_head": "attention heads per block",
    "d_ff": "inner width of every FFN (each expert)",
    "num_experts": "routed experts per merged-expert FFN, besides the base expert; 0 = dense",
    "segment_len": "routing segment length T in tokens (segment k is served by the expert "
                   "merged from segment k-1)",
    "alpha": "merge step size: E = E_m + alpha * sum_i s_i * delta_i",
    "curvature_rank": "Kronecker rank of each curvature operator; 0 = Euclidean merging",
    "merge_method": "how domain vectors are masked before merging",
    "ties_density": "ties: share of each domain vector's largest entries kept (1 = no trim)",
    "dare_p": "dare: drop probability while training (identity at inference)",
    "routing": "default inference routing written into the checkpoint",
    "dropout": "dropout probability",
    "max_position_embeddings": "position table size",
}
_CHOICES = {"merge_method": ["domain_specific", "ties", "dare"], "routing": ["segment", "prompt"]}


def _default(name: str, obj: object = TrainConfig()) -> str:
    value = getattr(obj, name)
    if isinstance(value, bool):
        return "on" if value else "off"
    return "none" if value is None else str(value)


def _h(text: str, name: str | None = None, obj: object = TrainConfig(),
       default: str | None = None) -> str:
    """`text (default: X)` with X read from TrainConfig/ModelSpec unless given."""
    shown = default if default is not None else _default(name, obj)
    return f"{text} (default: {shown})"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="camex-train", description="Train a CAMEx model and optionally export it for serving.",
        epilog="Defaults are those without --preset; a preset sets its own (docs/training.md "
               "lists them) and any flag given here overrides it.")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help=_h("start from a named configuration", default="none; then give --data"))
    _data_flags(p.add_argument_group("data"))
    _model_flags(p.add_argument_group("model"))
    _optimisation_flags(p.add_argument_group("optimisation"))
    _output_flags(p.add_argument_group("evaluation, checkpoints, export"))
    return p


def _data_flags(g) -> None:
    g.add_argument("--task", choices=TASKS, help=_h(
        "lm (causal language model) or classify (sequence classifier)", "task"))
    g.add_argument("--data", nargs="+", metavar="PATH", help=_h(
        "training data: text files, folders of text files, .jsonl/.json/.csv/.tsv files, "
        "hf:NAME[:CONFIG][@SPLIT]", default="none; presets bring their own"))
    g.add_argument("--eval-data", nargs="+", metavar="PATH", help=_h(
        "held-out data, same shapes as --data", default="a seeded split of --data"))
    g.add_argument("--eval-fraction", type=float, help=_h(
        "share of --data held out when --eval-data is not given", "eval_fraction"))
    g.add_argument("--text-split", choices=TEXT_SPLITS, help=_h(
        "how a plain-text file becomes documents: on %% lines, blank lines (paragraph), single "
        "lines, ~--chunk-chars chunks, or the whole file; auto picks %% lines, else paragraphs, "
        "else lines (classify) or chunks (lm)", "text_split"))
    g.add_argument("--chunk-chars", type=int, help=_h(
        "characters per document with --text-split chunk", "chunk_chars"))
    g.add_argument("--text-field", help=_h(
        "JSONL/JSON key or CSV/TSV/hf column holding the text", "text_field"))
    g.add_argument("--label-field", help=_h(
        "JSONL/JSON key or CSV/TSV/hf column holding the classifier label", "label_field"))
    g.add_argument("--balance-labels", action="store_true", default=None, help=_h(
        "classify: downsample every label to the rarest one", "balance_labels"))
    g.add_argument("--max-examples-per-label", type=int, help=_h(
        "classify: keep at most this many examples per label", default="no cap"))
    g.add_argument("--block-size", type=int, help=_h(
        "LM block length in tokens; classifier: max tokens per text", "block_size"))
    t = g.add_mutually_exclusive_group()
    t.add_argument("--tokenizer", metavar="DIR", help=_h(
        "load this (fast) tokenizer directory", default="train one, see --train-tokenizer"))
    t.add_argument("--train-tokenizer", action="store_true", help=_h(
        "train a byte-level BPE on the training split and save it with the checkpoint",
        default="on unless --tokenizer or a preset's tokenizer is given"))
    g.add_argument("--vocab-size", type=int, help=_h(
        "BPE vocabulary size when training a tokenizer", "vocab_size"))


def _model_flags(m) -> None:
    spec = ModelSpec()
    for f in fields(ModelSpec):
        if f.name not in _MODEL_FLAGS:
            continue
        kind = type(f.default) if f.default is not None else int
        default = "the block size" if f.name == "max_position_embeddings" else None
        m.add_argument("--" + f.name.replace("_", "-"), type=kind, choices=_CHOICES.get(f.name),
                       help=_h(_MODEL_HELP[f.name], f.name, spec, default))
    m.add_argument("--moe-layers", help=_h(
        "blocks with merged-expert FFNs: comma-separated indices, or 'all'", default="all"))
    m.add_argument("--dynamic", action=argparse.BooleanOptionalAction, default=None, help=_h(
        "Dynamic-Merg: only the first merged-expert layer owns a base expert, later bases are "
        "derived", "dynamic", spec))
    m.add_argument("--init-from", metavar="DIR", help=_h(
        "copy every tensor whose name and shape match from this checkpoint", "init_from"))
    m.add_argument("--from-dense", metavar="DIR", help=_h(
        "upcycle a dense Hugging Face model directory (gpt2, llama, mistral, ministral, "
        "ministral3, mistral3, qwen2, qwen3, phi3, smollm3, seed_oss, glm, glm4, ernie4_5, "
        "hunyuan_v1_dense, granite, gemma2, gemma3_text, gemma3, olmo2, olmo3, exaone4; or a "
        "sparse MoE: mixtral, qwen3_moe, olmoe, gpt_oss, whose experts are imported): its "
        "architecture, weights, tokenizer and generation config; the flags above then set only "
        "the CAMEx layers. random-llama:DIR builds a small random dense Llama in DIR first",
        "from_dense"))
    m.add_argument("--no-verify-upcycle", dest="verify_upcycle", action="store_false",
                   default=None, help=_h("skip comparing the upcycled model with the dense one "
                                         "(that loads the dense model once more)",
                                         default="compare"))


def _optimisation_flags(o) -> None:
    for flag, kind, text in (
            ("steps", int, "optimizer steps; also the length of the LR schedule"),
            ("batch-size", int, "examples per process and micro-step"),
            ("grad-accum", int, "micro-steps per optimizer step"),
            ("lr", float, "peak learning rate (AdamW)"),
            ("min-lr-ratio", float, "final learning rate as a share of --lr"),
            ("warmup", int, "linear warm-up steps"),
            ("weight-decay", float, "AdamW weight decay (not on biases, norms, curvature)"),
            ("grad-clip", float, "max global gradient norm; 0 = no clipping"),
            ("seed", int, "seeds initialisation, the data split and the batch order")):
        o.add_argument("--" + flag, type=kind, help=_h(text, flag.replace("-", "_")))
    o.add_argument("--schedule", choices=SCHEDULES, help=_h(
        "learning-rate decay after warm-up", "schedule"))
    o.add_argument("--bf16", action="store_true", default=None, help=_h(
        "bf16 autocast with fp32 master weights", "bf16"))
    o.add_argument("--device", help=_h(
        "cpu, cuda, cuda:1, ...", default="cuda if available, else cpu"))
    o.add_argument("--threads", type=int, help=_h(
        "torch CPU threads per process (1 is fastest on a busy machine)",
        default="torch's default, one per core"))


def _output_flags(r) -> None:
    for flag, text, default in (
            ("eval-every", "evaluate on held-out data every N steps; 0 = only at the end", None),
            ("eval-batches", "held-out batches per evaluation", None),
            ("log-every", "write a train record to metrics.jsonl every N steps", None),
            ("save-every", "write a checkpoint every N steps; 0 = only at the end", None),
            ("stop-after", "stop (resumably) at this step without changing the schedule",
             "run all --steps")):
        name = flag.replace("-", "_")
        r.add_argument("--" + flag, type=int, help=_h(text, name, default=default))
    r.add_argument("--out", metavar="DIR", help=_h("training checkpoint directory", "out_dir"))
    r.add_argument("--resume", action="store_true", help=_h(
        "continue the checkpoint in --out", "resume"))
    r.add_argument("--overwrite", action="store_true", help=_h(
        "start over even if --out holds a checkpoint", "overwrite"))
    r.add_argument("--export", metavar="DIR", help=_h(
        "after the last step, write a folded serving checkpoint here", default="no export"))
    r.add_argument("--no-progress", action="store_true", help=_h(
        "no progress bar; one line per evaluation is still printed", default="progress bar on"))


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
    changes = {name: getattr(args, name) for name in _MODEL_FLAGS
               if getattr(args, name) is not None}
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
        raise ValueError(f"--moe-layers must be 'all' or comma-separated integers, "
                         f"got {text!r}") from None


def check_paths(cfg: TrainConfig) -> None:
    """Fail before any heavy import when a local input does not exist."""
    for source in [*cfg.data, *cfg.eval_data]:
        if not source.startswith("hf:") and not Path(source).exists():
            raise DataError(f"data path {source} does not exist")
    for name in ("tokenizer", "init_from", "from_dense"):
        path = getattr(cfg, name)
        if name == "from_dense" and path and path.startswith("random-llama:"):
            continue  # built on first use (random_dense.py)
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
