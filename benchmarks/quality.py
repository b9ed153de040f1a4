"""Paper-style quality comparison of the merging variants (dense, Euclidean, curvature-aware,
dynamic).

Trains every variant at an identical budget (same steps, batch, LR schedule, data, tokenizer and
model width) on two tasks built from the Debian `fortunes` corpus, for several seeds each:

- `lm`: causal language modelling on every non-offensive fortune file; held-out perplexity.
- `classify`: fortune topic classification (`fortunes.CLASSIFIER_CATEGORIES`, balanced);
  held-out accuracy.

The held-out split and the tokenizer are made once per task (split seed 0) and shared by every
run, so a seed only changes the initialisation and the batch order; runs with the same seed are
therefore paired, and each curvature-aware variant (-CA) is compared with its Euclidean twin
seed by seed (mean paired difference, its std, a paired t statistic and an exact sign-flip test).
Writes `quality.json` and `quality.md` into `--out-dir`.

Uses only the trainer's public API (`camex_runtime.training.train`); knows nothing of serving.

    python benchmarks/quality.py                         # the full run (results: README "Quality")
    python benchmarks/quality.py --smoke --out-dir /tmp/q   # one seed, tiny budget (CI)
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Run as a script from a checkout (`python benchmarks/quality.py`) without installing the package:
# the repository root is where camex_runtime lives. Harmless when it is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import transformers  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from camex_runtime.training import ModelSpec, TrainConfig, train  # noqa: E402
from camex_runtime.training.data import balance_labels, load_examples, split_examples  # noqa: E402
from camex_runtime.training.fortunes import CLASSIFIER_CATEGORIES, fortune_files  # noqa: E402
from camex_runtime.training.tokenizer import train_bpe_tokenizer  # noqa: E402

# Every variant is a set of ModelSpec overrides on the shared architecture (a registry: adding a
# variant is one line). Euclidean variants have curvature_rank=0; "-CA" ones rank 1.
VARIANTS: dict[str, dict] = {
    "dense": dict(num_experts=0, curvature_rank=0),
    "domain_specific": dict(merge_method="domain_specific", curvature_rank=0),
    "ties": dict(merge_method="ties", curvature_rank=0),
    "dare": dict(merge_method="dare", curvature_rank=0),
    "domain_specific-CA": dict(merge_method="domain_specific", curvature_rank=1),
    "ties-CA": dict(merge_method="ties", curvature_rank=1),
    "dare-CA": dict(merge_method="dare", curvature_rank=1),
    "dynamic": dict(merge_method="domain_specific", curvature_rank=1, dynamic=True),
}
PAIRS = [(f"{m}-CA", m) for m in ("domain_specific", "ties", "dare")]  # (CA, Euclidean twin)
TASK_METRIC = {"lm": ("perplexity", False), "classify": ("accuracy", True)}  # name, higher better


@dataclass
class Budget:
    """What every training of one benchmark run shares (the 'identical budget')."""

    steps: int
    batch_size: int
    lr: float
    warmup: int
    block_size: int           # LM block length; classifier max tokens per text
    vocab_size: int           # BPE trained once per task on its training split
    model: ModelSpec          # width/depth/experts; variants override merge knobs only
    lm_categories: tuple[str, ...] | None = None  # None = every fortune file
    classify_lr: float | None = None              # None = lr


FULL = Budget(steps=300, batch_size=16, lr=3e-3, warmup=30, block_size=64, vocab_size=2048,
              model=ModelSpec(d_model=64, n_layer=2, n_head=4, d_ff=256, num_experts=4,
                              segment_len=16, curvature_rank=1), classify_lr=1e-3)
SMOKE = Budget(steps=6, batch_size=8, lr=3e-3, warmup=1, block_size=32, vocab_size=400,
               model=ModelSpec(d_model=32, n_layer=2, n_head=4, d_ff=64, num_experts=3,
                               segment_len=8, curvature_rank=1),
               lm_categories=("food", "law"))


@dataclass
class TaskData:
    """One task's frozen inputs: train/held-out JSONL files and the shared tokenizer."""

    task: str
    train_file: str
    eval_file: str
    tokenizer_dir: str
    description: str
    num_train: int
    num_eval: int


@dataclass
class RunRecord:
    """One training: a variant, a seed, what it scored and what it cost."""

    task: str
    variant: str
    seed: int
    metric: float                 # perplexity (lm) or accuracy (classify)
    eval_loss: float
    params: int                   # training-form parameters (includes curvature factors)
    curvature_params: int         # of which Kronecker curvature operators
    train_seconds: float          # the trainer's own wall time (excludes data preparation)
    wall_seconds: float           # everything for this run, data loading included
    baseline: dict = field(default_factory=dict)  # unigram perplexity / chance accuracy


