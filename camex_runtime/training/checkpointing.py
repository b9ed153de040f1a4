"""The trainer's model on disk: build or resume it, save training checkpoints, export for serving.

A training checkpoint (docs/INTERFACES.md §4) is `save_pretrained` output (config.json with
`folded: false`, model.safetensors), the tokenizer files, and the optimizer/RNG state written by
`state.py`. Export hands the trained model to `camex_runtime.export`, which folds, verifies and
writes the serving checkpoint; this module only adds the provenance.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from .config import CAMEX_KNOBS, ModelSpec, TrainConfig
from .state import TRAINER_STATE, ResumeError, TrainerState, save_training_state

WEIGHTS = "model.safetensors"


def model_class(task: str):
    from camex_runtime import CamexForCausalLM, CamexForSequenceClassification

    return {"lm": CamexForCausalLM, "classify": CamexForSequenceClassification}[task]


def build_model(cfg: TrainConfig, data, resuming: bool) -> torch.nn.Module:
    """The training-form model: from the checkpoint when resuming, else fresh (seeded)."""
    cls = model_class(cfg.task)
    if resuming:
        from camex_runtime.checkpoint import CheckpointError, load_training_form

        try:
            return load_training_form(cls, cfg.out_dir)
        except CheckpointError as e:
            raise ResumeError(f"cannot resume {cfg.out_dir}: {e}") from e
    if cfg.from_dense:
        return upcycled_model(cfg, data)
    config = cfg.model.camex_config(vocab_size=len(data.tokenizer), block_size=cfg.block_size,
                                    tokenizer=data.tokenizer, label_names=data.label_names)
    if config.max_position_embeddings < cfg.block_size:
        raise ValueError(f"block_size {cfg.block_size} exceeds max_position_embeddings "
                         f"{config.max_position_embeddings}")
    model = cls(config)
    if cfg.init_from:
        copied = init_from_checkpoint(model, cfg.init_from)
        print(f"init_from {cfg.init_from}: copied {copied} tensors", file=sys.stderr)
    return model


def upcycled_model(cfg: TrainConfig, data) -> torch.nn.Module:
    """The dense checkpoint `cfg.from_dense` upcycled with the spec's CAMEx knobs (a classifier
    head for the classify task), checked against the dense model unless told not to."""
    from dataclasses import asdict

    from camex_runtime.upcycle import (IMPORTERS, dense_reference_error, read_dense_config,
                                       upcycle_from_dense)

    from .random_dense import resolve_dense

    dense = resolve_dense(cfg.from_dense)
    spec = asdict(cfg.model)
    knobs = {k: spec[k] for k in CAMEX_KNOBS}
    source = read_dense_config(Path(dense))
    sparse = IMPORTERS[source.model_type].sparse
    if sparse:  # a sparse-MoE source brings its experts: how many, and in which layers
        del knobs["num_experts"], knobs["moe_layers"]
        print(f"upcycling {dense}: a sparse MoE ({source.model_type}); its experts per layer "
              f"become the merged-expert layers' (--num-experts / --moe-layers ignored), "
              f"merged by its own router: not the source's logits, so nothing to compare "
              f"with", file=sys.stderr)
    if spec["max_position_embeddings"]:
        knobs["max_position_embeddings"] = spec["max_position_embeddings"]
    head = "lm"
    if cfg.task == "classify":
        names = data.label_names
        head = "classifier"
        knobs.update(num_labels=len(names), id2label=dict(enumerate(names)),
                     label2id={n: i for i, n in enumerate(names)},
                     problem_type="single_label_classification")
    main = int(os.environ.get("RANK", "0")) == 0  # (one bar, not one per rank)
    model = upcycle_from_dense(dense, head=head, progress=cfg.progress and main, **knobs)
    if model.config.vocab_size < len(data.tokenizer):
        raise ValueError(f"the tokenizer has {len(data.tokenizer)} tokens but {dense} "
                         f"has a vocabulary of {model.config.vocab_size}")
    if model.config.max_position_embeddings < cfg.block_size:
        raise ValueError(f"block_size {cfg.block_size} exceeds the upcycled model's "
                         f"max_position_embeddings {model.config.max_position_embeddings}")
    if cfg.verify_upcycle and head == "lm" and not cfg.model.dynamic and not sparse:
        err = dense_reference_error(model, dense)
        print(f"upcycled {dense}: max relative logit error against the dense model "
              f"{err:.2e}", file=sys.stderr)
        if err > 1e-5:
            raise ValueError(f"the upcycled model deviates from {dense} (max relative "
                             f"logit error {err:.2e} > 1e-05); refusing to train it")
    return model


@torch.no_grad()
def init_from_checkpoint(model: torch.nn.Module, path: str | Path) -> int:
    """Copy every tensor of `path`'s weights whose name and shape match (e.g. an LM body into a
    classifier); return how many. Heads and differently sized tensors keep their fresh init."""
    weights = Path(path) / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"init_from: {weights} not found")
    own = model.state_dict()
    copied = 0
    with safe_open(str(weights), framework="pt") as f:
        for name in f.keys():
            if name in own and tuple(own[name].shape) == tuple(f.get_slice(name).get_shape()):
                own[name].copy_(f.get_tensor(name))
                copied += 1
    if copied == 0:
        raise ValueError(f"init_from: no tensor of {weights} matches this model's names and shapes")
    return copied


def check_resumable(saved: dict, cfg: TrainConfig, saved_world_size: int | None = None,
                    world_size: int = 1) -> None:
    """Refuse to resume a checkpoint made for a different model, task or batch layout.

    The batch layout includes the number of ranks: BatchOrder slices every global batch by rank,
    so resuming with another world size would read a different data stream. `saved_world_size`
    is None for checkpoints written before it was recorded (not checked)."""
    saved_model = ModelSpec(**saved.get("model", {}))
    problems = []
    if saved.get("task") != cfg.task:
        problems.append(f"task {saved.get('task')!r} != {cfg.task!r}")
    if saved_model != cfg.model:
        problems.append(f"model {saved_model} != {cfg.model}")
    for name in ("batch_size", "grad_accum", "block_size", "seed", "from_dense"):
        if saved.get(name) != getattr(cfg, name):
            problems.append(f"{name} {saved.get(name)} != {getattr(cfg, name)}")
    if saved_world_size is not None and saved_world_size != world_size:
        problems.append(f"world_size {saved_world_size} != {world_size} (resume with "
                        f"`torchrun --nproc_per_node {saved_world_size}`)")
    if problems:
        raise ResumeError(f"cannot resume {cfg.out_dir}: " + "; ".join(problems))


def save_checkpoint(model, data, optimizer, scheduler, cfg: TrainConfig,
                    state: TrainerState) -> None:
    """Model + tokenizer + optimizer/scheduler/RNG state into cfg.out_dir (trainer state last).

    The old trainer_state.json goes first: files are rewritten in place, and a crash part-way must
    leave a directory that no longer claims to be a complete checkpoint (new weights, old step)."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / TRAINER_STATE).unlink(missing_ok=True)
    model.save_pretrained(str(out))
    data.tokenizer.save_pretrained(str(out))
    save_training_state(out, state, optimizer, scheduler, cfg.to_dict())


def check_export_dir(cfg: TrainConfig) -> None:
    """Refuse an export_dir that export would refuse (the run's own out_dir, a folder holding it,
    a directory that is not a previous export) before training rather than after."""
    from camex_runtime.export import ExportError, check_out_dir

    if cfg.export_dir:
        try:
            check_out_dir(Path(cfg.export_dir), overwrite=False, source_dir=cfg.out_dir)
        except ExportError as e:  # a FileExistsError, so camex-train reports it as a usage error
            raise FileExistsError(f"export_dir: {e}") from e


def export_folded(model, data, cfg: TrainConfig, metrics: dict[str, float]) -> str:
    """Fold + verify + write the serving checkpoint to cfg.export_dir, with provenance."""
    from camex_runtime.export import export

    provenance = {
        "training_data": data.description,
        "task": cfg.task,
        "eval_metrics": metrics,
        "train_steps": cfg.steps,
        "seed": cfg.seed,
        "trainer_out_dir": str(cfg.out_dir),
    }
    model.eval()
    report = export(model, cfg.export_dir, tokenizer=data.tokenizer, provenance=provenance,
                    source_dir=cfg.out_dir)
    return str(report.out_dir)
