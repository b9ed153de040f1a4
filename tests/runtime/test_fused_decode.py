"""The fused decode step (engine/fused_decode.py: each block's attention half and FFN half in one
native call) computes what the model's block loop computes, for every family, with dense and
merged-expert layers, in fp32 and with 16-bit weights; and it stands aside where it does not
apply. The engine-level contracts (incremental == full forward, batched == alone) run through
it too wherever the native kernels exist: tests/runtime/test_engine_*.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import camex_runtime as cr
from camex_runtime import Engine, kernels
from camex_runtime.config import CamexConfig
from camex_runtime.engine.fused_decode import FusedDecode
from camex_runtime.engine.moe import apply_merged
from camex_runtime.engine.precision import Precision, ServingFFN, prepare
from camex_runtime.layers import GELU_FFN, SWIGLU_FFN, DenseFFN, RMSNorm, swigluoai_hidden
from engine_models import build_folded
from tests.dense_models import FAMILIES, SPARSE, build_dense, spread

needs_native = pytest.mark.skipif(kernels.native() is None,
                                  reason=f"no native kernels here: {kernels.status()}")


@pytest.fixture(scope="module", params=["gpt2", *sorted(FAMILIES)])
def checkpoint(request, tmp_path_factory):
    """Layer 0 dense, layer 1 merged-expert: both halves of the fused step."""
    out = tmp_path_factory.mktemp("fused") / request.param
    if request.param == "gpt2":
        return build_folded(out, moe_layers=[1])
    dense = build_dense(out.parent / f"{out.name}-dense", request.param)
    layers = None if request.param in SPARSE else [1]  # (a sparse source's: every one)
    model = spread(cr.upcycle_from_dense(dense, num_experts=3, segment_len=4, moe_layers=layers))
    cr.export(model.eval(), out)
    return out


def ids(n: int, seed: int, vocab: int) -> list[int]:
    """Token ids above the special ones (0-2 in the family models, EOS last in gpt2's)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab - 1, (n,), generator=g).tolist()


def runner(path, dtype, fused: bool, slots: int = 4, strategy: str = "merged"):
    """A strategy fixed, never `auto`: `auto` chooses by timing its probes at load, so two
    engines on a busy machine (pytest workers side by side) can choose differently and differ
    by more than the kernels' rounding in 16-bit weights (a merged FFN rounded to bf16 against
    the mixture of its experts)."""
    r = Engine.from_pretrained(path, dtype=dtype, max_batch_size=slots,
                               strategy=strategy).runner
    if not fused:
        r.fused = None
    return r


@needs_native
@pytest.mark.parametrize("strategy", ["merged", "mixture"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_step_equals_the_block_loop(checkpoint, dtype, strategy):
    """The fused step and the block loop differ in the last bits of attention and norms, so a
    merge opened mid-decode sees routing scores a bit apart; with 16-bit weights the merged
    entry is rounded to bf16, and an element near a rounding boundary may land one bf16 step
    (up to 2^-7 relative) apart, which moves logits by ~1e-4: merged entries are held to 1e-6
    (fp32) and one bf16 step per element, the logits to 1e-4 (fp32) and 1e-3 (bf16)."""
    fused = runner(checkpoint, dtype, True, strategy=strategy)
    loop = runner(checkpoint, dtype, False, strategy=strategy)
    assert fused.fused is not None and fused.dtype == torch.float32
    prompts = [ids(n, n, fused.cfg.vocab_size) for n in (3, 6, 9)]  # ragged positions
    for r in (fused, loop):
        for slot, p in enumerate(prompts):
            r.prefill(slot, p, "segment")
    histories = [list(p) for p in prompts]
    tokens = [p[-1] for p in prompts]
    for _ in range(9):  # crosses segment boundaries (T = 4): merges open mid-decode
        with torch.no_grad():
            got = fused.decode([0, 1, 2], tokens, histories)
            want = loop.decode([0, 1, 2], tokens, histories)
        tol = 1e-4 if dtype == "float32" else 1e-3
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
        assert fused.cache._entries.keys() == loop.cache._entries.keys()
        for key, entry in fused.cache._entries.items():  # merged weights, a rounding apart
            for part, w in fused.cache.weights(entry.slot).items():
                torch.testing.assert_close(
                    w.float(), loop.cache.weights(loop.cache._entries[key].slot)[part].float(),
                    rtol=0 if dtype == "float32" else 2 ** -7, atol=1e-6)
        tokens = got.argmax(-1).tolist()
        assert tokens == want.argmax(-1).tolist()
        for h, t in zip(histories, tokens):
            h.append(t)
    n = max(len(h) for h in histories)
    torch.testing.assert_close(fused.kv.k[:, :3, :, :n], loop.kv.k[:, :3, :, :n],
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused.kv.v[:, :3, :, :n], loop.kv.v[:, :3, :, :n],
                               rtol=1e-4, atol=1e-5)


@needs_native
def test_batches_beyond_the_native_row_limit_use_the_block_loop(checkpoint):
    """More rows than the fused step takes (16 with fp32 weights): the model's block loop
    (torch's GEMM), same results as the fused step gives each row."""
    B = kernels.max_rows(torch.float32) + 1
    big, one = runner(checkpoint, "float32", True, slots=B), runner(checkpoint, "float32", True)
    assert big.fused.max_rows == B - 1
    prompts = [ids(2 + b, b, big.cfg.vocab_size) for b in range(B)]
    for slot, p in enumerate(prompts):
        big.prefill(slot, p, "segment")
    with torch.no_grad():
        batch = big.decode(list(range(B)), [p[-1] for p in prompts], prompts)
        for b, p in enumerate(prompts):
            one.prefill(0, p, "segment")
            alone = one.decode([0], [p[-1]], [p])
            one.release(0)
            torch.testing.assert_close(batch[b:b + 1], alone, rtol=1e-4, atol=1e-4)


@needs_native
def test_fused_step_stands_aside_where_queries_are_scaled(checkpoint):
    """Llama 4's query scale (Ministral 3, from position 12 in the test model) is not in the
    native blocks: a step whose furthest row is at or past it takes the block loop (and the
    equality test above then compares the block loop with itself for those steps)."""
    r = runner(checkpoint, "float32", True)
    start = 12 if checkpoint.name == "ministral3" else None
    assert r.fused.query_scale_from == start
    assert r.fused.serves(3, 11) and r.fused.serves(3, 12) is (start is None)
    assert not r.fused.serves(r.fused.max_rows + 1, 0)


def test_fused_step_stands_aside_where_it_does_not_apply(checkpoint, monkeypatch):
    r = runner(checkpoint, "float32", True)
    assert (r.fused is None) == (kernels.native() is None)
    assert FusedDecode.build(r.model, r.kv, torch.bfloat16) is None  # 16-bit activations
    r.model.train()
    assert FusedDecode.build(r.model, r.kv, torch.float32) is None
    r.model.eval()
    monkeypatch.setattr(kernels, "native", lambda: None)
    assert FusedDecode.build(r.model, r.kv, torch.float32) is None
    assert runner(checkpoint, "float32", True).fused is None


@needs_native
@pytest.mark.parametrize("rms", [False, True])
def test_native_norm_equals_torch(rms):
    torch.manual_seed(0)
    x = torch.randn(5, 96) * 3 + 1
    w, b = torch.randn(96), torch.randn(96)
    if rms:
        ref = RMSNorm(96, 1e-6)
        ref.weight.data = w
        want = ref(x)
    else:
        want = F.layer_norm(x, (96,), w, b, 1e-5)
    got = kernels.native().norm(x, w, None if rms else b, 1e-6 if rms else 1e-5, rms)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_native
@pytest.mark.parametrize("act", ["gelu_tanh", "swiglu", "geglu", "swigluoai"])
def test_ffn_activations_hold_over_the_whole_range(act):
    """GELU's tanh and SiLU's exponential are the kernel's own (exp-based, with clamps): from
    tiny to huge pre-activations they match torch, with no inf or nan; GeGLU (Gemma) puts the
    gate through the same GELU; GPT-OSS's clamped SwiGLU clamps the gate above and the up
    projection both sides at its limit (most of these values cross it) with its own slope."""
    torch.manual_seed(0)
    d, f = 16, 40
    glu = act != "gelu_tanh"
    h = F.layer_norm(torch.randn(3, d), (d,))  # ~ N(0, 1) per row
    # an up projection scaled per row spans 1e-4 .. 1e3
    up = torch.randn(f, d) * torch.logspace(-4, 3, f)[:, None]
    gate = torch.randn(f, d) * torch.logspace(3, -4, f)[:, None] if glu else None
    down = torch.randn(d, f) / f
    w1 = torch.cat([gate, up]) if glu else up  # gated: [gate; up] stacked
    params = (7.0, 1.702) if act == "swigluoai" else ()
    got = kernels.ffn(h, w1, None, down, None, act, params)
    u = h @ up.T
    if act == "gelu_tanh":
        hid = F.gelu(u, approximate="tanh")
    elif act == "swigluoai":
        hid = swigluoai_hidden(*params)([h @ gate.T, u])
    else:
        g = h @ gate.T
        hid = (F.gelu(g, approximate="tanh") if act == "geglu" else F.silu(g)) * u
    want = hid @ down.T
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
    # the hidden function alone (what merge_linear's products go through), per row [gate; up]
    stacked = torch.cat([h @ gate.T, u], 1) if glu else u.clone()
    torch.testing.assert_close(kernels.hidden(stacked, act, params), hid, rtol=1e-4, atol=1e-3)


@needs_native
@pytest.mark.parametrize("act", ["gelu_tanh", "swiglu", "geglu", "swigluoai"])
def test_serving_hidden_gives_every_element_the_same_bits_wherever_it_stands(act):
    """kernels.serving_hidden (prompt rows of any count) matches torch's hidden functions, and
    an element's bits depend neither on its row, nor on the rows beside it, nor on the thread
    count, also in a width that is no multiple of 8 (the last elements of a row go through the
    vector code padded): so prompt rows, decode rows and a batch split over threads agree. A
    gate and an up projection made apart give the bits of the same pair stacked."""
    torch.manual_seed(0)
    f = 1003  # 125 vectors + 3: every row ends in a padded tail, and rows start unaligned
    glu = act != "gelu_tanh"
    params = (7.0, 1.702) if act == "swigluoai" else ()
    gate, up = torch.randn(2, 20, f) * 3, torch.randn(2, 20, f) * 3  # 40 rows: > 1 task
    ins = [gate, up] if glu else [up]
    if act == "gelu_tanh":
        want = F.gelu(up, approximate="tanh")
    elif act == "swigluoai":
        want = swigluoai_hidden(*params)([gate, up])
    else:
        want = (F.gelu(gate, approximate="tanh") if act == "geglu" else F.silu(gate)) * up
    got = kernels.serving_hidden(ins, act, params)
    assert got.shape == (2, 20, f)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(kernels.serving_hidden(ins, act, params), got)
    finally:
        torch.set_num_threads(threads)
    row = lambda t: t[1, 7:8].contiguous()  # noqa: E731 - one row alone
    assert torch.equal(kernels.serving_hidden([row(t) for t in ins], act, params), row(got))
    if glu:  # stacked [gate; up], as a merged expert's fc1 gives them
        stacked = torch.cat([gate, up], -1)
        assert torch.equal(kernels.serving_hidden([stacked], act, params), got)
        assert torch.equal(kernels.hidden(stacked.view(40, 2 * f), act, params), got.view(40, f))
    # where it does not apply, the caller's torch path
    assert kernels.serving_hidden([t.bfloat16() for t in ins], act, params) is None
    assert kernels.serving_hidden([t.transpose(0, 1) for t in ins], act, params) is None
    assert kernels.serving_hidden(ins, "", ()) is None


@needs_native
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_served_dense_ffn_gives_prompt_rows_the_decode_step_bits(family, monkeypatch):
    """precision.prepare puts a dense FFN's hidden function on the kernels: prompt rows through
    the served model's FFN get the bits the decode step's one native FFN call gives the same
    rows (GELU; SwiGLU with gate_proj and up_proj apart, against [gate; up] stacked), close to
    the model code's torch forward; without native kernels it is that forward, bit for bit."""
    torch.manual_seed(0)
    config = CamexConfig(family=family, d_model=24, d_ff=44, n_layer=1, n_head=2,
                         vocab_size=64, num_experts=0)
    ffn = DenseFFN(config)
    for p in ffn.parameters():
        p.data.normal_(0, 0.3)
    x = torch.randn(6, 24)  # decode-sized: the native linear kernel on both sides
    want = ffn(x)
    prepare(ffn, Precision(torch.float32, torch.float32))
    assert type(ffn) is ServingFFN
    got = ffn(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    k = ffn.kind
    w1 = torch.cat([getattr(ffn, p).weight for p in k.in_projs])
    b1s = [getattr(ffn, p).bias for p in k.in_projs]
    b1 = None if b1s[0] is None else torch.cat(b1s)
    out = getattr(ffn, k.out_proj)
    assert torch.equal(kernels.ffn(x, w1, b1, out.weight, out.bias, k.activation, k.params), got)
    assert ffn(x.view(2, 3, 24)).shape == (2, 3, 24)  # the model's (batch, time, d) rows
    monkeypatch.setattr(kernels, "native", lambda: None)
    assert torch.equal(ffn(x), DenseFFN.forward(ffn, x))


@needs_native
@pytest.mark.parametrize("kind", [GELU_FFN, SWIGLU_FFN])
def test_merged_ffn_is_one_native_call_with_the_torch_result(kind, monkeypatch):
    """apply_merged on decode rows and short fp32 prompt segments (kernels.ffn; SwiGLU with
    [gate; up] stacked in fc1) equals its torch path; more rows than kernels.ffn_rows go to
    torch (fp32 weights, bf16 ones with the bf16 dot kernel and 16-bit ones the prompt tiles
    take: merge_linear's rows; other 16-bit weights: the decode kernels')."""
    torch.manual_seed(0)
    d, f = 24, 40
    fused = kind.fused()
    k = len(kind.in_projs)
    w = {"fc1_weight": torch.randn(k * f, d) / 5, "fc1_bias": torch.randn(k * f),
         "fc2_weight": torch.randn(d, f) / 5, "fc2_bias": torch.randn(d)}
    limit = kernels.ffn_rows(torch.float32)
    assert limit == kernels.MERGE_LINEAR_ROWS > kernels.max_rows(torch.float32)
    for dtype in (torch.bfloat16, torch.float16):  # where merge_linear takes prompt rows
        takes = (dtype == torch.bfloat16 and kernels.bf16_dot()) or \
            kernels.tiles_take(dtype, kernels.MERGE_LINEAR_ROWS)
        assert kernels.ffn_rows(dtype) == (kernels.MERGE_LINEAR_ROWS if takes
                                           else kernels.max_rows(dtype))
    x = torch.randn(limit, d)
    got = apply_merged(x, w, fused)
    assert kernels.ffn(torch.randn(limit + 1, d), w["fc1_weight"], None,
                       w["fc2_weight"], None, fused.activation) is None
    monkeypatch.setattr(kernels, "native", lambda: None)
    assert kernels.ffn(x, w["fc1_weight"], None, w["fc2_weight"], None, fused.activation) is None
    torch.testing.assert_close(got, apply_merged(x, w, fused), rtol=1e-5, atol=1e-5)


class _CountingNative:
    """The native module, counting calls by name."""

    def __init__(self, mod):
        self.mod, self.calls = mod, {}

    def __getattr__(self, name):
        fn = getattr(self.mod, name)

        def counted(*args, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            return fn(*args, **kwargs)
        return counted


@needs_native
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_one_native_span_gives_the_bits_of_block_by_block(checkpoint, dtype, monkeypatch):
    """With every row on its merged expert, a decode step is one native `layers` call over all
    blocks (merged-expert ones included: a group per merged expert, segment sums accumulated
    in the call), and gives the bits of the same step with the merged-expert FFNs in Python."""
    span, split = runner(checkpoint, dtype, True), runner(checkpoint, dtype, True)
    split._native_decode_moe = lambda *a: None  # merged-expert layers through moe.apply
    modes = ["segment", "prompt", "segment"]  # the prompt-mode row adds to no segment sum
    prompts = [ids(n, 10 + n, span.cfg.vocab_size) for n in (3, 6, 9)]
    for r in (span, split):
        r.strategy = "merged"
        for slot, (p, mode) in enumerate(zip(prompts, modes)):
            r.prefill(slot, p, mode)
    histories = [list(p) for p in prompts]
    tokens = [p[-1] for p in prompts]
    counting = _CountingNative(kernels.native())
    monkeypatch.setattr(kernels, "native", lambda: counting)
    for _ in range(9):  # crosses segment boundaries (T = 4): merges open mid-decode
        counting.calls.clear()
        last = max(st.length for st in span.slots[:3])  # the step's furthest position
        with torch.no_grad():
            got = span.decode([0, 1, 2], tokens, histories)
        if span.fused.serves(3, last):  # (Ministral 3: below 12)
            assert counting.calls.get("layers") == 1 and "attn_block" not in counting.calls
        else:
            assert "layers" not in counting.calls
        with torch.no_grad():
            want = split.decode([0, 1, 2], tokens, histories)
        assert torch.equal(got, want)
        assert torch.equal(span.seg_sum, split.seg_sum)
        tokens = got.argmax(-1).tolist()
        for h, t in zip(histories, tokens):
            h.append(t)
    assert len({tuple(st.pool_slots) for st in span.slots[:3]}) > 1  # rows in several groups
    n = max(len(h) for h in histories)
    assert torch.equal(span.kv.k[:, :3, :, :n], split.kv.k[:, :3, :, :n])
    assert torch.equal(span.kv.v[:, :3, :, :n], split.kv.v[:, :3, :, :n])


@needs_native
def test_native_span_refuses_malformed_ffn_groups(checkpoint):
    """Rows missing from every group, or in two, are an error, not a silent zero FFN."""
    r = runner(checkpoint, "float32", True)
    f = r.fused
    blk = next((b for b in f.blocks if b.ffn is not None), f.blocks[0])
    i = f.blocks.index(blk)
    x = torch.randn(2, r.cfg.d_model)
    slots, pos = torch.tensor([0, 1]), torch.tensor([0, 0])
    if blk.ffn is not None:
        g, stacked = blk.ffn.groups[0], int(blk.ffn.stacked)
    else:  # every block merged-expert (GPT-OSS): its base expert as the group's FFN
        moe = r.moe[0]
        g, stacked = [None, None, None, moe.w1[0], moe.b1[0], moe.w2[0], moe.b2[0]], 1
    for groups in ([[torch.tensor([0]), *g[1:]]],
                   [[torch.tensor([0, 1]), *g[1:]], [torch.tensor([1]), *g[1:]]]):
        with pytest.raises(RuntimeError, match="FFN groups"):
            kernels.native().layers(
                x, [f._tensors[i]], list(f._eps[i]),
                [*f._flags[i], stacked, -1, 0, 1, blk.gate, 0, 0], [groups], [None], None,
                r.kv.k, r.kv.v, slots, pos, None, None, None, None, *f.heads, None, None, 1e-5,
                False, 0.0, *f.swiglu)


@needs_native
def test_bf16_weights_fuse_up_to_their_own_row_limit(checkpoint):
    """16-bit weights: up to 8 rows (beyond them the CPU's 16-bit GEMM or the prompt tiles are
    faster), not bounded by an fp32 position table, which is only indexed. Batched rows still
    get each row's own result."""
    limit = kernels.MAX_ROWS
    assert limit == kernels.max_rows(torch.bfloat16)
    B = limit + 1
    big = runner(checkpoint, "bfloat16", True, slots=B)
    assert big.fused.max_rows == limit
    prompts = [ids(2 + b, b, big.cfg.vocab_size) for b in range(B)]
    for slot, p in enumerate(prompts):
        big.prefill(slot, p, "segment")
    with torch.no_grad():
        batch = big.decode(list(range(B)), [p[-1] for p in prompts], prompts)
    one = runner(checkpoint, "bfloat16", True)
    for b in (0, B - 1):
        one.prefill(0, prompts[b], "segment")
        with torch.no_grad():
            alone = one.decode([0], [prompts[b][-1]], [prompts[b]])
        one.release(0)
        torch.testing.assert_close(batch[b:b + 1], alone, rtol=2e-2, atol=2e-2)

