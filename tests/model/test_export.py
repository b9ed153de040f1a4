"""Fold equivalence, the export gate, folded checkpoint validation, AutoModel loading, upcycling."""

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, GPT2Config,
                          GPT2LMHeadModel)

import camex_runtime as cr
from camex_runtime.export import load_training_checkpoint, main as export_main

from .test_modeling import spread, tiny


@pytest.mark.parametrize("method", ["domain_specific", "ties", "dare"])
@pytest.mark.parametrize("rank", [0, 2])
@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("kind", ["lm", "classifier"])
def test_fold_equivalence(tmp_path, method, rank, dynamic, kind):
    torch.manual_seed(0)
    cfg = tiny(merge_method=method, curvature_rank=rank, dynamic=dynamic, n_layer=3,
               ties_density=0.6, num_labels=3)
    cls = cr.CamexForCausalLM if kind == "lm" else cr.CamexForSequenceClassification
    model = spread(cls(cfg)).eval()
    report = cr.export(model, tmp_path / "folded")
    assert report.max_rel_error <= 1e-5
    auto = AutoModelForCausalLM if kind == "lm" else AutoModelForSequenceClassification
    folded = auto.from_pretrained(tmp_path / "folded").eval()
    assert folded.config.folded and type(folded) is cls
    assert not any(".curvature." in n for n, _ in folded.named_parameters())
    ids = torch.randint(0, 61, (2, 14))
    if kind == "lm":
        for kw in ({}, {"route1_len": 2}, {"routing": "prompt", "prompt_len": 5}):
            torch.testing.assert_close(folded(ids, **kw).logits, model(ids, **kw).logits,
                                       rtol=1e-5, atol=1e-5)
    else:
        mask = torch.ones_like(ids)
        mask[0, 9:] = 0
        torch.testing.assert_close(folded(ids, attention_mask=mask).logits,
                                   model(ids, attention_mask=mask).logits, rtol=1e-5, atol=1e-5)
    if dynamic:  # every layer's base is materialised in the folded form
        assert all(b.ffn.base is not None for b in folded.transformer.h)


def test_export_writes_format_provenance_and_tokenizer(tiny_lm_dir):
    cfg = json.loads((tiny_lm_dir / "config.json").read_text())
    assert cfg["folded"] is True and cfg["format_version"] == 1 and cfg["model_type"] == "camex"
    assert cfg["provenance"]["training_data"] and cfg["provenance"]["export_max_rel_error"] <= 1e-5
    assert (tiny_lm_dir / "tokenizer.json").is_file()
    assert not list(tiny_lm_dir.glob("*.bin")) and not list(tiny_lm_dir.glob("*.pt"))


def test_export_refuses_and_writes_nothing_when_fold_deviates(tmp_path):
    torch.manual_seed(0)
    model = spread(cr.CamexForCausalLM(tiny(curvature_rank=2))).eval()
    with pytest.raises(cr.ExportError, match="relative logit error"):
        cr.export(model, tmp_path / "out", max_rel_error=0.0)
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []  # no temp leftovers either


def test_export_cli_roundtrip(tmp_path, capsys):
    torch.manual_seed(0)
    model = spread(cr.CamexForCausalLM(tiny()))
    model.save_pretrained(tmp_path / "train")
    assert export_main([str(tmp_path / "train"), str(tmp_path / "folded")]) == 0
    assert "max relative error" in capsys.readouterr().out
    assert cr.load_folded(tmp_path / "folded").kind == "causal-lm"
    # a previous export
    assert export_main([str(tmp_path / "train"), str(tmp_path / "folded")]) == 0
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    assert export_main([str(tmp_path / "train"), str(tmp_path / "notes")]) == 2  # not an export
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    assert export_main([str(tmp_path / "train"), str(tmp_path / "notes"), "--overwrite"]) == 0
    assert not (tmp_path / "notes" / "todo.txt").exists()
    for into in (tmp_path / "train", tmp_path):  # the source itself, or a folder holding it
        assert export_main([str(tmp_path / "train"), str(into), "--overwrite"]) == 2
        assert (tmp_path / "train" / "model.safetensors").is_file()
    assert export_main([str(tmp_path / "folded"), str(tmp_path / "again")]) == 1  # already folded


