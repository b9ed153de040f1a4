"""Training-form model: routing rules, causality, dynamic chain, gradients, upcycling."""

import pytest
import torch

from camex_runtime import CamexConfig, CamexForCausalLM, CamexForSequenceClassification
from camex_runtime.merging import next_dynamic_base
from camex_runtime.modeling import route_scores


def tiny(**kw):
    base = dict(vocab_size=61, d_model=32, n_layer=2, n_head=4, d_ff=48, max_position_embeddings=64,
                num_experts=3, segment_len=4, curvature_rank=1)
    return CamexConfig(**{**base, **kw})


def spread(model, scale=0.05):
    """Move experts/curvature/routers off their init so routing changes outputs."""
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".experts." in n or ".curvature." in n:
                p.add_(torch.randn_like(p) * scale)
            if ".router." in n:
                p.mul_(30)
    return model


def test_segment_routing_uses_previous_segment_mean():
    torch.manual_seed(0)
    m = spread(CamexForCausalLM(tiny(n_layer=1))).eval()
    ids = torch.randint(0, 61, (1, 10))
    out = m(ids, route1_len=3)
    scores = out.router_scores[0]                                  # (1, K=3, E)
    # Recompute the FFN inputs of layer 0 by hand.
    t = m.transformer
    x = t.wte(ids) + t.wpe(torch.arange(10))
    x = x + t.h[0].attn(t.h[0].ln_1(x), causal=True)
    h = t.h[0].ln_2(x)
    W = t.h[0].ffn.router.weight
    torch.testing.assert_close(scores[0, 0], route_scores(W, h[0, :3].mean(0)))
    torch.testing.assert_close(scores[0, 1], route_scores(W, h[0, 0:4].mean(0)))
    torch.testing.assert_close(scores[0, 2], route_scores(W, h[0, 4:8].mean(0)))
    # prompt mode: one decision from the prompt mean
    p = m(ids, routing="prompt", prompt_len=6).router_scores[0]
    assert p.shape == (1, 1, 3)
    torch.testing.assert_close(p[0, 0], route_scores(W, h[0, :6].mean(0)))


@pytest.mark.parametrize("dynamic", [False, True])
def test_causality_after_first_segment(dynamic):
    torch.manual_seed(0)
    m = spread(CamexForCausalLM(tiny(dynamic=dynamic))).eval()
    T = m.config.segment_len
    ids = torch.randint(0, 61, (1, 17))
    ref = m(ids).logits
    for t in range(T, 17):
        changed = ids.clone()
        changed[0, t] = (changed[0, t] + 7) % 61
        got = m(changed).logits
        assert torch.equal(got[0, :t], ref[0, :t]), f"position < {t} changed"
        assert not torch.allclose(got[0, t:], ref[0, t:])


def test_first_segment_routes_on_itself():
    """By design segment 1 is not causal inside itself: a later token of segment 1 moves
    the routing of earlier ones (documented, docs/DESIGN.md §2)."""
    torch.manual_seed(0)
    m = spread(CamexForCausalLM(tiny())).eval()
    ids = torch.randint(0, 61, (1, 8))
    changed = ids.clone()
    changed[0, 3] = (changed[0, 3] + 5) % 61
    assert not torch.allclose(m(changed).logits[0, :3], m(ids).logits[0, :3])


def test_dynamic_only_first_layer_owns_base_and_chain_matches():
    torch.manual_seed(0)
    m = spread(CamexForCausalLM(tiny(dynamic=True, n_layer=3, alpha=0.7))).eval()
    ffns = [b.ffn for b in m.transformer.h]
    assert ffns[0].base is not None and ffns[1].base is None and ffns[2].base is None
    dense = CamexForCausalLM(tiny(dynamic=False, n_layer=3))
    n_dyn = sum(p.numel() for p in m.parameters())
    n_full = sum(p.numel() for p in dense.parameters())
    assert n_dyn < n_full
    banks = m.transformer.expert_banks()
    for i in (1, 2):
        prev = banks[i - 1]
        torch.testing.assert_close(banks[i].fc1.base_weight,
                                   next_dynamic_base(prev.fc1.base_weight, prev.fc1.delta_weight,
                                                     0.7))
        torch.testing.assert_close(banks[i].fc2.base_bias,
                                   next_dynamic_base(prev.fc2.base_bias, prev.fc2.delta_bias, 0.7))
        # and τ of layer i is measured from the derived base
        tau = ffns[i].experts.fc1.weight - banks[i].fc1.base_weight
        torch.testing.assert_close(banks[i].fc1.delta_weight, ffns[i].curvature["fc1"](tau))


