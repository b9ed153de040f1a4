"""benchmarks/quality.py end to end (`--smoke`: one seed, tiny budget) and its statistics.

The smoke run trains all 8 variants on both tasks from the real Debian fortunes (apt package
`fortunes`) in a few seconds and checks the JSON/markdown it writes; the statistics helpers are
checked against textbook values, since the committed results' significance claims rest on them.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "quality.py"


@functools.cache
def load_quality():
    """The script as a module (benchmarks/ is not a package); registered so dataclasses work."""
    spec = importlib.util.spec_from_file_location("quality_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out-dir", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads((out / "quality.json").read_text()), proc


@pytest.mark.slow
def test_smoke_json_has_every_variant_with_finite_metrics(smoke):
    _, report, _ = smoke
    variants = load_quality().VARIANTS
    assert set(report["tasks"]) == {"lm", "classify"}
    assert len(report["runs"]) == 2 * len(variants)  # one seed
    for task, s in report["tasks"].items():
        assert list(s["variants"]) == list(variants), task
        for name, v in s["variants"].items():
            assert math.isfinite(v["mean"]) and v["params"] > 0, (task, name)
            assert [r["seed"] for r in v["runs"]] == [0]
            assert v["train_seconds_mean"] > 0
        assert [(p["ca"], p["euclidean"]) for p in s["paired"]] == [
            ("domain_specific-CA", "domain_specific"), ("ties-CA", "ties"), ("dare-CA", "dare")]
    lm, clf = report["tasks"]["lm"], report["tasks"]["classify"]
    assert all(v["mean"] > 1.0 for v in lm["variants"].values())           # perplexities
    assert all(0.0 <= v["mean"] <= 1.0 for v in clf["variants"].values())  # accuracies


@pytest.mark.slow
def test_smoke_param_counts_follow_the_architecture(smoke):
    _, report, _ = smoke
    for task, s in report["tasks"].items():
        v = s["variants"]
        assert v["dynamic"]["params"] < v["domain_specific-CA"]["params"], task
        assert v["dense"]["params"] < v["domain_specific"]["params"], task
        # curvature adds parameters on top of the Euclidean twin, and only curvature
        ca, eu = v["ties-CA"], v["ties"]
        assert ca["params"] - eu["params"] == ca["curvature_params"] > 0
        assert eu["curvature_params"] == 0 == v["dense"]["curvature_params"]


@pytest.mark.slow
def test_smoke_writes_markdown_and_progress(smoke):
    out, report, proc = smoke
    md = (out / "quality.md").read_text()
    for name in load_quality().VARIANTS:
        assert f"| {name} |" in md
    assert "ties-CA vs ties" in md and report["meta"]["command"] in md
    assert "[quality] lm" in proc.stderr and "[quality] classify" in proc.stderr


def test_cli_rejects_unknown_names():
    q = load_quality()
    with pytest.raises(SystemExit, match="unknown \\['nope'\\]"):
        q.parse_args(["--variants", "dense,nope"])
    with pytest.raises(SystemExit, match="--tasks"):
        q.parse_args(["--tasks", "translate"])
    args = q.parse_args(["--variants", "dense, dynamic", "--tasks", "classify", "--seeds", "5"])
    assert (args.variants, args.tasks, args.seeds) == (["dense", "dynamic"], ["classify"], 5)


def test_t_test_p_values_match_tables():
    q = load_quality()
    # two-sided 5% critical values of Student's t
    for t, df in ((12.706, 1), (4.303, 2), (2.776, 4), (2.228, 10)):
        assert q.t_two_sided_p(t, df) == pytest.approx(0.05, abs=5e-4)
    assert q.t_two_sided_p(0.0, 2) == pytest.approx(1.0)
    assert q.t_two_sided_p(-4.303, 2) == pytest.approx(0.05, abs=5e-4)


def test_sign_flip_test_is_exact():
    q = load_quality()
    # only all-+ and all-- as extreme
    assert q.sign_flip_p([1.0, 2.0, 3.0]) == pytest.approx(2 / 8)
    # observed sum 3; the 8 sign patterns give |sum| 5, 3, 3, 1, 1, 3, 3, 5: six reach 3
    assert q.sign_flip_p([1.0, -1.0, 3.0]) == pytest.approx(6 / 8)
    assert q.sign_flip_p([0.0, 0.0]) == 1.0


def test_paired_comparison_direction_and_counts():
    q = load_quality()
    ca = {0: 10.0, 1: 12.0, 2: 11.0}
    eu = {0: 11.0, 1: 12.5, 2: 11.5, 3: 99.0}  # seed 3 has no CA twin: ignored
    lower = q.paired(ca, eu, higher_better=False)
    assert lower["seeds"] == [0, 1, 2] and lower["diffs"] == [-1.0, -0.5, -0.5]
    assert lower["mean_diff"] == pytest.approx(-2 / 3)
    assert lower["std_diff"] == pytest.approx(math.sqrt(1 / 12))
    assert lower["t"] == pytest.approx((-2 / 3) / (math.sqrt(1 / 12) / math.sqrt(3)))
    assert lower["ca_better_count"] == 3 and lower["min_possible_p_sign_flip"] == 0.25
    assert q.paired(ca, eu, higher_better=True)["ca_better_count"] == 0
