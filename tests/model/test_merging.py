"""Curvature operator, merge masks, merge formula and the Dynamic-Merg chain."""

import pytest
import torch

from camex_runtime.merging import (KroneckerCurvature, dare_mask, explicit_apply, factor_pair,
                                   merge_experts, merge_mask, next_dynamic_base, ties_mask)


def test_factor_pair_closest_to_sqrt():
    assert factor_pair(768) == (24, 32)
    assert factor_pair(3072) == (48, 64)
    assert factor_pair(13) == (1, 13)


@pytest.mark.parametrize("rank", [1, 2])
@pytest.mark.parametrize("shape", [(6, 8), (12, 10)])
def test_kronecker_operator_matches_explicit_kron(rank, shape):
    torch.manual_seed(0)
    curv = KroneckerCurvature(3, *shape, rank=rank)
    with torch.no_grad():
        for p in curv.parameters():
            p.copy_(torch.randn_like(p))
    tau = torch.randn(3, *shape)
    torch.testing.assert_close(curv(tau), explicit_apply(curv, tau), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_curvature_is_identity_at_init(rank):
    curv = KroneckerCurvature(4, 12, 20, rank=rank)
    tau = torch.randn(4, 12, 20)
    out = curv(tau)
    if rank == 1:
        assert torch.equal(out, tau)
    else:  # symmetry-breaking noise enters only at O(noise²)
        torch.testing.assert_close(out, tau, rtol=0, atol=1e-4)
        assert curv.A[:, 1:].abs().max() > 0  # the extra terms are not dead


def test_ties_sign_election_and_trim():
    tau = torch.tensor([[[3.0, -1.0, 0.5, -2.0]],
                        [[1.0, 2.0, -4.0, -1.0]],
                        [[-1.0, 2.0, 0.5, 1.0]]])           # (E=3, 1, 4)
    m = ties_mask(tau)
    elected = torch.sign(tau.sum(0))                          # [+, +, -, -]
    assert torch.equal(m.bool(), torch.sign(tau) == elected)
    trimmed = ties_mask(tau, density=0.5)                     # top-2 |τ| per expert first
    keep = torch.zeros_like(tau, dtype=torch.bool)
    for e in range(3):
        keep[e, 0, tau[e, 0].abs().topk(2).indices] = True
    elected_t = torch.sign((tau * keep).sum(0))
    assert torch.equal(trimmed.bool(), keep & (torch.sign(tau) == elected_t))


def test_dare_identity_in_eval_and_unbiased_in_training():
    tau = torch.randn(4, 16, 16)
    assert merge_mask("dare", tau, training=False, dare_p=0.5) is None
    torch.manual_seed(0)
    masks = torch.stack([merge_mask("dare", tau, training=True, dare_p=0.3) for _ in range(400)])
    vals = masks.unique()
    assert len(vals) == 2 and vals[0] == 0 and abs(vals[1].item() - 1 / 0.7) < 1e-6
    assert abs(masks.mean().item() - 1.0) < 0.02            # E[mask] = 1
    drop_rate = (masks == 0).float().mean().item()
    assert abs(drop_rate - 0.3) < 0.02
    assert dare_mask(tau.shape, 0.0, "cpu", torch.float32).eq(1).all()


def test_merge_experts_formula_and_out_buffer():
    base, deltas, s = torch.randn(5, 7), torch.randn(3, 5, 7), torch.softmax(torch.randn(4, 3), -1)
    ref = torch.stack([base + 0.5 * sum(s[r, i] * deltas[i] for i in range(3)) for r in range(4)])
    torch.testing.assert_close(merge_experts(base, deltas, s, 0.5), ref)
    buf = torch.empty(4, 5, 7)
    out = merge_experts(base, deltas, s, 0.5, out=buf)
    assert out.data_ptr() == buf.data_ptr()
    torch.testing.assert_close(buf, ref)


def test_dynamic_base_chain_formula():
    base, deltas = torch.randn(6, 4), torch.randn(5, 6, 4)
    torch.testing.assert_close(next_dynamic_base(base, deltas, 0.8), base + 0.8 / 5 * deltas.sum(0))
