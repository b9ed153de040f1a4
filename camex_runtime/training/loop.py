"""The training loop: `train(TrainConfig) -> TrainResult`.

An explicit loop in the nanoGPT manner: prepare data and tokenizer, build (or resume) the model,
then per optimizer step run `grad_accum` micro-batches under optional bf16 autocast, clip, step
AdamW and the LR schedule; evaluate on held-out data every `eval_every` steps and at the end;
checkpoint every `save_every` steps and at the end; optionally export a folded serving checkpoint.

Under `torchrun` the model is wrapped in DistributedDataParallel (gloo on CPU, nccl on CUDA);
each rank reads its own slice of every global batch (batches.BatchOrder), rank 0 alone writes
files. Run it through `camex-train` (cli.py) or call `train` directly.
"""

from __future__ import annotations

import math
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from .batches import BatchOrder
from .config import TrainConfig, TrainResult
from .distributed import DistContext, init_distributed
from .evaluation import chance_accuracy, evaluate, unigram_perplexity
from .metrics import MetricsLog, plot_loss_curve
from .checkpointing import (build_model, check_export_dir, check_resumable, export_folded,
                            save_checkpoint)
from .optim import make_optimizer, make_scheduler
from .prepare import PreparedData, prepare_data
from .state import TrainerState, has_checkpoint, load_training_state


@dataclass
class StepStats:
    loss: float       # mean micro-batch loss of this rank
    grad_norm: float  # global gradient norm before clipping
    tokens: int       # tokens (LM) or attended tokens (classifier) this rank consumed


def train(cfg: TrainConfig) -> TrainResult:
    """Run (or resume) one training job as described by `cfg`; see the module docstring."""
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)  # e.g. 1 per rank when ranks share a few cores
    ctx = init_distributed(cfg.device)
    try:
        return _train(cfg, ctx)
    finally:
        ctx.close()


def _train(cfg: TrainConfig, ctx: DistContext) -> TrainResult:
    resuming = _check_out_dir(cfg)
    check_export_dir(cfg)
    if ctx.is_main:
        cfg.out_path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    data = prepare_data(cfg, ctx, resuming)
    model = build_model(cfg, data, resuming).to(ctx.device)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    log = MetricsLog(cfg.out_dir, enabled=ctx.is_main)
    state = TrainerState()
    if resuming:
        state, saved_cfg = load_training_state(cfg.out_dir, optimizer, scheduler)
        check_resumable(saved_cfg, cfg, state.world_size, ctx.world_size)
        log.truncate_after(state.step)
    else:
        log.reset()
    ddp = DistributedDataParallel(model) if ctx.enabled else model
    order = BatchOrder(len(data.train_set), cfg.batch_size, cfg.seed, ctx.world_size)
    end = min(cfg.steps, cfg.stop_after or cfg.steps)

    bar = tqdm(total=cfg.steps, initial=state.step, disable=not (cfg.progress and ctx.is_main),
               desc=f"train {cfg.task}", dynamic_ncols=True)
    started = time.perf_counter()
    metrics = dict(state.last_eval)
    while state.step < end:
        lr = scheduler.get_last_lr()[0]
        stats = train_step(ddp, data, order, state.step, optimizer, cfg, ctx)
        scheduler.step()
        state.step += 1
        state.tokens += int(ctx.all_reduce_sum([stats.tokens])[0])
        bar.update(1)
        if state.step % cfg.log_every == 0 or state.step == end:
            loss = ctx.all_reduce_sum([stats.loss])[0] / ctx.world_size
            log.write("train", state.step, loss=loss, lr=lr, grad_norm=stats.grad_norm,
                      tokens=state.tokens,
                      elapsed_s=state.elapsed_s + time.perf_counter() - started)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}")
        if cfg.eval_every and state.step % cfg.eval_every == 0 and state.step < end:
            metrics = _evaluate(model, data, cfg, ctx, log, state.step)
        if cfg.save_every and state.step % cfg.save_every == 0 and state.step < end:
            _save(model, data, optimizer, scheduler, cfg, ctx, state, started, metrics)
    bar.close()
    seconds = time.perf_counter() - started

    metrics = _evaluate(model, data, cfg, ctx, log, state.step)
    metrics.update(_baselines(data, cfg))
    _save(model, data, optimizer, scheduler, cfg, ctx, state, started, metrics)
    if ctx.is_main:
        plot_loss_curve(cfg.out_dir, title=f"{cfg.task}: {data.description}"[:90])
    export_dir = None
    if cfg.export_dir and state.step >= cfg.steps and ctx.is_main:
        export_dir = export_folded(model, data, cfg, metrics)
    ctx.barrier()
    model.eval()
    return TrainResult(model=model, tokenizer=data.tokenizer, metrics=metrics, seconds=seconds,
                       out_dir=cfg.out_dir, steps=state.step, export_dir=export_dir)