# ---------------------------------------------------------------------------------------------
# Data: made once per task, shared by every run.


def prepare_task(task: str, budget: Budget, root: Path) -> TaskData:
    """Split the task's examples (seed 0), write JSONL, train its tokenizer on the train part."""
    if task == "lm":
        files = fortune_files(categories=budget.lm_categories)
        examples = load_examples([str(p) for p in files], "lm")
        train_ex, eval_ex = split_examples(examples, 0.05, seed=0)
        desc = f"Debian fortunes, {len(files)} topic files, causal LM"
    else:
        files = fortune_files(categories=CLASSIFIER_CATEGORIES)
        examples = balance_labels(load_examples([str(p) for p in files], "classify"), seed=0)
        train_ex, eval_ex = split_examples(examples, 0.2, seed=0, stratify=True)
        desc = f"Debian fortunes topics ({', '.join(CLASSIFIER_CATEGORIES)}), balanced"
    out = root / task
    tok_dir = out / "tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.jsonl", train_ex), ("eval.jsonl", eval_ex)):
        with open(out / name, "w", encoding="utf-8") as f:
            for e in rows:
                f.write(json.dumps({"text": e.text, "label": e.label}) + "\n")
    tok = train_bpe_tokenizer((e.text for e in train_ex), budget.vocab_size,
                              model_max_length=budget.block_size)
    tok.save_pretrained(str(tok_dir))
    return TaskData(task, str(out / "train.jsonl"), str(out / "eval.jsonl"), str(tok_dir), desc,
                    len(train_ex), len(eval_ex))


# ---------------------------------------------------------------------------------------------
# Training one (task, variant, seed).


def train_config(data: TaskData, variant: str, seed: int, budget: Budget,
                 out_dir: Path) -> TrainConfig:
    lr = budget.classify_lr if data.task == "classify" and budget.classify_lr else budget.lr
    return TrainConfig(
        task=data.task, data=[data.train_file], eval_data=[data.eval_file],
        data_description=data.description, tokenizer=data.tokenizer_dir,
        block_size=budget.block_size, model=replace(budget.model, **VARIANTS[variant]),
        steps=budget.steps, batch_size=budget.batch_size, lr=lr, warmup=budget.warmup,
        schedule="cosine", seed=seed, device="cpu", eval_batches=None, eval_batch_size=64,
        log_every=max(1, budget.steps // 10), out_dir=str(out_dir), overwrite=True,
        progress=False)


def run_one(data: TaskData, variant: str, seed: int, budget: Budget, work: Path) -> RunRecord:
    started = time.perf_counter()
    out_dir = work / f"{data.task}-{variant}-{seed}"
    result = train(train_config(data, variant, seed, budget, out_dir))
    metric_name, _ = TASK_METRIC[data.task]
    params = sum(p.numel() for p in result.model.parameters())
    curvature = sum(p.numel() for n, p in result.model.named_parameters() if ".curvature." in n)
    baseline = {k: v for k, v in result.metrics.items()
                if k in ("unigram_perplexity", "chance_accuracy")}
    shutil.rmtree(out_dir, ignore_errors=True)  # checkpoints are not the product here
    return RunRecord(data.task, variant, seed, float(result.metrics[metric_name]),
                     float(result.metrics["eval_loss"]), params, curvature, result.seconds,
                     time.perf_counter() - started, baseline)


# ---------------------------------------------------------------------------------------------
# Statistics: plain Python, no scipy.


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample std (ddof=1; 0 for a single value)."""
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def t_two_sided_p(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with df degrees of freedom (Simpson on the density)."""
    if not math.isfinite(t):
        return 0.0
    a = abs(t)
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    n = 2000  # even; the density is smooth, so this is accurate to ~1e-10 for the df used here
    h = a / n
    dens = [c * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2) for i in range(n + 1)]
    area = h / 3 * (dens[0] + dens[-1] + 4 * sum(dens[1:-1:2]) + 2 * sum(dens[2:-1:2]))
    return max(0.0, 1.0 - 2.0 * area)


def sign_flip_p(diffs: list[float]) -> float:
    """Exact two-sided paired permutation test: flip the sign of each difference (2^n ways)."""
    observed = abs(sum(diffs))
    flips = list(itertools.product((1, -1), repeat=len(diffs)))
    hits = sum(abs(sum(s * d for s, d in zip(signs, diffs))) >= observed - 1e-12 for signs in flips)
    return hits / len(flips)