def test_export_replaces_only_a_previous_export_unless_overwrite(tmp_path):
    torch.manual_seed(0)
    model = spread(cr.CamexForCausalLM(tiny())).eval()
    other = tmp_path / "other"
    other.mkdir()
    (other / "data.txt").write_text("unrelated")
    with pytest.raises(cr.ExportError, match=rf"{other}.*overwrite"):
        cr.export(model, other)
    assert [p.name for p in other.iterdir()] == ["data.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]  # no temp leftovers
    cr.export(model, tmp_path / "folded")
    (tmp_path / "folded" / "stale.txt").write_text("from the previous export")
    cr.export(model, tmp_path / "folded")  # re-export over a previous export: the re-train case
    assert not (tmp_path / "folded" / "stale.txt").exists()
    assert cr.load_folded(tmp_path / "folded").kind == "causal-lm"
    cr.export(model, other, overwrite=True)
    assert not (other / "data.txt").exists() and cr.load_folded(other).kind == "causal-lm"


def test_export_never_replaces_the_checkpoint_it_exports(tmp_path, monkeypatch):
    torch.manual_seed(0)
    run = tmp_path / "run"
    spread(cr.CamexForCausalLM(tiny())).save_pretrained(run / "ckpt")
    model, _ = load_training_checkpoint(run / "ckpt")
    for into in (run / "ckpt", run):
        with pytest.raises(cr.ExportError, match="being exported"):
            cr.export(model, into, overwrite=True)  # source known from from_pretrained
    monkeypatch.chdir(run / "ckpt")
    with pytest.raises(cr.ExportError, match="being exported"):  # `camex-train --export .`
        cr.export(model, ".", source_dir=".")
    assert ((run / "ckpt" / "model.safetensors").is_file()
            and (run / "ckpt" / "config.json").is_file())


def test_training_checkpoint_with_a_missing_tensor_is_refused(tmp_path):
    torch.manual_seed(0)
    spread(cr.CamexForCausalLM(tiny(curvature_rank=2))).save_pretrained(tmp_path / "train")
    tensors = load_file(tmp_path / "train" / "model.safetensors")
    name = next(k for k in sorted(tensors) if ".curvature." in k)
    del tensors[name]
    save_file(tensors, tmp_path / "train" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(cr.ExportError, match=rf"missing tensors \['{re.escape(name)}'\]"):
        load_training_checkpoint(tmp_path / "train")
    assert export_main([str(tmp_path / "train"), str(tmp_path / "folded")]) == 1
    assert not (tmp_path / "folded").exists()
    shape = "transformer.h.0.attn.c_attn.weight"
    tensors[name] = torch.zeros(1)
    tensors[shape] = tensors[shape][:-1].contiguous()
    save_file(tensors, tmp_path / "train" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(cr.ExportError,
                       match=rf"mis-shaped tensors '{shape}' \(95, 32\).*'{re.escape(name)}'"):
        load_training_checkpoint(tmp_path / "train")


def _corrupt(src, dst, edit):
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors")
    return dst


def test_bad_checkpoints_fail_with_the_tensor_named(tiny_lm_dir, tmp_path):
    name = "transformer.h.0.ffn.experts.fc1.weight"
    missing = _corrupt(tiny_lm_dir, tmp_path / "missing", lambda t: t.pop(name))
    with pytest.raises(cr.CheckpointError, match=f"missing tensor '{name}'"):
        cr.load_folded(missing)
    shape = _corrupt(tiny_lm_dir, tmp_path / "shape",
                     lambda t: t.__setitem__(name, t[name][:, :-1].contiguous()))
    with pytest.raises(cr.CheckpointError, match=f"'{name}' has shape"):
        cr.load_folded(shape)

    for value in ("nan", "inf", "-inf"):  # min and max each catch one infinity
        def poison(t, value=value):
            t[name] = t[name].clone()
            t[name][0, 1, 2] = float(value)
        with pytest.raises(cr.CheckpointError, match=f"'{name}' contains NaN or Inf"):
            cr.load_folded(_corrupt(tiny_lm_dir, tmp_path / value, poison))
    with pytest.raises(cr.CheckpointError, match="dtype"):
        cr.load_folded(_corrupt(tiny_lm_dir, tmp_path / "int",
                                lambda t: t.__setitem__(name, t[name].long())))
    with pytest.raises(cr.CheckpointError, match="unexpected tensor 'extra.weight'"):
        cr.load_folded(_corrupt(tiny_lm_dir, tmp_path / "extra",
                                lambda t: t.__setitem__("extra.weight", torch.ones(2))))
    version = tmp_path / "version"
    shutil.copytree(tiny_lm_dir, version)
    cfg = json.loads((version / "config.json").read_text())
    cfg["format_version"] = 99
    (version / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(cr.CheckpointError, match="unknown format_version 99"):
        cr.load_folded(version)
    with pytest.raises(cr.CheckpointError, match="not a directory"):
        cr.load_folded(tmp_path / "nope")
    (tmp_path / "garbage").mkdir()
    shutil.copy(tiny_lm_dir / "config.json", tmp_path / "garbage")
    (tmp_path / "garbage" / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(cr.CheckpointError, match="unreadable safetensors"):
        cr.load_folded(tmp_path / "garbage")


def test_load_folded_casts_dtype(tiny_lm_dir):
    ck = cr.load_folded(tiny_lm_dir, dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in ck.state_dict.values())
    assert ck.tokenizer_dir == tiny_lm_dir


@pytest.mark.parametrize("overrides", [
    {"num_experts": 3, "curvature_rank": 1},
    {"num_experts": 2, "curvature_rank": 2, "merge_method": "ties", "moe_layers": [1]},
    {"num_experts": 3, "dynamic": True},
    {"num_experts": 0},
])
def test_upcycled_model_reproduces_dense_gpt2(tmp_path, overrides):
    torch.manual_seed(0)
    gcfg = GPT2Config(vocab_size=71, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    dense = GPT2LMHeadModel(gcfg).eval()
    dense.save_pretrained(tmp_path / "gpt2")
    model = cr.upcycle_from_dense(tmp_path / "gpt2", segment_len=4, **overrides).eval()
    ids = torch.randint(0, 71, (2, 13))
    with torch.no_grad():
        ref = dense(ids).logits
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=2e-5)