@pytest.mark.parametrize("method", ["ties", "dare"])
def test_dynamic_chain_sums_unmasked_curvature_deltas(method):
    """E_m^{l+1} = E_m^l + α/E Σ_i M_i(τ_i): the chain sees M(τ) before the ties/dare mask, so a
    mask (and dare's training-time dropout) never reaches later layers' bases."""
    torch.manual_seed(0)
    m = spread(CamexForCausalLM(tiny(dynamic=True, n_layer=2, alpha=0.7, merge_method=method,
                                     ties_density=0.5, dare_p=0.5))).train()
    banks = m.transformer.expert_banks()
    ffn0 = m.transformer.h[0].ffn
    tau = ffn0.experts.fc1.weight - banks[0].fc1.base_weight
    unmasked = ffn0.curvature["fc1"](tau)
    assert not torch.allclose(banks[0].fc1.delta_weight, unmasked)  # the mask did act
    torch.testing.assert_close(banks[1].fc1.base_weight,
                               next_dynamic_base(banks[0].fc1.base_weight, unmasked, 0.7))
    tau_b = ffn0.experts.fc2.bias - banks[0].fc2.base_bias
    torch.testing.assert_close(banks[1].fc2.base_bias,
                               next_dynamic_base(banks[0].fc2.base_bias, tau_b, 0.7))


def test_segment_one_scores_are_stop_gradient_in_training():
    """s_0 = DETACH(G(h̄_1)): with a single segment the router learns nothing in training."""
    torch.manual_seed(0)
    m = spread(CamexForCausalLM(tiny(n_layer=1))).train()
    ids = torch.randint(0, 61, (2, 4))  # T=4: one segment
    m(ids, labels=ids).loss.backward()
    router = m.transformer.h[0].ffn.router.weight
    assert router.grad is None or torch.count_nonzero(router.grad) == 0
    m.zero_grad()
    ids = torch.randint(0, 61, (2, 9))  # three segments: segments 2-3 train the router
    m(ids, labels=ids).loss.backward()
    assert router.grad is not None and router.grad.abs().sum() > 0


def test_gradients_reach_curvature_routers_and_experts():
    torch.manual_seed(0)
    m = spread(CamexForCausalLM(tiny(curvature_rank=2, dynamic=True, n_layer=3))).train()
    ids = torch.randint(0, 61, (2, 13))
    m(ids, labels=ids).loss.backward()
    for name, p in m.named_parameters():
        if any(k in name for k in (".curvature.", ".router.", ".experts.", ".base.")):
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_segment_one_mean_is_stop_gradient_in_training():
    torch.manual_seed(0)
    m = spread(CamexForCausalLM(tiny(n_layer=1))).train()
    ids = torch.randint(0, 61, (1, 4))  # one segment: its routing gets no gradient through the mean
    m(ids, labels=ids).loss.backward()
    emb_grad_routing_free = m.transformer.wte.weight.grad.clone()
    m.zero_grad()
    m.eval()  # eval: no stop-gradient, the mean carries gradient to the embeddings
    m(ids, labels=ids).loss.backward()
    assert not torch.allclose(emb_grad_routing_free, m.transformer.wte.weight.grad)


def test_dense_baseline_trains_through_same_code():
    m = CamexForCausalLM(tiny(num_experts=0))
    assert not any(b.is_moe for b in m.transformer.h)
    ids = torch.randint(0, 61, (2, 9))
    loss = m(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)


@pytest.mark.parametrize("problem_type,labels", [
    ("single_label_classification", torch.tensor([0, 2])),
    ("multi_label_classification", torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])),
    ("regression", torch.tensor([0.5, -1.0])),
])
def test_classifier_problem_types_and_padding_invariance(problem_type, labels):
    torch.manual_seed(0)
    n = 1 if problem_type == "regression" else 3
    m = spread(CamexForSequenceClassification(tiny(num_labels=n, problem_type=problem_type))).eval()
    ids = torch.randint(0, 61, (2, 9))
    out = m(ids, attention_mask=torch.ones_like(ids),
            labels=labels[:, :n] if labels.dim() == 2 else labels)
    assert out.logits.shape == (2, n) and torch.isfinite(out.loss)
    # padding must not change a sequence's result (masked attention, pooling and routing)
    padded = torch.cat([ids, torch.zeros(2, 5, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(2, 9), torch.zeros(2, 5)], 1).long()
    torch.testing.assert_close(m(padded, attention_mask=mask).logits, out.logits,
                               rtol=1e-5, atol=1e-5)


def test_lm_rejects_padded_batches():
    m = CamexForCausalLM(tiny())
    ids = torch.randint(0, 61, (2, 5))
    with pytest.raises(ValueError, match="unpadded"):
        m(ids, attention_mask=torch.tensor([[1, 1, 1, 0, 0]] * 2))


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="merge_method"):
        tiny(merge_method="average")
    with pytest.raises(ValueError, match="n_head"):
        tiny(n_head=5)
    with pytest.raises(ValueError, match="moe_layers"):
        tiny(moe_layers=[7])
