"""The README's demo figures, reproduced and stored: how long `make serve` takes on a fresh
clone, the demo models' held-out numbers, the README's classification example, and how
`transformers.generate` compares with the server's greedy output.

    python benchmarks/demo_models.py              # fresh clone of HEAD: make install, make serve
    python benchmarks/demo_models.py --no-clone   # this checkout and its .venv (no install timing)
    python benchmarks/demo_models.py --no-clone --no-make --demo-dir DIR --out x.json   # smoke:
        # serve demo checkpoints already in DIR with this interpreter (the test suite does this)

Steps: `git clone` the committed HEAD into a temporary directory; time `make install` there (a
new .venv; pip's cache and this machine's package indexes are whatever they are, see the JSON);
time `make serve` with an empty `CAMEX_DEMO_DIR` until `/ready` answers (system packages
check, both demo models trained and exported, server loaded and warmed up); read the demo
models' held-out metrics from their folded checkpoints; send the README's requests over HTTP;
compare greedy generation of the server, of `transformers.generate` on the folded LM, and of a
full forward with `route1_len = prompt length` (what the server computes, docs/DESIGN.md §2).
The server is stopped through the process group this script started.

Writes benchmarks/results/demo.json (git commit, machine, load averages before and after each
phase) and prints a table. Asserts nothing; a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkouts import git_state  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# The README's requests ("Try it"), sent verbatim.
CLASSIFY_EXAMPLE = ["The program crashed because the disk was full.",
                    "The senator promised lower taxes before the election."]
GENERATE_EXAMPLE = {"inputs": "A fortune:",
                    "parameters": {"max_new_tokens": 40, "do_sample": True, "seed": 1}}
# Greedy comparison: a prompt shorter than the demo's segment (T = 32 tokens) and one longer.
GREEDY_PROMPTS = ["A fortune:",
                  "Q: Why did the programmer quit his job? A: Because he didn't get arrays. "
                  "The computer was invented so that people could make mistakes faster than "
                  "ever before, and it worked"]
GREEDY_TOKENS = 40


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines()
                if line.startswith("model name")), platform.processor())
    mem = re.search(r"MemTotal:\s+(\d+) kB", _read("/proc/meminfo"))
    import torch

    return {"hostname": platform.node(), "platform": platform.platform(), "cpu": cpu,
            "cpus": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
            "memory_gib": round(int(mem.group(1)) / 2**20, 1) if mem else None,
            "python": platform.python_version(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed_install(repo: Path, log: Path) -> float:
    started = time.perf_counter()
    with log.open("w") as out:
        subprocess.run(["make", "install"], cwd=repo, stdout=out, stderr=subprocess.STDOUT,
                       check=True)
    return time.perf_counter() - started


def start_serve(repo: Path, demo_dir: Path, port: int, log: Path,
                use_make: bool = True) -> subprocess.Popen:
    env = {**os.environ, "CAMEX_DEMO_DIR": str(demo_dir), "PYTHONUNBUFFERED": "1"}
    env.pop("VIRTUAL_ENV", None)
    cmd = (["make", "serve", f"PORT={port}"] if use_make else
           [sys.executable, "-m", "server.cli", "--host", "127.0.0.1", "--port", str(port)])
    # A new session: `make` and the server it starts form one group, stopped together below.
    return subprocess.Popen(cmd, cwd=repo, env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 3600) -> float:
    started = time.perf_counter()
    while time.perf_counter() - started < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"make serve exited with {proc.returncode}:\n"
                               + "\n".join(log.read_text().splitlines()[-30:]))
        try:
            if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                return time.perf_counter() - started
        except httpx.TransportError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"{url}/ready not 200 after {timeout_s:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)  # the group this script created (start_new_session)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def demo_numbers(demo_dir: Path, log: Path) -> dict:
    """Held-out metrics from the folded checkpoints, training seconds from the server log."""
    out = {}
    pattern = r"\[camex demo\] (demo-[\w-]+): \d+ steps in (\d+) s"
    trained = dict(re.findall(pattern, log.read_text()))
    for name in ("demo-lm", "demo-classifier"):
        config = json.loads((demo_dir / name / "config.json").read_text())
        prov = config.get("provenance", {})
        out[name] = {"eval_metrics": prov.get("eval_metrics"),
                     "train_steps": prov.get("train_steps"),
                     "training_data": prov.get("training_data"),
                     "export_max_rel_error": prov.get("export_max_rel_error"),
                     "training_loop_s": float(trained[name]) if name in trained else None,
                     "stamp": json.loads((demo_dir / f"{name}.stamp.json").read_text())}
    return out


def readme_examples(url: str) -> dict:
    clf = httpx.post(f"{url}/classify", json={"inputs": CLASSIFY_EXAMPLE}, timeout=120)
    gen = httpx.post(f"{url}/generate", json=GENERATE_EXAMPLE, timeout=120)
    clf.raise_for_status(), gen.raise_for_status()
    return {"classify": [{"input": text, "top": ranked[0]["label"],
                          "score": round(ranked[0]["score"], 4)}
                         for text, ranked in zip(CLASSIFY_EXAMPLE, clf.json())],
            "generate": {"request": GENERATE_EXAMPLE,
                         "generated_text": gen.json()["generated_text"]}}


def server_greedy(url: str, prompt: str) -> list[int]:
    body = {"inputs": prompt, "parameters": {"max_new_tokens": GREEDY_TOKENS, "details": True}}
    res = httpx.post(f"{url}/generate", json=body, timeout=120)
    res.raise_for_status()
    return [t["id"] for t in res.json()["details"]["tokens"]]


def reference_greedy(lm_dir: Path, prompt: str) -> dict:
    """`transformers.generate` (greedy) and a greedy loop of full forwards with
    route1_len = prompt length, on the folded LM."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import camex_runtime  # noqa: F401  (registers the camex model type)

    tok = AutoTokenizer.from_pretrained(lm_dir)
    model = AutoModelForCausalLM.from_pretrained(lm_dir).eval()
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    n = ids.shape[1]
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=GREEDY_TOKENS, do_sample=False,
                             pad_token_id=tok.pad_token_id)[0, n:].tolist()
        seq = ids
        for _ in range(GREEDY_TOKENS):
            nxt = model(seq, route1_len=n).logits[0, -1].argmax()
            seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
            if int(nxt) == tok.eos_token_id:
                break
    return {"prompt_tokens": n, "generate": gen, "full_forward_route1": seq[0, n:].tolist()}


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def greedy_comparison(url: str, lm_dir: Path) -> list[dict]:
    segment_len = json.loads((lm_dir / "config.json").read_text())["segment_len"]
    rows = []
    for prompt in GREEDY_PROMPTS:
        server = server_greedy(url, prompt)
        ref = reference_greedy(lm_dir, prompt)
        rows.append({"prompt": prompt, "prompt_tokens": ref["prompt_tokens"],
                     "segment_len": segment_len,
                     "server_equals_full_forward_route1": server == ref["full_forward_route1"],
                     "server_equals_transformers_generate": server == ref["generate"],
                     "first_difference_vs_generate": first_difference(server, ref["generate"]),
                     "server": server, **ref})
    return rows


