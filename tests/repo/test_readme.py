"""The README's commands work as written on a fresh clone: every `camex-*` command is called
through `.venv/bin/` (which `make install` creates) and parses with the real command's parser,
every `make` target it names exists, and every file it links to is in the repository."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()


def shell_lines() -> list[str]:
    """Commands in the README's ```bash blocks, continuation lines joined, comments cut."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def commands(name: str) -> list[list[str]]:
    return [shlex.split(line)[1:] for line in shell_lines()
            if shlex.split(line)[0] == f".venv/bin/{name}"]


def test_project_commands_go_through_the_venv():
    bare = [line for line in shell_lines() if re.match(r"camex-\w+\b", line)]
    assert not bare, f"README commands that need an activated venv: {bare}"
    assert commands("camex-train") and commands("camex-server")


@pytest.mark.parametrize("argv", commands("camex-train"))
def test_readme_train_commands_parse(argv):
    from camex_runtime.training.cli import build_parser, config_from_args

    config_from_args(build_parser().parse_args(argv)).validate()


@pytest.mark.parametrize("argv", commands("camex-server"))
def test_readme_server_commands_parse(argv):
    from server.settings import build_parser

    build_parser().parse_args(argv)


def test_readme_export_flags_exist():
    help_text = subprocess.run([sys.executable, "-m", "camex_runtime.export", "--help"],
                               capture_output=True, text=True, timeout=120, cwd=REPO).stdout
    for argv in commands("camex-export"):
        for flag in (a for a in argv if a.startswith("--")):
            assert flag in help_text, flag


def test_make_targets_and_linked_files_exist():
    makefile = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+):", makefile, re.M))
    used = set(re.findall(r"`make ([\w-]+)", README))
    assert used and used <= targets, used - targets
    links = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", README)
    missing = [link for link in links if not (REPO / link).exists()]
    assert not missing
    assert (REPO / "benchmarks" / "results" / "demo.json").is_file()


def test_demo_figures_come_from_the_results_file():
    """Every demo figure in the README is the one `benchmarks/demo_models.py` stored."""
    import json

    r = json.loads((REPO / "benchmarks" / "results" / "demo.json").read_text())
    assert not r["git"]["dirty"] and r["machine"]["cpus"] and r["load_avg"]["start"]
    lm, clf = r["demo"]["demo-lm"], r["demo"]["demo-classifier"]
    ppl, acc = lm["eval_metrics"]["perplexity"], clf["eval_metrics"]["accuracy"] * 100
    figures = [
        f"fresh clone of {r['git']['commit'][:7]}",
        f"held-out perplexity {ppl:.1f}", f"perplexity **{ppl:.1f}**",
        f"unigram {lm['eval_metrics']['unigram_perplexity']:.1f}",
        f"{acc:.1f} % held-out accuracy", f"accuracy **{acc:.1f} %**",
        f"chance {clf['eval_metrics']['chance_accuracy'] * 100:.1f} %",
        f"| {lm['training_loop_s']:.0f} s |", f"| {clf['training_loop_s']:.0f} s |",
        f"`make install` {r['install_s']:.0f} s", f"`/ready` {r['serve_to_ready_s']:.0f} s",
        f"{r['first_run_s'] / 60:.1f} min in all", f"({r['first_run_s'] / 60:.0f} min measured",
        f"load average {r['load_avg']['start'][0]:.1f} at the start",
        f"{r['load_avg']['after_ready'][0]:.1f} when the server was ready",
        *(f"`{c['top']}` ({c['score']:.2f})" for c in r["readme_examples"]["classify"]),
        *(f"{g['prompt_tokens']}-token prompt" for g in r["greedy_vs_transformers_generate"]),
    ]
    text = " ".join(README.split())
    missing = [f for f in figures if " ".join(f.split()) not in text]
    assert not missing, f"README figures that differ from benchmarks/results/demo.json: {missing}"
    short, long_ = r["greedy_vs_transformers_generate"]
    assert short["prompt_tokens"] < short["segment_len"] <= long_["prompt_tokens"]
    assert not short["server_equals_transformers_generate"]   # what the README says
    ordinal = ["first", "second", "third", "fourth", "fifth", "sixth"]
    assert f"at the {ordinal[short['first_difference_vs_generate']]} token" in text
    assert long_["server_equals_transformers_generate"]
    assert all(g["server_equals_full_forward_route1"] for g in (short, long_))
