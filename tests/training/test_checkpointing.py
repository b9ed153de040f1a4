"""Training checkpoints: validated resume, crash-safe saves, world size, and export targets."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from safetensors.torch import load_file, save_file

import camex_runtime.training.state as state_module
from camex_runtime.training import train
from camex_runtime.training.checkpointing import check_resumable
from camex_runtime.training.state import ResumeError, has_checkpoint

from .conftest import tiny_config


def test_resume_refuses_weights_with_a_missing_tensor(tmp_path, corpus_dir):
    cfg = tiny_config(tmp_path / "run", [str(corpus_dir)], steps=2)
    train(cfg)
    weights = tmp_path / "run" / "model.safetensors"
    tensors = load_file(weights)
    name = "transformer.h.0.attn.c_attn.weight"
    del tensors[name]  # transformers alone would re-initialise it at random and carry on
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ResumeError, match=rf"missing tensors \['{name}'\]"):
        train(replace(cfg, resume=True, steps=3))


def test_a_save_that_fails_midway_leaves_no_complete_checkpoint(tmp_path, corpus_dir, monkeypatch):
    cfg = tiny_config(tmp_path / "run", [str(corpus_dir)], steps=2)
    train(cfg)
    assert has_checkpoint(cfg.out_dir)

    def crash(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(state_module, "save_file", crash)  # the optimizer file, after the weights
    with pytest.raises(OSError, match="disk full"):
        train(replace(cfg, resume=True, steps=3))
    assert not has_checkpoint(cfg.out_dir)  # new weights must not pair with the old step
    with pytest.raises(ResumeError, match="no complete training checkpoint"):
        state_module.load_training_state(cfg.out_dir, None, None)


def test_world_size_is_recorded_and_a_mismatch_refused(tmp_path, corpus_dir):
    cfg = tiny_config(tmp_path / "run", [str(corpus_dir)], steps=2)
    train(cfg)
    doc = json.loads((tmp_path / "run" / "trainer_state.json").read_text())
    assert doc["trainer"]["world_size"] == 1
    saved = doc["config"]
    check_resumable(saved, cfg, saved_world_size=1, world_size=1)
    check_resumable(saved, cfg, saved_world_size=None, world_size=2)  # older checkpoints: unknown
    with pytest.raises(ResumeError, match=r"world_size 2 != 1 .*--nproc_per_node 2"):
        check_resumable(saved, cfg, saved_world_size=2, world_size=1)


@pytest.mark.parametrize("where", ["out_dir", "parent", "unrelated"])
def test_export_dir_that_would_destroy_data_is_refused_before_training(tmp_path, corpus_dir, where):
    out, notes = tmp_path / "run", tmp_path / "notes"
    cfg = tiny_config(out, [str(corpus_dir)], steps=2)
    train(cfg)
    notes.mkdir()
    (notes / "keep.txt").write_text("mine")
    export_dir = {"out_dir": out, "parent": tmp_path, "unrelated": notes}[where]
    with pytest.raises(FileExistsError, match="export_dir"):
        train(replace(cfg, resume=True, steps=3, export_dir=str(export_dir)))
    assert (notes / "keep.txt").read_text() == "mine"
    assert json.loads((out / "trainer_state.json").read_text())["trainer"]["step"] == 2


def test_export_replaces_the_previous_export_on_retrain(tmp_path, corpus_dir):
    cfg = tiny_config(tmp_path / "run", [str(corpus_dir)], steps=2,
                      export_dir=str(tmp_path / "folded"))
    assert train(cfg).export_dir == str(tmp_path / "folded")
    assert train(replace(cfg, overwrite=True)).export_dir == str(tmp_path / "folded")
    assert json.loads((tmp_path / "folded" / "config.json").read_text())["folded"] is True
