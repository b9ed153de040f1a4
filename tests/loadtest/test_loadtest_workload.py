"""Workload construction: mix weights, length distributions, prompt files, per-request seeds."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from loadtest.workload import LengthDist, build_workload, load_prompts, parse_mix


def test_parse_mix_normalises_and_rejects_unknown_kinds():
    assert parse_mix("stream=3,classify=1") == {"stream": 0.75, "classify": 0.25}
    assert parse_mix("generate") == {"generate": 1.0}
    assert parse_mix("stream=1,generate=0") == {"stream": 1.0}
    for bad in ("chat=1", "stream=-1", "stream=0", "stream=x"):
        with pytest.raises(ValueError):
            parse_mix(bad)


def test_mix_fractions_follow_the_weights():
    n = 6000
    specs = build_workload(n, parse_mix("stream=0.6,generate=0.3,classify=0.1"), seed=3,
                           prompt_len=LengthDist.parse("4"))
    for kind, p in (("stream", 0.6), ("generate", 0.3), ("classify", 0.1)):
        count = sum(s.kind == kind for s in specs)
        assert abs(count / n - p) < 4 * math.sqrt(p * (1 - p) / n)


def test_length_distributions():
    rng = np.random.default_rng(0)
    assert LengthDist.parse("fixed:12").sample(3, rng) == [12, 12, 12]
    u = LengthDist.parse("uniform:2:5").sample(2000, rng)
    assert min(u) == 2 and max(u) == 5
    g = LengthDist.parse("normal:3:10").sample(2000, rng)
    assert min(g) >= 1
    for bad in ("0", "uniform:5:2", "normal:10", "zipf:1:2", "abc"):
        with pytest.raises(ValueError):
            LengthDist.parse(bad)


def test_synthetic_prompts_have_the_requested_word_counts_and_seeds():
    specs = build_workload(20, {"stream": 1.0}, prompt_len=LengthDist.parse("uniform:3:9"),
                           max_new_tokens=LengthDist.parse("7"), seed=11)
    assert all(3 <= len(s.prompt.split()) <= 9 for s in specs)
    assert [s.seed for s in specs] == list(range(11, 31))
    assert all(s.max_new_tokens == 7 for s in specs)
    assert specs == build_workload(20, {"stream": 1.0}, prompt_len=LengthDist.parse("uniform:3:9"),
                                   max_new_tokens=LengthDist.parse("7"), seed=11)
    assert all(s.seed is None for s in build_workload(3, {"stream": 1.0}, seed=None))


def test_jsonl_rows_override_kind_and_max_new_tokens_and_cycle(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [{"prompt": "a"}, {"inputs": "b", "kind": "classify"},
            {"text": "c", "max_new_tokens": 3}, "d"]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    specs = build_workload(6, {"generate": 1.0}, load_prompts(path),
                           max_new_tokens=LengthDist.parse("9"))
    assert [s.prompt for s in specs] == ["a", "b", "c", "d", "a", "b"]
    assert [s.kind for s in specs] == ["generate", "classify", "generate", "generate", "generate",
                                       "classify"]
    assert [s.max_new_tokens for s in specs] == [9, 9, 3, 9, 9, 9]


def test_text_prompt_file_and_bad_files(tmp_path):
    (tmp_path / "p.txt").write_text("first prompt\n\nsecond one\n")
    assert [r.text for r in load_prompts(tmp_path / "p.txt")] == ["first prompt", "second one"]
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="no prompts"):
        load_prompts(tmp_path / "empty.txt")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"nope": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        load_prompts(tmp_path / "bad.jsonl")
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="broken.jsonl:1: invalid JSON"):
        load_prompts(tmp_path / "broken.jsonl")
