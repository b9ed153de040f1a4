"""`python -m camex_runtime.kernels`: build (or find) the native kernels now and say which
kernels serve linear layers on this machine. Image builds run it, with `CAMEX_KERNELS_DIR` set,
so that a container loads a prebuilt library and never compiles at start-up.

`--tune` then measures the AVX-512 kernel's settings on this CPU (see `tuning`): a table per
kind of weights, and the `CAMEX_KERNELS_TUNING` value that serves this CPU best (about a minute
per thread count for GPT-2-small's shapes); then the merges' prefetch distance per kind of
weights, printed as a `CAMEX_MERGE_PREFETCH` value; then the prompt tiles' vector width,
printed as a `CAMEX_TILES_ISA` value. `--json FILE` also writes the measurements.

Exit status 0 when the native kernels load (and the tuning ran, if asked), 1 when serving would
fall back to torch's, 2 for a bad argument or `--tune` on a CPU without AVX-512.
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import sys

import torch

from camex_runtime import kernels
from camex_runtime.kernels import build

TUNE_KINDS = (*kernels.WEIGHT_KINDS, "merge", "tiles")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m camex_runtime.kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tune", action="store_true",
                   help="measure the AVX-512 kernel's settings on this CPU and print the best")
    p.add_argument("--threads", default=None,
                   help="thread counts to measure at, comma-separated (default: 1 and torch's "
                        "current count)")
    p.add_argument("--kinds", default=",".join(TUNE_KINDS),
                   help="what to tune: fp32 and 16bit (the linear kernel per kind of weights), "
                        "merge (the merges' prefetch distance), tiles (the prompt tiles' "
                        "vectors); default: all four")
    p.add_argument("--reps", type=int, default=5, help="timed passes per cell (default: 5)")
    p.add_argument("--d-model", type=int, default=768, help="model width (default: GPT-2-small)")
    p.add_argument("--layers", type=int, default=12, help="blocks (default: 12)")
    p.add_argument("--vocab", type=int, default=50257, help="LM head rows (default: 50257)")
    p.add_argument("--json", default=None, help="also write the measurements to this file")
    args = p.parse_args(argv)
    try:
        args.threads = sorted({int(t) for t in args.threads.split(",")}) if args.threads else \
            sorted({1, torch.get_num_threads()})
    except ValueError:
        p.error(f"--threads: comma-separated integers, got {args.threads!r}")
    args.kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    bad = [k for k in args.kinds if k not in TUNE_KINDS]
    if bad or not args.kinds:
        p.error(f"--kinds: one or more of {', '.join(TUNE_KINDS)}, got {bad}")
    if min(args.threads) < 1 or args.reps < 1 or min(args.d_model, args.layers, args.vocab) < 1:
        p.error("--threads, --reps, --d-model, --layers and --vocab must be positive")
    return args


def tune(args: argparse.Namespace, module) -> int:
    from camex_runtime.kernels import tuning

    if module.isa() != "avx512":
        print("--tune: this CPU has no AVX-512 (F, BW, DQ, VL); the AVX2 kernel has no settings "
              "to tune", file=sys.stderr)
        return 2
    chosen = kernels.chosen_tuning()
    report = {"cpu": kernels.cpu_vendor(), "cpu_family": kernels.cpu_family(),
              "machine": platform.processor() or platform.machine(),
              "threads": args.threads, "shape": {"d_model": args.d_model, "layers": args.layers,
                                                 "vocab": args.vocab},
              "serving_with": kernels.format_tuning(chosen), "kinds": {}}
    best = {}
    merge_current = kernels.merge_prefetch()
    tiles_current = module.tiles_isa()
    try:
        for kind in (k for k in args.kinds if k in kernels.WEIGHT_KINDS):
            results = tuning.measure(module, kind, args.threads, args.d_model, args.layers,
                                     args.vocab, args.reps, progress=lambda m: print(
                                         "  " + m, file=sys.stderr, flush=True))
            name, score = tuning.choose(results)
            grid = tuning.candidates(max(tuning.ROWS[kind]))
            best[kind] = grid[name]
            print(tuning.table(kind, results, score, tuning.current_name(kind, chosen[kind])))
            print()
            report["kinds"][kind] = {"ms": results, "score": score, "best": name,
                                     "best_tuning": list(grid[name]),
                                     "candidates": {n: list(t) for n, t in grid.items()}}
        if "merge" in args.kinds:
            results = tuning.measure_merge(module, args.threads, args.d_model, args.layers,
                                           args.reps, progress=lambda m: print(
                                               "  " + m, file=sys.stderr, flush=True))
            distances = {tuning.merge_name(a): a for a in tuning.MERGE_DISTANCES}
            report["merge"] = {"ms": results, "score": {}, "best": {}, "best_bytes": {},
                               "serving_with": merge_current, "candidates": distances}
            for kind in kernels.WEIGHT_KINDS:  # a distance per kind of stack
                per_kind = {n: {kind: cells[kind]} for n, cells in results.items()}
                name, score = tuning.choose(per_kind)
                print(tuning.merge_table(per_kind, score,
                                         tuning.merge_name(merge_current[kind])))
                print()
                report["merge"]["score"][kind] = score
                report["merge"]["best"][kind] = name
                report["merge"]["best_bytes"][kind] = distances[name]
        if "tiles" in args.kinds:
            results = tuning.measure_tiles(module, args.threads, args.d_model, args.layers,
                                           args.reps, progress=lambda m: print(
                                               "  " + m, file=sys.stderr, flush=True))
            name, score = tuning.choose(results)
            names = {isa: n for n, isa in tuning.TILES_ISAS.items()}
            print(tuning.tiles_table(results, score, names[tiles_current]))
            print()
            report["tiles"] = {"ms": results, "score": score, "best": name,
                               "best_isa": tuning.TILES_ISAS[name],
                               "serving_with": tiles_current}
    finally:
        for kind, t in chosen.items():  # this process goes on with what it serves with
            module.tune(kind, *t)
        kernels.apply_merge_prefetch(module, merge_current)
        module.set_tiles_isa(tiles_current)
    merged = {**chosen, **best}
    print(f"serving with: CAMEX_KERNELS_TUNING='{kernels.format_tuning(chosen)}'")
    print(f"fastest here: CAMEX_KERNELS_TUNING='{kernels.format_tuning(merged)}'")
    report["best"] = kernels.format_tuning(merged)
    if "merge" in report:
        print("merges serve with: "
              f"CAMEX_MERGE_PREFETCH='{kernels.format_merge_prefetch(merge_current)}'")
        print("merges fastest here: CAMEX_MERGE_PREFETCH="
              f"'{kernels.format_merge_prefetch(report['merge']['best_bytes'])}'")
    if "tiles" in report:
        print(f"prompt tiles serve with: CAMEX_TILES_ISA={tiles_current}")
        print(f"prompt tiles fastest here: CAMEX_TILES_ISA={report['tiles']['best_isa']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        kernels.status()  # logs "linear kernels: ..." (and a build's progress)
    except ValueError as e:  # a bad CAMEX_KERNELS or CAMEX_KERNELS_TUNING
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"build directory: {build.build_dir()}")
    module = kernels.native()
    if module is None:
        return 1
    return tune(args, module) if args.tune else 0


if __name__ == "__main__":
    sys.exit(main())
