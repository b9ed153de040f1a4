"""ensure_demo_models: builds what is missing or was built by other code (LM first, classifier
on the LM's tokenizer), then reuses it; stamps say which code built what. The real presets take
minutes, so they are swapped for tiny ones on local text; one build is shared by the module
and copied into each test that changes it."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
from transformers import AutoTokenizer

from camex_runtime import load_folded
from camex_runtime.training import demo, presets

from .conftest import TOPICS, tiny_config, write_fortune_file


@pytest.fixture(scope="module")
def tiny_presets(tmp_path_factory):
    data = tmp_path_factory.mktemp("demo-data")
    for topic, docs in TOPICS.items():
        write_fortune_file(data / topic, docs * 6)
    labeled = data / "labeled.jsonl"
    labeled.write_text("".join(json.dumps({"text": d, "label": t}) + "\n"
                               for _ in range(6) for t, docs in TOPICS.items() for d in docs))
    unused = data / "unused"

    def lm(**kw):
        return replace(tiny_config(unused, [str(data / t) for t in TOPICS], steps=2), **kw)

    def clf(**kw):
        return replace(tiny_config(unused, [str(labeled)], task="classify", steps=2), **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(presets.PRESETS, "demo-lm", lm)
        mp.setitem(presets.PRESETS, "demo-classifier", clf)
        yield


@pytest.fixture(scope="module")
def built(tiny_presets, tmp_path_factory):
    root = tmp_path_factory.mktemp("built") / "demo"
    demo.ensure_demo_models(root, progress=False)
    return root


@pytest.fixture
def root(built, tmp_path):
    """A private copy of the module's demo build."""
    return shutil.copytree(built, tmp_path / "demo")


def _builds(root):
    return {name: demo.read_stamp(root, name)["build_id"]
            for name in (demo.LM_NAME, demo.CLF_NAME)}


def test_ensure_demo_models_builds_once_then_reuses(root, monkeypatch):
    lm_dir, clf_dir = root / "demo-lm", root / "demo-classifier"
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


def test_missing_classifier_is_rebuilt_from_the_folded_lm(root, monkeypatch):
    # What the Docker image ships: folded checkpoints only, training runs deleted.
    shutil.rmtree(root / "runs")
    shutil.rmtree(root / "demo-classifier")
    monkeypatch.setenv("CAMEX_DEMO_DIR", str(root))
    lm_dir, clf_dir = demo.ensure_demo_models(progress=False)
    assert load_folded(clf_dir).kind == "classifier"
    assert not (root / "runs" / "demo-lm").exists()  # the LM was not retrained


def test_demo_models_are_stamped_with_the_code_that_built_them(root):
    lm, clf = demo.read_stamp(root, demo.LM_NAME), demo.read_stamp(root, demo.CLF_NAME)
    assert lm["demo_format"] == clf["demo_format"] == demo.DEMO_FORMAT
    assert clf["lm_build"] == lm["build_id"]          # which LM the classifier was trained from
    assert lm["commit"] and lm["version"] and lm["built_at"]  # for people: this is a checkout
    assert demo.stale_reason(root, demo.LM_NAME) is None
    assert demo.stale_reason(root, demo.CLF_NAME) is None


def test_a_newer_checkout_rebuilds_older_demos_and_says_why(root, monkeypatch, capsys):
    before = _builds(root)
    monkeypatch.setattr(demo, "DEMO_FORMAT", demo.DEMO_FORMAT + 1)  # the code moved on
    assert "demo_format" in demo.stale_reason(root, demo.LM_NAME)
    demo.ensure_demo_models(root, progress=True)
    after = _builds(root)
    assert after[demo.LM_NAME] != before[demo.LM_NAME]
    assert after[demo.CLF_NAME] != before[demo.CLF_NAME]
    err = capsys.readouterr().err
    assert f"demo_format {demo.DEMO_FORMAT - 1}, this code needs {demo.DEMO_FORMAT}" in err
    assert load_folded(root / demo.CLF_NAME).kind == "classifier"


def test_an_unstamped_demo_is_rebuilt(root, capsys):
    demo.stamp_path(root, demo.CLF_NAME).unlink()      # as built before stamps existed
    demo.ensure_demo_models(root, progress=True)
    assert "built before demo checkpoints were stamped" in capsys.readouterr().err
    assert demo.stale_reason(root, demo.CLF_NAME) is None


def test_a_changed_classifier_preset_rebuilds_only_the_classifier(root, monkeypatch):
    before = _builds(root)
    clf_preset = presets.PRESETS["demo-classifier"]
    monkeypatch.setitem(presets.PRESETS, "demo-classifier",
                        lambda **kw: replace(clf_preset(**kw), steps=3))
    assert "preset" in demo.stale_reason(root, demo.CLF_NAME)
    demo.ensure_demo_models(root, progress=False)
    after = _builds(root)
    assert after[demo.LM_NAME] == before[demo.LM_NAME]
    assert after[demo.CLF_NAME] != before[demo.CLF_NAME]
    assert demo.read_stamp(root, demo.CLF_NAME)["lm_build"] == before[demo.LM_NAME]


def test_a_classifier_from_another_lm_build_is_stale(root):
    """A crash between rebuilding the LM and the classifier must not leave a classifier on the
    old LM's tokenizer next to the new LM."""
    demo.write_stamp(root, demo.LM_NAME)               # a new LM build id, classifier untouched
    assert "lm_build" in demo.stale_reason(root, demo.CLF_NAME)
    assert demo.stale_reason(root, demo.LM_NAME) is None