def train_step(ddp: torch.nn.Module, data: PreparedData, order: BatchOrder, step: int,
               optimizer: torch.optim.Optimizer, cfg: TrainConfig, ctx: DistContext) -> StepStats:
    """One optimizer step: grad_accum micro-batches (gradients synced on the last), clip, update."""
    ddp.train()
    loss_sum, tokens = 0.0, 0
    for micro in range(cfg.grad_accum):
        batch = data.train_set.batch(order.indices(step * cfg.grad_accum + micro, ctx.rank))
        batch = {k: v.to(ctx.device, non_blocking=True) for k, v in batch.items()}
        last = micro == cfg.grad_accum - 1
        sync = nullcontext() if last or not ctx.enabled else ddp.no_sync()
        with sync:
            with _autocast(cfg, ctx):
                loss = ddp(**batch).loss
            (loss / cfg.grad_accum).backward()
        loss_sum += loss.item()
        mask = batch.get("attention_mask")
        tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
    params = [p for p in ddp.parameters() if p.grad is not None]
    if cfg.grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    else:
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
    if not math.isfinite(norm.item()):
        raise FloatingPointError(f"gradient norm is {norm.item()} at step {step + 1}; "
                                 f"lower --lr or enable --grad-clip")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepStats(loss_sum / cfg.grad_accum, norm.item(), tokens)


def _autocast(cfg: TrainConfig, ctx: DistContext):
    if not cfg.bf16:
        return nullcontext()
    return torch.autocast(device_type=ctx.device.type, dtype=torch.bfloat16)


def _evaluate(model, data: PreparedData, cfg: TrainConfig, ctx: DistContext, log: MetricsLog,
              step: int) -> dict[str, float]:
    metrics = evaluate(model, data.eval_set, cfg.eval_batch_size or cfg.batch_size, ctx,
                       cfg.eval_batches, bf16=cfg.bf16)
    log.write("eval", step, **metrics)
    if ctx.is_main:  # one line per evaluation on stderr, bar or not (stdout is the CLI's JSON)
        line = f"step {step}/{cfg.steps}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        (tqdm.write if cfg.progress else print)(line, file=sys.stderr)
    return metrics


def _baselines(data: PreparedData, cfg: TrainConfig) -> dict[str, float]:
    """What a trivial model scores on the same held-out data, for judging the real numbers."""
    if cfg.task == "lm":
        return {"unigram_perplexity": unigram_perplexity(data.unigram_counts, data.eval_set)}
    return {"chance_accuracy": chance_accuracy(data.eval_set)}


def _save(model, data, optimizer, scheduler, cfg, ctx, state: TrainerState, started: float,
          metrics: dict[str, float]) -> None:
    if ctx.is_main:
        saved = TrainerState(state.step, state.tokens,
                             state.elapsed_s + time.perf_counter() - started, dict(metrics),
                             world_size=ctx.world_size)
        save_checkpoint(model, data, optimizer, scheduler, cfg, saved)
    ctx.barrier()


def _check_out_dir(cfg: TrainConfig) -> bool:
    """True when resuming; refuses to silently overwrite a finished or running job's checkpoint."""
    exists = has_checkpoint(cfg.out_dir)
    if exists and not cfg.resume and not cfg.overwrite:
        raise FileExistsError(f"{cfg.out_dir} already holds a training checkpoint; "
                              f"pass --resume to continue it or --overwrite to start over")
    return exists and cfg.resume