def paired(ca: dict[int, float], euclid: dict[int, float], higher_better: bool) -> dict:
    """CA minus Euclidean over the seeds both have."""
    seeds = sorted(set(ca) & set(euclid))
    diffs = [ca[s] - euclid[s] for s in seeds]
    m, sd = mean_std(diffs) if diffs else (float("nan"), float("nan"))
    n = len(diffs)
    t = (m / (sd / math.sqrt(n)) if n > 1 and sd > 0
         else (math.inf * m if n > 1 and m else float("nan")))
    better = sum((d > 0) if higher_better else (d < 0) for d in diffs)
    return {"seeds": seeds, "diffs": diffs, "n": n, "mean_diff": m, "std_diff": sd, "t": t,
            "p_t": t_two_sided_p(t, n - 1) if n > 1 else float("nan"),
            "p_sign_flip": sign_flip_p(diffs) if n else float("nan"),
            "min_possible_p_sign_flip": 2 / 2 ** n if n else float("nan"),
            "ca_better_count": better}


def summarize(records: list[RunRecord], task: str) -> dict:
    metric, higher_better = TASK_METRIC[task]
    rows = [r for r in records if r.task == task]
    variants = {}
    for name in dict.fromkeys(r.variant for r in rows):
        mine = [r for r in rows if r.variant == name]
        m, sd = mean_std([r.metric for r in mine])
        variants[name] = {
            "spec": VARIANTS[name], "params": mine[0].params,
            "curvature_params": mine[0].curvature_params, "mean": m, "std": sd,
            "eval_loss_mean": statistics.fmean(r.eval_loss for r in mine),
            "train_seconds_mean": statistics.fmean(r.train_seconds for r in mine),
            "runs": [{"seed": r.seed, metric: r.metric, "eval_loss": r.eval_loss,
                      "train_seconds": r.train_seconds, "wall_seconds": r.wall_seconds}
                     for r in mine]}
    by_seed = {v: {r["seed"]: r[metric] for r in d["runs"]} for v, d in variants.items()}
    pairs = [{"ca": ca, "euclidean": eu, **paired(by_seed[ca], by_seed[eu], higher_better)}
             for ca, eu in PAIRS if ca in variants and eu in variants]
    return {"metric": metric, "higher_is_better": higher_better,
            "baseline": rows[0].baseline if rows else {}, "variants": variants, "paired": pairs}


# ---------------------------------------------------------------------------------------------
# Report: markdown tables from the summary.


def _fmt(x: float, metric: str) -> str:
    return f"{100 * x:.1f}%" if metric == "accuracy" else f"{x:.2f}"


def _fmt_pm(x: float, sd: float, metric: str) -> str:
    return f"{_fmt(x, metric)} ± {_fmt(sd, metric)}"


def task_markdown(task: str, s: dict) -> list[str]:
    metric, higher = s["metric"], s["higher_is_better"]
    arrow = "higher is better" if higher else "lower is better"
    base = ", ".join(f"{k} {_fmt(v, metric)}" for k, v in s["baseline"].items())
    lines = [f"### {task}: held-out {metric} ({arrow}; trivial baseline: {base})", "",
             f"| variant | params (curvature) | {metric} mean ± std | per seed | train s/run |",
             "|---|---:|---:|---|---:|"]
    for name, v in s["variants"].items():
        per_seed = ", ".join(_fmt(r[metric], metric) for r in v["runs"])
        lines.append(f"| {name} | {v['params']:,} ({v['curvature_params']:,}) | "
                     f"{_fmt_pm(v['mean'], v['std'], metric)} | {per_seed} | "
                     f"{v['train_seconds_mean']:.1f} |")
    lines += ["", f"Paired by seed, CA minus Euclidean twin ({metric}; "
                  f"{'positive' if higher else 'negative'} favours CA):", "",
              "| CA vs Euclidean | n | mean diff ± std | paired t (p) | sign-flip p (min possible) "
              "| CA better in |", "|---|---:|---:|---:|---:|---:|"]
    for p in s["paired"]:
        lines.append(f"| {p['ca']} vs {p['euclidean']} | {p['n']} | "
                     f"{_fmt_pm(p['mean_diff'], p['std_diff'], metric)} | "
                     f"{p['t']:.2f} ({p['p_t']:.2f}) | {p['p_sign_flip']:.2f} "
                     f"({p['min_possible_p_sign_flip']:.2f}) | {p['ca_better_count']}/{p['n']} |")
    return lines + [""]


