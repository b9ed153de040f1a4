"""ensure_demo_models: builds what is missing (LM first, classifier on the LM's tokenizer), then
reuses it. The real presets take minutes, so they are swapped for tiny ones on local text."""

from __future__ import annotations

from dataclasses import replace

import pytest
from transformers import AutoTokenizer

from camex_runtime import load_folded
from camex_runtime.training import demo, presets

from .conftest import tiny_config


@pytest.fixture
def tiny_presets(monkeypatch, tmp_path, corpus_dir, labeled_jsonl):
    def lm(**kw):
        return replace(tiny_config(tmp_path / "unused", [str(corpus_dir)], steps=2), **kw)

    def clf(**kw):
        return replace(tiny_config(tmp_path / "unused", [str(labeled_jsonl)], task="classify",
                                   steps=2), **kw)

    monkeypatch.setitem(presets.PRESETS, "demo-lm", lm)
    monkeypatch.setitem(presets.PRESETS, "demo-classifier", clf)


def test_ensure_demo_models_builds_once_then_reuses(tmp_path, tiny_presets, monkeypatch):
    root = tmp_path / "demo"
    lm_dir, clf_dir = demo.ensure_demo_models(root, progress=False)
    assert (lm_dir, clf_dir) == (root / "demo-lm", root / "demo-classifier")
    assert load_folded(lm_dir).kind == "causal-lm"
    clf = load_folded(clf_dir)
    assert clf.kind == "classifier" and clf.config.id2label == {0: "fruit", 1: "vehicles"}
    assert AutoTokenizer.from_pretrained(clf_dir).get_vocab() == \
        AutoTokenizer.from_pretrained(lm_dir).get_vocab()        # the LM's tokenizer, reused
    assert (root / "runs" / "demo-lm" / "loss_curve.png").is_file()

    def no_training(cfg):
        raise AssertionError(f"retrained {cfg.out_dir}")

    monkeypatch.setattr("camex_runtime.training.loop.train", no_training)
    assert demo.ensure_demo_models(root, progress=False) == (lm_dir, clf_dir)


def test_missing_classifier_is_rebuilt_from_the_folded_lm(tmp_path, tiny_presets, monkeypatch):
    root = tmp_path / "demo"
    demo.ensure_demo_models(root, progress=False)
    # What the Docker image ships: folded checkpoints only, training runs deleted.
    import shutil
    shutil.rmtree(root / "runs")
    shutil.rmtree(root / "demo-classifier")
    monkeypatch.setenv("CAMEX_DEMO_DIR", str(root))
    lm_dir, clf_dir = demo.ensure_demo_models(progress=False)
    assert load_folded(clf_dir).kind == "classifier"
    assert not (root / "runs" / "demo-lm").exists()  # the LM was not retrained
