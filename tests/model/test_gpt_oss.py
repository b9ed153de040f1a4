"""GPT-OSS checkpoints (gpt-oss-20b / -120b shaped, tiny and random, built locally) imported as
CAMEx models: attention sinks, the biased router and the clamped SwiGLU experts in their
places; experts kept interleaved in transformers' (E, in, out) stacks de-interleaved; MXFP4
experts, as OpenAI publishes them, dequantized on reading exactly as transformers does.
The engine contracts on GPT-OSS run in tests/runtime (it is one of dense_models.FAMILIES)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GptOssForCausalLM, Mxfp4Config

import camex_runtime as cr
from camex_runtime.upcycle import FP4_VALUES, UpcycleError, dense_reference_error

from tests.dense_models import COMMON, FAMILIES, build_dense, move_off_init, random_ids

CONFIG_CLS, MODEL_CLS, EXTRA = FAMILIES["gpt_oss"]
EXPERTS = ("gate_up_proj", "down_proj")


@torch.no_grad()
def build_distinct(out_dir, seed: int = 0):
    """A GPT-OSS source whose experts differ (build_dense makes them identical)."""
    torch.manual_seed(seed)
    model = MODEL_CLS(CONFIG_CLS(**{**COMMON, **EXTRA})).eval()
    move_off_init(model)
    model.save_pretrained(out_dir)
    return out_dir


def quantize_mxfp4(src, out):
    """`src` with its experts' stacks in MXFP4 as OpenAI's checkpoints store them: per expert
    and output row, groups of 32 inputs share an E8M0 scale (2^e, e the smallest with
    max |w| / 2^e <= 6); each value is the nearest E2M1 code, two codes a byte, low nibble
    first: `<name>_blocks` (E, out, G, 16), `<name>_scales` (E, out, G). Returns the experts'
    weights those codes stand for, in transformers' (E, in, out) layout, by name."""
    out.mkdir(parents=True, exist_ok=True)
    table = torch.tensor(FP4_VALUES)
    tensors, meant = {}, {}
    for name, w in load_file(str(src / "model.safetensors")).items():
        if not name.endswith(EXPERTS):
            tensors[name] = w
            continue
        t = w.float().transpose(1, 2)  # (E, out, in): rows of inputs
        E, rows, cols = t.shape
        groups = t.reshape(E, rows, cols // 32, 32)
        exp = torch.ceil(torch.log2(groups.abs().amax(-1).clamp_min(1e-30) / 6.0))
        codes = (groups / exp.exp2()[..., None])[..., None].sub(table).abs().argmin(-1)
        tensors[f"{name}_blocks"] = (codes[..., 0::2] | codes[..., 1::2] << 4).to(torch.uint8)
        tensors[f"{name}_scales"] = (exp + 127).to(torch.uint8)
        meant[name] = (table[codes] * exp.exp2()[..., None]).reshape(E, rows, cols) \
            .transpose(1, 2)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "mxfp4", "modules_to_not_convert": [
            "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
            "lm_head"]}
    (out / "config.json").write_text(json.dumps(config))
    return meant


def test_experts_router_and_sinks_land_in_their_places(tmp_path):
    """gate columns even, up odd in the source's (E, in, out) stacks; down (E, h, d); biases
    alike; the router's weight and bias; each attention's sinks; the experts' mean as E_m."""
    src = build_distinct(tmp_path / "src")
    model = cr.upcycle_from_dense(src, segment_len=4)
    cfg = model.config
    assert (cfg.num_experts, cfg.hidden_act, cfg.attention_sinks, cfg.router_bias) == \
        (3, "swigluoai", True, True)
    assert (cfg.swiglu_limit, cfg.swiglu_alpha, cfg.sliding_window_layers) == (0.25, 1.5, [0])
    theirs = load_file(str(src / "model.safetensors"))
    for i, block in enumerate(model.transformer.h):
        p, ffn = f"model.layers.{i}.", block.ffn
        gate_up, gate_up_b = theirs[f"{p}mlp.experts.gate_up_proj"], \
            theirs[f"{p}mlp.experts.gate_up_proj_bias"]
        want = {"gate_proj": (gate_up[..., 0::2].transpose(1, 2), gate_up_b[:, 0::2]),
                "up_proj": (gate_up[..., 1::2].transpose(1, 2), gate_up_b[:, 1::2]),
                "down_proj": (theirs[f"{p}mlp.experts.down_proj"].transpose(1, 2),
                              theirs[f"{p}mlp.experts.down_proj_bias"])}
        for proj, (w, b) in want.items():
            assert torch.equal(getattr(ffn.experts, proj).weight, w)
            assert torch.equal(getattr(ffn.experts, proj).bias, b)
            torch.testing.assert_close(getattr(ffn.base, proj).weight, w.mean(0))
            torch.testing.assert_close(getattr(ffn.base, proj).bias, b.mean(0))
        assert torch.equal(ffn.router.weight, theirs[f"{p}mlp.router.weight"])
        assert torch.equal(ffn.router.bias, theirs[f"{p}mlp.router.bias"])
        assert torch.equal(block.attn.sinks, theirs[f"{p}self_attn.sinks"])