def render_markdown(report: dict) -> str:
    meta = report["meta"]
    lines = ["## Quality: merging variants at an identical budget", "",
             f"Command: `{meta['command']}`  ", f"Wall time: {meta['wall_seconds'] / 60:.1f} min "
             f"({meta['num_runs']} trainings, {meta['torch_threads']} torch threads, "
             f"{meta['machine']}, 1-min load average {meta['loadavg_1m_start_end']} "
             f"at start/end; {meta['cpu_seconds'] / 60:.1f} CPU-min)  ",
             f"Budget per run: {meta['budget']['steps']} steps × "
             f"batch {meta['budget']['batch_size']}, "
             f"model d={meta['budget']['model']['d_model']}, {meta['budget']['model']['n_layer']} "
             f"layers, {meta['budget']['model']['num_experts']} routed experts + base, "
             f"T={meta['budget']['model']['segment_len']}; seeds {meta['seeds']}", ""]
    for task, s in report["tasks"].items():
        lines += task_markdown(task, s)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seeds", type=int, default=3, help="seeds per variant (0..N-1)")
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps per run (default: budget's)")
    p.add_argument("--tasks", default="lm,classify", help="comma list of lm, classify")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma list of variants")
    p.add_argument("--smoke", action="store_true", help="one seed, tiny model and budget (CI)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads; 1 is several times faster than 2 on a shared "
                        "2-core machine (oversubscribed threads spin) and keeps timings comparable")
    p.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    args.tasks = _choices(args.tasks, TASK_METRIC, "--tasks")
    args.variants = _choices(args.variants, VARIANTS, "--variants")
    if args.seeds < 1 or args.threads < 1 or (args.steps is not None and args.steps < 1):
        p.error("--seeds, --threads and --steps must be >= 1")
    return args


def _choices(text: str, known, flag: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise SystemExit(f"{flag}: unknown {bad or 'empty list'}; known: {', '.join(known)}")
    return names


def run_benchmark(args: argparse.Namespace) -> dict:
    budget = SMOKE if args.smoke else FULL
    if args.steps is not None:
        budget = replace(budget, steps=args.steps, warmup=min(budget.warmup, args.steps // 10))
    seeds = list(range(1 if args.smoke else args.seeds))
    started, load_before = time.perf_counter(), os.getloadavg()
    records: list[RunRecord] = []
    with tempfile.TemporaryDirectory(prefix="camex-quality-") as tmp:
        work = Path(tmp)
        datasets = {t: prepare_task(t, budget, work / "data") for t in args.tasks}
        jobs = [(t, s, v) for t in args.tasks for s in seeds for v in args.variants]
        bar = tqdm(jobs, desc="quality", unit="run", dynamic_ncols=True)
        for task, seed, variant in bar:
            bar.set_postfix_str(f"{task} {variant} seed={seed}")
            rec = run_one(datasets[task], variant, seed, budget, work / "runs")
            records.append(rec)
            tqdm.write(f"[quality] {task:8s} {variant:18s} seed={seed} "
                       f"{TASK_METRIC[task][0]}={rec.metric:.4f} params={rec.params:,} "
                       f"train={rec.train_seconds:.1f}s", file=sys.stderr)
    meta = {"command": " ".join(["python", "benchmarks/quality.py", *sys.argv[1:]]),
            "smoke": args.smoke, "seeds": seeds, "tasks": args.tasks, "variants": args.variants,
            "budget": asdict(budget),
            "data": {t: {"description": d.description, "train_examples": d.num_train,
                         "eval_examples": d.num_eval} for t, d in datasets.items()},
            "num_runs": len(records), "wall_seconds": time.perf_counter() - started,
            # CPU time of this process: roughly the wall time on an otherwise idle machine.
            "cpu_seconds": time.process_time(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            # Shared machine: the 1-minute load average says how contended the timings were.
            "loadavg_1m_start_end": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return {"meta": meta, "tasks": {t: summarize(records, t) for t in args.tasks},
            "runs": [asdict(r) for r in records]}


def _finite_or_null(obj):
    """NaN/inf (e.g. a t statistic from one seed) become null: strict JSON has no NaN."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_null(v) for v in obj]
    return obj


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()  # one bar per checkpoint save is noise here
    report = run_benchmark(args)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(_finite_or_null(report), indent=2) + "\n")
    (out / "quality.md").write_text(render_markdown(report))
    print(render_markdown(report))
    print(f"wrote {out / 'quality.json'} and {out / 'quality.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
