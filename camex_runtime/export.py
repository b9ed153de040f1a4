"""Export: fold a training-form CAMEx model into a verified serving checkpoint (paper eq. 4).

The folded directory also receives the tokenizer (chat template included) and, for language
models, the generation config (EOS ids) of the model it was made from.

``E'_i = E_m + mask_i ⊙ M_i(τ_i)`` is computed once per weight (eval mode: dare is the
identity), Dynamic-Merg bases are materialised for every layer, and the folded model's logits
are checked against the training form (fp32, eval) before anything is written: above
``max_rel_error`` (1e-5) export refuses. This is the only place that turns one form into the
other.

CLI::

    camex-export runs/demo-lm/checkpoint out/demo-lm-folded
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .checkpoint import (WEIGHTS_NAME, CheckpointError, kind_of, load_training_form, model_class,
                         save_folded)
from .config import CamexConfig
from .modeling import CamexForCausalLM, CamexPreTrainedModel

MAX_REL_ERROR = 1e-5


class ExportError(RuntimeError):
    """Export refused (the fold does not reproduce the training form, or the target directory
    may not be replaced, or the source is unreadable); nothing was written."""


@dataclass
class ExportReport:
    out_dir: Path
    max_rel_error: float      # max over checked inputs of max|Δlogits| / max|logits|
    checks: list[str]         # which routing plans / inputs were compared
    seconds: float


@torch.no_grad()
def fold(model: CamexPreTrainedModel) -> tuple[CamexConfig, dict[str, Tensor]]:
    """Training form (eval) -> (folded config, folded state dict)."""
    if model.config.folded:
        raise ExportError("model is already folded")
    cfg = copy.deepcopy(model.config)
    cfg.folded, cfg.format_version = True, cfg.format_needed()
    cfg.architectures = [type(model).__name__]
    state = {k: v for k, v in model.state_dict().items() if ".ffn.curvature." not in k}
    for layer, bank in model.transformer.expert_banks().items():
        p = f"transformer.h.{layer}.ffn."
        for name, lb in bank.linears.items():
            state[f"{p}base.{name}.weight"] = lb.base_weight.clone()
            # E'_i = E_m + mask_i ⊙ M_i(τ_i)
            state[f"{p}experts.{name}.weight"] = lb.base_weight + lb.delta_weight
            if lb.base_bias is not None:
                state[f"{p}base.{name}.bias"] = lb.base_bias.clone()
                state[f"{p}experts.{name}.bias"] = lb.base_bias + lb.delta_bias
    return cfg, state


def default_samples(config: CamexConfig, kind: str, seed: int = 0) -> Tensor:
    """Token ids spanning several segments (or a padded batch for classifiers)."""
    g = torch.Generator().manual_seed(seed)
    L = min(config.max_position_embeddings, 3 * config.segment_len + 1, 512)
    return torch.randint(0, config.vocab_size, (2, L), generator=g)


def rel_error(ref: Tensor, got: Tensor) -> float:
    return float((ref - got).abs().max() / ref.abs().max().clamp_min(1e-12))


@torch.no_grad()
def verify(train: CamexPreTrainedModel, folded: CamexPreTrainedModel,
           ids: Tensor) -> tuple[float, list[str]]:
    """Max relative logit error of folded vs training form over the routing plans that matter."""
    T = train.config.segment_len
    if isinstance(train, CamexForCausalLM):
        plans = [("segment", {}), ("segment route1_len=1", {"route1_len": 1}),
                 ("prompt prompt_len=L/2",
                  {"routing": "prompt", "prompt_len": max(1, ids.shape[1] // 2)})]
        if T > 2:
            plans.append((f"segment route1_len={T // 2}", {"route1_len": T // 2}))
        errs = [rel_error(train(ids, **kw).logits, folded(ids, **kw).logits) for _, kw in plans]
        return max(errs), [name for name, _ in plans]
    mask = torch.ones_like(ids)
    mask[1, ids.shape[1] // 2:] = 0  # a padded row: routing must ignore padding identically
    err = rel_error(train(ids, attention_mask=mask).logits, folded(ids, attention_mask=mask).logits)
    return err, ["sequence (padded batch)"]


def check_out_dir(out: Path, overwrite: bool, source_dir: str | Path | None) -> None:
    """Refuse to replace anything but a previous export, unless told to; never the source itself.

    The training checkpoint being exported (or a folder holding it, e.g. `--export .`) is refused
    even with `overwrite`: replacing it would delete the very run being exported."""
    if source_dir:
        src, dst = Path(source_dir).resolve(), out.resolve()
        if src == dst or dst in src.parents:
            raise ExportError(f"refusing to export into {out}: it is (or contains) the training "
                              f"checkpoint {source_dir} being exported; choose another directory")
    if not out.exists() or overwrite:
        return
    if out.is_dir() and not any(out.iterdir()):
        return
    if not is_folded_checkpoint(out):
        raise ExportError(f"{out} exists and is not a folded CAMEx checkpoint; export replaces its "
                          f"whole contents, so choose another directory or pass overwrite=True "
                          f"(camex-export --overwrite)")


def is_folded_checkpoint(path: Path) -> bool:
    """A previous export: config.json says model_type camex, folded: true."""
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and raw.get("model_type") == "camex" and raw.get("folded") is True


def export(model: CamexPreTrainedModel, out_dir: str | Path, tokenizer: Any = None,
           sample_input_ids: Tensor | None = None, provenance: dict | None = None,
           max_rel_error: float = MAX_REL_ERROR, overwrite: bool = False,
           source_dir: str | Path | None = None) -> ExportReport:
    """Fold, verify and write a folded checkpoint; raise ExportError (writing nothing) on mismatch.

    An existing non-empty `out_dir` is replaced only when it is a previous export or `overwrite`;
    `source_dir` (default: the directory the model was loaded from, if any) is never replaced."""
    t0 = time.perf_counter()
    loaded_from = getattr(model, "name_or_path", "")  # from_pretrained's path (or a hub id)
    if source_dir is None and loaded_from and Path(loaded_from).is_dir():
        source_dir = loaded_from
    check_out_dir(Path(out_dir), overwrite, source_dir)
    train = copy.deepcopy(model).to(device="cpu", dtype=torch.float32).eval()
    kind = kind_of(train.config) if getattr(train.config, "architectures", None) else (
        "causal-lm" if isinstance(train, CamexForCausalLM) else "classifier")
    cfg, state = fold(train)
    folded = model_class(kind)(cfg).eval()
    folded.load_state_dict(state, strict=True)
    ids = default_samples(cfg, kind) if sample_input_ids is None else sample_input_ids.cpu()
    err, checks = verify(train, folded, ids)
    print(f"export: folded vs training-form logits, max relative error {err:.3e} "
          f"(limit {max_rel_error:.0e}; checked: {', '.join(checks)})", file=sys.stderr)
    if not err <= max_rel_error:
        raise ExportError(f"folded model deviates from the training form: max relative logit error "
                          f"{err:.3e} > {max_rel_error:.0e}; refusing to write {out_dir}")
    cfg.provenance = {**cfg.provenance, **(provenance or {}),
                      "merge_method": cfg.merge_method, "curvature_rank": cfg.curvature_rank,
                      "dynamic": cfg.dynamic, "export_max_rel_error": err,
                      "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out = Path(out_dir).resolve()  # "." has no name to put a temp dir beside
    out.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and swap in at the end: a failed export never leaves half a
    # checkpoint.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_folded(folded.state_dict(), cfg, tmp)
        if tokenizer is not None:  # with its chat template, when it has one
            tokenizer.save_pretrained(tmp)
        generation = getattr(model, "generation_config", None)
        if kind == "causal-lm" and generation is not None:  # EOS id lists etc. travel
            generation.save_pretrained(tmp)
        (tmp / "export_report.json").write_text(
            json.dumps({"max_rel_error": err, "checks": checks}, indent=2))
        if out.is_dir():
            shutil.rmtree(out)
        elif out.exists():  # a stray file, replaced only with overwrite (check_out_dir)
            out.unlink()
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return ExportReport(out_dir=Path(out_dir), max_rel_error=err, checks=checks,
                        seconds=time.perf_counter() - t0)


def load_training_checkpoint(path: str | Path) -> tuple[CamexPreTrainedModel, Any]:
    """A training-form model (and its tokenizer, if the directory has one) from a directory."""
    from .checkpoint import read_config

    path = Path(path)
    cfg = read_config(path)
    if cfg.folded:
        raise ExportError(f"{path} is already a folded checkpoint")
    if not (path / WEIGHTS_NAME).is_file():
        raise ExportError(f"{path}: missing {WEIGHTS_NAME}")
    try:
        model = load_training_form(model_class(kind_of(cfg)), path)
    except CheckpointError as e:
        raise ExportError(str(e)) from e
    tokenizer = None
    if (path / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="camex-export", description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint",
                    help="training checkpoint directory (config.json with folded: false)")
    ap.add_argument("out_dir", help="where to write the folded checkpoint")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace OUT_DIR even if it is not a previous export "
                         "(never CHECKPOINT itself)")
    ap.add_argument("--max-rel-error", type=float, default=MAX_REL_ERROR)
    args = ap.parse_args(argv)
    out = Path(args.out_dir)
    try:
        check_out_dir(out, args.overwrite, args.checkpoint)
    except ExportError as e:  # before the slow load + fold
        print(f"camex-export: {e}", file=sys.stderr)
        return 2
    try:
        model, tok = load_training_checkpoint(args.checkpoint)
        report = export(model, out, tokenizer=tok, max_rel_error=args.max_rel_error,
                        overwrite=args.overwrite, source_dir=args.checkpoint)
    except (ExportError, ValueError, OSError) as e:
        print(f"camex-export: {e}", file=sys.stderr)
        return 1
    print(f"wrote {report.out_dir} (max relative error {report.max_rel_error:.3e}, "
          f"{report.seconds:.1f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
