"""Sparse-MoE checkpoints (Mixtral, Qwen3-MoE, OLMoE) imported as CAMEx models: each MoE
layer's experts become the merged-expert layer's, their mean its base, the source's gate its
router (the CAMEx paper's Algorithm 1 starts from such a model). Tiny random models built
locally."""

import pytest
import torch
from safetensors import safe_open
from transformers import (MixtralConfig, MixtralForCausalLM, OlmoeConfig, OlmoeForCausalLM,
                          Qwen3MoeConfig, Qwen3MoeForCausalLM)

import camex_runtime as cr
from camex_runtime.upcycle import UpcycleError, dense_reference_error

from tests.dense_models import COMMON, move_off_init, random_ids

N = 4
# top-k weights renormalised to sum to 1 in every source, so that identical experts make the
# source's FFN the expert itself (Mixtral always does; Qwen3-MoE and OLMoE when told)
SOURCES = {
    "mixtral": (MixtralConfig, MixtralForCausalLM, {"num_local_experts": N}, "block_sparse_moe",
                {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}),
    "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM,
                  {"num_experts": N, "moe_intermediate_size": 48, "norm_topk_prob": True},
                  "mlp", {}),
    "olmoe": (OlmoeConfig, OlmoeForCausalLM, {"num_experts": N, "norm_topk_prob": True},
              "mlp", {}),
}


@torch.no_grad()
def build_sparse(out_dir, kind: str, identical: bool = False, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config_cls, model_cls, extra, _, _ = SOURCES[kind]
    model = model_cls(config_cls(**{**COMMON, "num_experts_per_tok": 2, **extra,
                                    **overrides})).eval()
    move_off_init(model)
    for layer in model.model.layers:
        experts = layer.mlp.experts  # (saved under Mixtral's historical names)
        for p in experts.parameters():  # (E, ...): off the init's shared scale, or all equal
            p.copy_(p[:1].expand_as(p).clone() if identical else p + torch.randn_like(p) * 0.05)
    model.save_pretrained(out_dir)
    return out_dir


@pytest.mark.parametrize("kind", sorted(SOURCES))
def test_the_sources_experts_router_and_their_mean_as_base(tmp_path, kind):
    src = build_sparse(tmp_path / kind, kind)
    model = cr.upcycle_from_dense(src, segment_len=4)
    cfg = model.config
    assert cfg.num_experts == N and cfg.moe_layers == [0, 1] and cfg.family == "llama"
    moe, names = SOURCES[kind][3], SOURCES[kind][4]
    with safe_open(str(src / "model.safetensors"), framework="pt") as f:
        for i, block in enumerate(model.transformer.h):
            ffn = block.ffn
            gate = f.get_tensor(f"model.layers.{i}.{moe}.gate.weight")
            assert torch.equal(ffn.router.weight, gate)
            for proj in ("gate_proj", "up_proj", "down_proj"):
                theirs = torch.stack([f.get_tensor(
                    f"model.layers.{i}.{moe}.experts.{j}.{names.get(proj, proj)}.weight")
                    for j in range(N)])
                assert torch.equal(getattr(ffn.experts, proj).weight, theirs)
                torch.testing.assert_close(getattr(ffn.base, proj).weight, theirs.mean(0))


@pytest.mark.parametrize("kind", sorted(SOURCES))
def test_with_identical_experts_the_import_is_the_source(tmp_path, kind):
    """Any router merges identical experts into that expert, and the source's renormalised
    top-k mixes them into it too: the two models are then the same one, which checks every
    other tensor's place (attention, q/k norms of each family, norms, head)."""
    src = build_sparse(tmp_path / kind, kind, identical=True)
    model = cr.upcycle_from_dense(src, segment_len=4)
    assert dense_reference_error(model, src, random_ids(30, seed=5, batch=2)) <= 1e-5


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_a_sparse_classifier_source_imports_as_a_classifier(tmp_path, kind):
    """Mixtral's and Qwen3-MoE's *ForSequenceClassification: the experts as the LM's, the
    source's score head and last-token pooling; with identical experts, the source's scores."""
    import transformers

    config_cls, model_cls, extra, _, _ = SOURCES[kind]
    labels = {0: "neg", 1: "pos", 2: "neutral"}
    clf_cls = getattr(transformers, model_cls.__name__.replace("ForCausalLM",
                                                               "ForSequenceClassification"))
    torch.manual_seed(0)
    model = clf_cls(config_cls(**COMMON, num_experts_per_tok=2, **extra, num_labels=3,
                               id2label=labels, label2id={v: k for k, v in labels.items()}))
    with torch.no_grad():
        move_off_init(model)
        for layer in model.model.layers:
            for p in layer.mlp.experts.parameters():
                p.copy_(p[:1].expand_as(p).clone())
    model.eval().save_pretrained(tmp_path / kind)
    camex = cr.upcycle_from_dense(tmp_path / kind, segment_len=4)
    assert isinstance(camex, cr.CamexForSequenceClassification)
    assert camex.config.num_experts == N and camex.config.id2label == labels
    assert torch.equal(camex.score.weight, model.score.weight)
    assert dense_reference_error(camex, tmp_path / kind, random_ids(12, seed=5, batch=2)) <= 1e-5


def test_distinct_experts_give_a_merged_model_not_the_source(tmp_path):
    """With distinct experts the merged FFN (weights averaged by the router) is not the
    source's top-k mixture of outputs: the import is a starting point, and says so."""
    src = build_sparse(tmp_path / "m", "mixtral")
    model = cr.upcycle_from_dense(src, segment_len=4)
    assert dense_reference_error(model, src, random_ids(30, seed=5, batch=2)) > 1e-4
    folded = tmp_path / "folded"
    cr.export(model.eval(), folded)
    engine = cr.Engine.from_pretrained(folded)
    try:
        assert len(engine.generate([5, 6, 7], max_new_tokens=4, ignore_eos=True).token_ids) == 4
    finally:
        engine.stop()


@pytest.mark.parametrize("override,needle", [
    ({"num_experts": 3}, "the source has 4 experts per MoE layer"),
    ({"moe_layers": [1]}, "every layer of the source is a MoE layer"),
    ({"dynamic": True}, "Dynamic-Merg derives"),
])
def test_what_a_sparse_source_fixes_cannot_be_overridden(tmp_path, override, needle):
    src = build_sparse(tmp_path / "m", "mixtral")
    with pytest.raises(UpcycleError, match=needle):
        cr.upcycle_from_dense(src, segment_len=4, **override)
    assert cr.upcycle_from_dense(src, segment_len=4, num_experts=N,
                                 moe_layers=[0, 1]).config.num_experts == N
