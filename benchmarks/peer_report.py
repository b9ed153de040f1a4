"""Tables of the llama.cpp peer benchmark, from its results document (no measuring here).

``summarize(doc)`` turns the recorded runs into one row per (system, dtype pair, threads) with
the per-round figures (tokens/s at B=1 and at the concurrent level, TTFT, ITL, the engine's own
rate and the server overhead) and the per-round ratios against llama-server of the same dtype
pair and thread count; ``markdown(doc)`` prints the issue's table and a details table;
``targets(doc)`` states the issue's targets as measured. A ratio is always taken between runs of
the same round (measured interleaved, or back to back in documents from before interleaving), and
shown as the range over rounds. Where slice durations were recorded, each target also gets the
slice-by-slice reading: the paired ratios' spread, median, and geometric mean with its 95 %
interval (``paired_interval``), which says whether a run was long enough to tell the ratio from
its bar.

    python benchmarks/peer_report.py benchmarks/results/peer-llamacpp.json   # re-print a table
    python benchmarks/peer_report.py --targets-only RUN1.json RUN2.json   # several runs, verdicts
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

LLAMA = "llama.cpp"
SYSTEM_NAMES = {LLAMA: "llama.cpp `llama-server -np {conc}`",
                "camex-dense": "camex-server, dense-equivalent model",
                "camex-7x1": "camex-server, CAMEx 7+1 experts",
                "camex-7x1-int8": "camex-server, CAMEx 7+1 experts, `--expert-deltas int8`"}
MERGED = ("camex-7x1", "camex-7x1-int8")  # the systems target 2 compares with dense
# dtype pair name -> (llama.cpp GGUF type, camex --dtype)
# (bf16 vs f16 is issue #15's pairing: each server's usual half precision.)
DTYPE_PAIRS = {"fp32": ("f32", "float32"), "bf16": ("f16", "bfloat16"), "fp16": ("f16", "float16")}


def level_of(run: dict, concurrency: int) -> dict | None:
    return next((lv for lv in run["levels"] if lv["concurrency"] == concurrency), None)


def tok_s(level: dict | None) -> float | None:
    return None if level is None else level["report"]["output_token_throughput"]


def median_ms(level: dict | None, metric: str) -> float | None:
    v = None if level is None else level["report"][metric]["median"]
    return None if v is None else v * 1e3


def by_round(doc: dict, kind: str, system: str, pair: str, threads: int) -> dict[int, dict]:
    return {r["round"]: r for r in doc["runs"] if r["kind"] == kind and r["system"] == system
            and r["dtype_pair"] == pair and r["threads"] == threads}


def ratios(num: dict[int, float | None], den: dict[int, float | None]) -> list[float]:
    """num[r] / den[r] for every round where both exist."""
    return [num[r] / den[r] for r in sorted(num) if num.get(r) and den.get(r)]


def same_tokens(run: dict, ref: dict) -> tuple[int, int]:
    """(requests whose generated ids equal the reference run's, requests compared), over the
    levels of two runs of one plan: greedy decoding of the same weights should agree, up to
    near-ties that different kernels order differently."""
    same = total = 0
    for lv in run["levels"]:
        other = level_of(ref, lv["concurrency"])
        for a, b in zip(lv.get("token_ids", []), (other or {}).get("token_ids", [])):
            if a and b:
                same, total = same + (a == b), total + 1
    return same, total


def slice_ratios(c: int, num: dict, den: dict) -> dict[int, list[float]]:
    """`num`'s tok/s over `den`'s, slice by slice (a wave of c requests; at B=1 one request),
    per round, from the slice durations of interleaved runs: the units ran each slice back to
    back, so each slice is a pair in time, and its tokens are the same for both, so a tok/s
    ratio is the inverse ratio of durations. Empty for documents without slice durations."""
    out = {}
    for r in sorted(num):
        levels = [level_of(runs[r], c) if r in runs else None for runs in (num, den)]
        slices = [lv.get("slice_durations_s") if lv else None for lv in levels]
        if all(slices) and len(slices[0]) == len(slices[1]):
            out[r] = [d / n if min(n, d) > 0 else None for n, d in zip(*slices)]
    return out


def wave_ratios(c: int, http: dict, engine: dict, dense: dict,
                dense_engine: dict) -> list[float]:
    """Target 2's concurrent ratio (HTTP CAMEx/dense over engine CAMEx/dense) wave by wave:
    the four units ran each wave back to back."""
    moe, base = slice_ratios(c, http, engine), slice_ratios(c, dense, dense_engine)
    return [a / b for r in moe if len(base.get(r, ())) == len(moe[r])
            for a, b in zip(moe[r], base[r]) if a and b]


def flat(by_round: dict[int, list[float | None]]) -> list[float]:
    return [v for r in sorted(by_round) for v in by_round[r] if v is not None]


def summarize(doc: dict) -> list[dict]:
    """One row per (system, dtype pair, threads), in the order the runs were planned."""
    conc = doc["settings"]["concurrency"]
    rows, seen = [], set()
    for run in doc["runs"]:
        key = (run["system"], run["dtype_pair"], run["threads"])
        if run["kind"] != "http" or key in seen:
            continue
        seen.add(key)
        system, pair, threads = key
        http = by_round(doc, "http", *key)
        engine = by_round(doc, "engine", *key)
        llama = by_round(doc, "http", LLAMA, pair, threads)
        dense = by_round(doc, "http", "camex-dense", pair, threads)
        dense_engine = by_round(doc, "engine", "camex-dense", pair, threads)
        row = {"system": system, "dtype_pair": pair, "threads": threads,
               "dtype": DTYPE_PAIRS[pair][0 if system == LLAMA else 1], "rounds": sorted(http)}
        for c, tag in ((1, "b1"), (conc, "conc")):
            h = {r: tok_s(level_of(run, c)) for r, run in http.items()}
            e = {r: tok_s(level_of(run, c)) for r, run in engine.items()}
            row[f"{tag}_tok_s"] = [h[r] for r in sorted(h)]
            row[f"{tag}_ttft_ms"] = [median_ms(level_of(http[r], c), "ttft") for r in sorted(http)]
            row[f"{tag}_itl_ms"] = [median_ms(level_of(http[r], c), "itl") for r in sorted(http)]
            row[f"{tag}_engine_tok_s"] = [e[r] for r in sorted(e)]
            row[f"{tag}_overhead"] = ratios(h, e)  # HTTP tok/s / engine tok/s
            # the same, slice by slice: each pair ran back to back, so a slow minute of the
            # machine moves both sides of a ratio (the spread says how much one run's is noise)
            row[f"{tag}_overhead_slices"] = flat(slice_ratios(c, http, engine))
            if system != LLAMA and llama:
                row[f"{tag}_vs_llama"] = ratios(h, {r: tok_s(level_of(v, c))
                                                    for r, v in llama.items()})
            if system in MERGED and dense:
                h_dense = {r: tok_s(level_of(v, c)) for r, v in dense.items()}
                e_dense = {r: tok_s(level_of(v, c)) for r, v in dense_engine.items()}
                row[f"{tag}_vs_dense"] = ratios(h, h_dense)
                row[f"{tag}_engine_vs_dense"] = ratios(e, e_dense)
                # target 2 at the concurrent level: the HTTP ratio against the engines', per
                # round (HTTP CAMEx/dense over engine CAMEx/dense)
                row[f"{tag}_vs_dense_over_engine"] = [
                    (h[r] / h_dense[r]) / (e[r] / e_dense[r]) for r in sorted(h)
                    if h.get(r) and h_dense.get(r) and e.get(r) and e_dense.get(r)]
        if system in MERGED and dense:  # (at B=1 a slice is one request, not a wave)
            row["conc_vs_dense_over_engine_waves"] = wave_ratios(conc, http, engine, dense,
                                                                 dense_engine)
        if system != LLAMA and llama:
            pairs = [same_tokens(http[r], llama[r]) for r in sorted(http) if r in llama]
            row["same_tokens_as_llama"] = [sum(p[0] for p in pairs), sum(p[1] for p in pairs)]
        row["other_cores_max"] = max((lv["cpu"].get("other_cores", 0.0) for r in http.values()
                                      for lv in r["levels"]), default=None)
        stolen = [lv["cpu"]["steal_cores"] for r in http.values() for lv in r["levels"]
                  if "steal_cores" in lv["cpu"]]  # (documents from before it have none)
        row["steal_cores_max"] = max(stolen) if stolen else None
        rows.append(row)
    return rows


def span(values: list[float | None], fmt: str = "{:.1f}") -> str:
    """'a–b' over rounds (one value when they agree to the format), '-' when none."""
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    lo, hi = fmt.format(min(vals)), fmt.format(max(vals))
    return lo if lo == hi else f"{lo}–{hi}"


def cell(row: dict, tag: str) -> str:
    text = span(row[f"{tag}_tok_s"])
    if row.get(f"{tag}_vs_llama"):
        text += f" ({span(row[f'{tag}_vs_llama'], '{:.2f}')}×)"
    return text


def other_cores(row: dict) -> str:
    if row["other_cores_max"] is None:
        return "-"
    text = f"{row['other_cores_max']:.2f}"
    if row.get("steal_cores_max") is not None:
        text += f" ({row['steal_cores_max']:.2f} stolen)"
    return text


def markdown(doc: dict) -> str:
    rows, conc = summarize(doc), doc["settings"]["concurrency"]
    s = doc["settings"]
    how = ("interleaved request by request at B=1" if s.get("interleaved")
           else "alternating servers")
    out = [f"{s['prompt_tokens']}-token prompts, {s['new_tokens']} new tokens, greedy, over HTTP; "
           f"{doc['settings']['runs']} runs each, {how} (range over runs; in "
           f"brackets: ratio to llama-server of the same run, dtype pair and threads)", "",
           f"| server | dtype | threads | B=1 tok/s | {conc} concurrent, total tok/s |",
           "|---|---|---:|---:|---:|"]
    for r in rows:
        name = SYSTEM_NAMES.get(r["system"], r["system"]).replace("{conc}", str(conc))
        out.append(f"| {name} | {r['dtype']} | "
                   f"{r['threads']} | {cell(r, 'b1')} | {cell(r, 'conc')} |")
    out += ["", f"| server | dtype | threads | TTFT p50 B=1 ms | ITL p50 B=1 ms | ITL p50 "
                f"c={conc} ms | engine B=1 tok/s | engine c={conc} tok/s | HTTP/engine B=1 | "
                f"HTTP/engine c={conc} | CAMEx/dense B=1 | CAMEx/dense c={conc} HTTP (engine) | "
                f"greedy = llama | other cores (max) |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(" | ".join([
            f"| {r['system']}", r["dtype"], str(r["threads"]), span(r["b1_ttft_ms"], "{:.0f}"),
            span(r["b1_itl_ms"]), span(r["conc_itl_ms"]), span(r["b1_engine_tok_s"]),
            span(r["conc_engine_tok_s"]), span(r["b1_overhead"], "{:.2f}"),
            span(r["conc_overhead"], "{:.2f}"), span(r.get("b1_vs_dense", []), "{:.2f}"),
            "-" if not r.get("conc_vs_dense") else
            f"{span(r['conc_vs_dense'], '{:.2f}')} ({span(r['conc_engine_vs_dense'], '{:.2f}')})",
            "-" if not r.get("same_tokens_as_llama")
            else "{}/{}".format(*r["same_tokens_as_llama"]),
            other_cores(r)]) + " |")
    out += ["", "ITL: inter-token latency. HTTP/engine: tok/s over HTTP / the engine in process on "
            "the same workload. CAMEx/dense c=N: over HTTP, in brackets the engines' own ratio "
            "(target 2 asks the first to be at least the second). greedy = llama: requests "
            "whose generated ids equal llama-server's (same dtype pair, threads and round). "
            "other cores: CPU other processes used during a level (machine busy - server - "
            "client), in brackets the part the hypervisor gave to other guests (steal)."]
    line = profiles(doc)
    if line:
        out += ["", line]
    return "\n".join(out)


def profiles(doc: dict) -> str | None:
    """The merge time each merged-expert server and its engine baseline measured at start-up
    (their cost profiles, which set how the scheduler budgets a routing decision's merges:
    two processes that measured differently schedule differently), per cell and round; None
    for documents from before the profiles were recorded."""
    cells: dict[tuple, dict[int, dict[str, float]]] = {}
    for run in doc["runs"]:
        profile = run.get("cost_profile")
        if profile:
            key = (run["system"], run["dtype_pair"], run["threads"])
            cells.setdefault(key, {}).setdefault(run["round"], {})[run["kind"]] = \
                profile["merge_ms"]
    if not cells:
        return None

    def ms(by_kind: dict[str, float], kind: str) -> str:
        return f"{by_kind[kind]:.1f}" if kind in by_kind else "-"
    parts = [f"{system} {pair} {threads} thread(s): " + ", ".join(
                 f"{ms(r, 'http')} / {ms(r, 'engine')}" for _, r in sorted(rounds.items()))
             for (system, pair, threads), rounds in cells.items()]
    return ("Start-up cost profiles, one merge in ms, server / its engine baseline, per round: "
            + "; ".join(parts) + ".")


# Student's t, two-sided 95 %, by degrees of freedom (1-30); beyond 30 the normal 1.96 is
# within 4 % of it
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
       2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
       2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def paired_interval(values: list[float]) -> tuple[float, float, float] | None:
    """Geometric mean of paired ratios and its 95 % interval (t on the logs): how precisely a
    run's slices pin the ratio down. A wave's ratio on a shared VM moves by ~10 % from one wave
    to the next, so 4 waves leave ±10-20 % and cannot tell 0.95 from 1.0. None below 2."""
    logs = [math.log(v) for v in values if v and v > 0]
    if len(logs) < 2:
        return None
    mean = statistics.fmean(logs)
    half = (T95[len(logs) - 2] if len(logs) - 1 <= len(T95) else 1.96) \
        * statistics.stdev(logs) / math.sqrt(len(logs))
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def one_by_one(values: list[float], unit: str) -> str:
    """'; N waves one by one: lo–hi, median m, paired mean g (95 % interval a–b)' ('' without
    per-slice ratios)."""
    if not values:
        return ""
    text = (f"; {len(values)} {unit} one by one: {span(values, '{:.2f}')}, median "
            f"{statistics.median(values):.2f}")
    interval = paired_interval(values)
    if interval:
        text += "; paired mean {:.2f} (95 % interval {:.2f}–{:.2f})".format(*interval)
    return text


def targets(doc: dict) -> list[str]:
    """The issue's targets 1-3, each with the worst measured ratio and met / not met."""
    rows, lines = summarize(doc), []

    def state(name: str, values: list[float], goal: float, extra: str = "") -> None:
        if values:
            ok = "met" if min(values) >= goal else "NOT met"
            lines.append(f"{name}: worst {min(values):.2f} (>= {goal}: {ok}){extra}")

    for r in rows:
        where = f"{r['dtype_pair']}, {r['threads']} thread(s)"
        if r["system"] == "camex-dense":
            for tag, what in (("b1", "B=1"), ("conc", "concurrent")):
                state(f"1. dense / llama-server, {what}, {where}",
                      r.get(f"{tag}_vs_llama", []), 1.0)
        if r["system"] in MERGED:
            name = "CAMEx" if r["system"] == "camex-7x1" else "CAMEx int8 deltas"
            state(f"2. {name} / dense, B=1, {where}", r.get("b1_vs_dense", []), 0.9)
            waves = r.get("conc_vs_dense_over_engine_waves", [])
            state(f"2. {name} / dense, concurrent, over HTTP / in the engine, {where}",
                  r.get("conc_vs_dense_over_engine", []), 1.0, one_by_one(waves, "waves"))
        if r["system"] != LLAMA:
            for tag, what, unit in (("b1", "B=1", "requests"), ("conc", "concurrent", "waves")):
                state(f"3. HTTP / engine, {r['system']} {what}, {where}",
                      r[f"{tag}_overhead"], 0.95, one_by_one(r[f"{tag}_overhead_slices"], unit))
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", type=Path,
                   help="results JSON written by benchmarks/peer_llamacpp.py")
    p.add_argument("--targets-only", action="store_true",
                   help="only the per-target lines, not the tables")
    args = p.parse_args(argv)
    for i, path in enumerate(args.results):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            p.error(f"cannot read {path}: {err}")
        if not isinstance(doc, dict) or "runs" not in doc or "settings" not in doc:
            p.error(f"{path} is not a peer_llamacpp.py results document (no runs/settings)")
        if len(args.results) > 1:
            print(("\n" if i else "") + f"## {path}\n")
        if not args.targets_only:
            print(markdown(doc))
            print()
        print("\n".join(targets(doc)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