def run(args) -> dict:
    result: dict = {"benchmark": "demo_models", "git": git_state(ROOT), "machine": machine(),
                    "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "load_avg": {"start": load()}}
    with tempfile.TemporaryDirectory(prefix="camex-demo-bench-") as tmp:
        work = Path(tmp)
        repo = ROOT
        if not args.no_clone:
            repo = work / "camex-serve"
            subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(ROOT), str(repo)],
                           check=True)
            result["install_s"] = round(timed_install(repo, work / "install.log"), 1)
            result["load_avg"]["after_install"] = load()
        port, log = free_port(), work / "serve.log"
        demo_dir = Path(args.demo_dir) if args.demo_dir else work / "demo"
        url = f"http://127.0.0.1:{port}"
        proc = start_serve(repo, demo_dir, port, log, use_make=not args.no_make)
        try:
            result["serve_to_ready_s"] = round(wait_ready(url, proc, log), 1)
            result["load_avg"]["after_ready"] = load()
            result["demo"] = demo_numbers(demo_dir, log)
            result["readme_examples"] = readme_examples(url)
            result["greedy_vs_transformers_generate"] = greedy_comparison(url,
                                                                          demo_dir / "demo-lm")
        finally:
            stop(proc)
        result["load_avg"]["end"] = load()
    if "install_s" in result:
        result["first_run_s"] = round(result["install_s"] + result["serve_to_ready_s"], 1)
    return result


def _metric(numbers: dict, key: str, fmt: str = ".1f") -> str:
    value = (numbers.get("eval_metrics") or {}).get(key)
    return "-" if value is None else format(value, fmt)


def print_summary(r: dict) -> None:
    lm, clf = r["demo"]["demo-lm"], r["demo"]["demo-classifier"]
    git = f"{r['git']['commit'][:12]}{' (dirty)' if r['git']['dirty'] else ''}"
    rows = [("commit", git),
            ("machine", f"{r['machine']['cpu']}, {r['machine']['cpus']} CPUs"),
            ("load average (1 min): start, end",
             f"{r['load_avg']['start'][0]}, {r['load_avg']['end'][0]}"),
            ("make install (fresh clone)", f"{r.get('install_s', '-')} s"),
            ("make serve until /ready (demo build + start)", f"{r['serve_to_ready_s']} s"),
            ("first run in all", f"{r.get('first_run_s', '-')} s"),
            ("demo-lm perplexity (unigram baseline)",
             f"{_metric(lm, 'perplexity')} ({_metric(lm, 'unigram_perplexity')})"),
            ("demo-lm training loop", f"{lm['training_loop_s']} s"),
            ("demo-classifier accuracy (chance)",
             f"{_metric(clf, 'accuracy', '.3f')} ({_metric(clf, 'chance_accuracy', '.3f')})"),
            ("demo-classifier training loop", f"{clf['training_loop_s']} s")]
    rows += [(f"classify {c['input'][:30]!r}", f"{c['top']} ({c['score']})")
             for c in r["readme_examples"]["classify"]]
    rows += [(f"greedy, {g['prompt_tokens']}-token prompt (T={g['segment_len']})",
              f"server == full forward(route1_len): {g['server_equals_full_forward_route1']}, "
              f"== transformers.generate: {g['server_equals_transformers_generate']}")
             for g in r["greedy_vs_transformers_generate"]]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k.ljust(width)}  {v}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--no-clone", action="store_true",
                   help="use this checkout and its .venv; no fresh clone, no install timing")
    p.add_argument("--no-make", action="store_true",
                   help="start the server with this interpreter instead of `make serve`")
    p.add_argument("--demo-dir", help="demo directory to serve (default: a new, empty one, so "
                                      "the demo models are trained)")
    p.add_argument("--out", default=str(RESULTS / "demo.json"), help="JSON path")
    args = p.parse_args(argv)
    result = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print_summary(result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