def test_the_sinks_the_clamp_and_its_slope_are_the_sources(tmp_path):
    """With identical experts the import is the source (tests/model/test_families); each of
    GPT-OSS's own pieces moves the logits when it is dropped or changed: the test model's
    sinks, its clamp (a third of the gates cross 0.25) and its slope."""
    src = build_dense(tmp_path / "src", "gpt_oss")
    ids = random_ids(30, seed=5, batch=2)
    assert dense_reference_error(cr.upcycle_from_dense(src, segment_len=4), src, ids) <= 1e-5
    no_sinks = cr.upcycle_from_dense(src, segment_len=4)
    with torch.no_grad():
        for block in no_sinks.transformer.h:
            block.attn.sinks.fill_(float("-inf"))  # a column no query weighs: plain attention
    assert dense_reference_error(no_sinks, src, ids) > 1e-3
    for changed in ({"swiglu_limit": 7.0}, {"swiglu_alpha": 1.702}):
        other = cr.upcycle_from_dense(src, segment_len=4, **changed)
        assert dense_reference_error(other, src, ids) > 1e-3, changed


def test_the_router_bias_routes(tmp_path):
    """The merged FFN's scores are softmax(W h̄ + b) with the source's bias: a model whose
    bias is zeroed routes the same segments differently."""
    src = build_distinct(tmp_path / "src")
    model = cr.upcycle_from_dense(src, segment_len=4).eval()
    ids = random_ids(13, seed=3)
    with torch.no_grad():
        scores = model(ids).router_scores
        for block in model.transformer.h:
            block.ffn.router.bias.zero_()
        unbiased = model(ids).router_scores
    assert len(scores) == 2 and all((scores[m] - unbiased[m]).abs().max() > 1e-3 for m in scores)


def test_mxfp4_experts_read_as_transformers_dequantizes_them(tmp_path):
    """OpenAI's published layout: the import's experts are the values the codes and scales
    stand for (read independently above), as transformers' own dequantizing loader reads
    them too; everything else (attention, sinks, router) stays as stored."""
    src = build_distinct(tmp_path / "src")
    meant = quantize_mxfp4(src, tmp_path / "q")
    model = cr.upcycle_from_dense(tmp_path / "q", segment_len=4)
    ref = GptOssForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32,
                                            quantization_config=Mxfp4Config(dequantize=True))
    for i, block in enumerate(model.transformer.h):
        gate_up = meant[f"model.layers.{i}.mlp.experts.gate_up_proj"]
        down = meant[f"model.layers.{i}.mlp.experts.down_proj"]
        theirs = ref.model.layers[i].mlp.experts
        assert torch.equal(theirs.gate_up_proj, gate_up) and torch.equal(theirs.down_proj, down)
        assert torch.equal(block.ffn.experts.gate_proj.weight, gate_up[..., 0::2].transpose(1, 2))
        assert torch.equal(block.ffn.experts.up_proj.weight, gate_up[..., 1::2].transpose(1, 2))
        assert torch.equal(block.ffn.experts.down_proj.weight, down.transpose(1, 2))
        assert torch.equal(block.attn.sinks, ref.model.layers[i].self_attn.sinks)
    # not the unquantized weights: the codes are coarse
    unquantized = load_file(str(src / "model.safetensors"))["model.layers.0.mlp.experts.down_proj"]
    assert not torch.allclose(meant["model.layers.0.mlp.experts.down_proj"], unquantized,
                              atol=1e-4)


def test_an_mxfp4_source_with_identical_experts_is_the_source(tmp_path):
    """Through transformers' dequantizing loader as the reference (what camex-train's upcycle
    check does)."""
    src = build_dense(tmp_path / "src", "gpt_oss")
    quantize_mxfp4(src, tmp_path / "q")
    model = cr.upcycle_from_dense(tmp_path / "q", segment_len=4)
    assert dense_reference_error(model, tmp_path / "q", random_ids(30, seed=5, batch=2)) <= 1e-5


def test_mxfp4_blocks_without_their_scales_are_refused(tmp_path):
    src = build_distinct(tmp_path / "src")
    quantize_mxfp4(src, tmp_path / "q")
    tensors = load_file(str(tmp_path / "q" / "model.safetensors"))
    del tensors["model.layers.1.mlp.experts.down_proj_scales"]
    save_file(tensors, str(tmp_path / "q" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UpcycleError, match="down_proj_blocks has no .*down_proj_scales"):
        cr.upcycle_from_dense(tmp_path / "q", segment_len=4)
