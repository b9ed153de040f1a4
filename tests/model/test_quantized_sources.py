"""Quantized source checkpoints: fine-grained FP8 (Qwen's and Mistral's -FP8 releases, DeepSeek
V3's weights) and compressed-tensors' unpacked formats (llm-compressor's FP8 and W8A8) are
dequantized on import exactly as transformers dequantizes them on a CPU; every other
quantization is refused by name instead of read as if its integers were weights."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import camex_runtime as cr
from camex_runtime.upcycle import UpcycleError, dense_reference_error

from tests.dense_models import (build_dense, dequantized_reference, quantize_compressed,
                                quantize_fp8, quantize_packed, random_ids, spread)


def test_fp8_blocks_dequantize_as_transformers_does(tmp_path):
    """The import equals transformers' own FP8 loading (dequantized on a CPU, through
    accelerate), and that is the FP8 model, not the full-precision one it came from."""
    dense = build_dense(tmp_path / "dense", "qwen2")  # q/k/v biases stay full precision
    fp8 = quantize_fp8(dense, tmp_path / "fp8", block=(16, 32))
    model = cr.upcycle_from_dense(fp8, num_experts=2, segment_len=4)
    ids = random_ids(30, seed=1, batch=2)
    assert dense_reference_error(model, fp8, ids) <= 1e-5
    assert dense_reference_error(model, dense, ids) > 1e-4  # quantization moved the logits
    q_proj = model.transformer.h[0].attn.c_attn.weight[:64]
    assert torch.equal(q_proj, dequantized_reference(fp8, "model.layers.0.self_attn.q_proj.weight"))
    folded = cr.export(spread(model).eval(), tmp_path / "folded")
    assert folded.max_rel_error <= 1e-5


@pytest.mark.parametrize("scale_dtype,ceil_grid", [(torch.uint8, False), (torch.bfloat16, True)],
                         ids=["e8m0-scales", "deepseek-ceil-grid"])
def test_fp8_scale_forms_and_grids_that_do_not_divide(tmp_path, scale_dtype, ceil_grid):
    """E8M0 scales stored as bytes (powers of two) and DeepSeek's grid, whose last blocks are
    cut short (64 x 96 weights in 48 x 48 blocks): each weight is what a block-by-block loop
    reads from the file."""
    dense = build_dense(tmp_path / "dense", "llama")
    block = (48, 48) if ceil_grid else (32, 32)
    fp8 = quantize_fp8(dense, tmp_path / "fp8", block=block, scale_dtype=scale_dtype,
                       ceil_grid=ceil_grid)
    model = cr.upcycle_from_dense(fp8, num_experts=2, segment_len=4)
    block0 = model.transformer.h[0]
    assert torch.equal(block0.attn.c_proj.weight,
                       dequantized_reference(fp8, "model.layers.0.self_attn.o_proj.weight"))
    assert torch.equal(block0.ffn.base.down_proj.weight,
                       dequantized_reference(fp8, "model.layers.0.mlp.down_proj.weight"))
    source = load_file(str(dense / "model.safetensors"))["model.layers.0.mlp.down_proj.weight"]
    err = (block0.ffn.base.down_proj.weight - source).abs().max() / source.abs().max()
    assert 0 < err < 0.1  # FP8's rounding, not another tensor


@pytest.mark.parametrize("kind,symmetric", [("fp8", True), ("int8", True), ("int8", False)],
                         ids=["fp8-dynamic", "w8a8", "w8a8-zero-points"])
def test_compressed_tensors_dequantize_as_transformers_does(tmp_path, kind, symmetric):
    """llm-compressor's checkpoints (vLLM's format): a scale per weight row, zero points where
    asymmetric. The import equals transformers' own loading of them (compressed-tensors
    installed), dequantized — not the full-precision model they came from."""
    dense = build_dense(tmp_path / "dense", "llama", attention_bias=True)
    q_dir = quantize_compressed(dense, tmp_path / "q", kind, symmetric)
    model = cr.upcycle_from_dense(q_dir, num_experts=2, segment_len=4)
    ids = random_ids(30, seed=1, batch=2)
    assert dense_reference_error(model, q_dir, ids) <= 1e-5
    assert dense_reference_error(model, dense, ids) > 1e-4


def test_a_kv_cache_only_compressed_tensors_checkpoint_reads_as_full_precision(tmp_path):
    """compressed-tensors' "dense" format keeps the weights as they are (a checkpoint that
    quantizes only its KV cache): read exactly, as transformers reads it."""
    d = build_dense(tmp_path / "kv", "llama")
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "dense", "config_groups": {},
        "quantization_status": "compressed", "kv_cache_scheme": {
            "num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False,
            "symmetric": True}}
    (d / "config.json").write_text(json.dumps(cfg))
    model = cr.upcycle_from_dense(d, num_experts=2, segment_len=4)
    assert dense_reference_error(model, d, random_ids(20, seed=2, batch=2)) <= 1e-5


@pytest.mark.parametrize("bits", [4, 8])
def test_packed_integer_weights_unpack_as_compressed_tensors_does(tmp_path, bits):
    """llm-compressor's W4A16 / W8A16 (`pack-quantized`: signed integers packed into int32
    words by compressed-tensors' own packer, a scale per 16 columns): the import equals
    transformers' dequantized loading of them."""
    dense = build_dense(tmp_path / "dense", "qwen2")
    q_dir = quantize_packed(dense, tmp_path / "q", bits, group=16)
    model = cr.upcycle_from_dense(q_dir, num_experts=2, segment_len=4)
    ids = random_ids(30, seed=1, batch=2)
    assert dense_reference_error(model, q_dir, ids) <= 1e-5
    assert dense_reference_error(model, dense, ids) > 1e-4


@pytest.mark.parametrize("method", ["awq", "gptq", "bitsandbytes", "mxfp4"])
def test_other_quantizations_are_refused_by_name(tmp_path, method):
    d = build_dense(tmp_path / "q", "llama")
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": method, "bits": 4}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UpcycleError, match=rf"quantized \(quant_method '{method}'\).*"
                                           r"full-precision \(bf16\) release"):
        cr.upcycle_from_dense(d, num_experts=2, segment_len=4)


@pytest.mark.parametrize("change,pattern", [
    ({"format": "nvfp4-pack-quantized"}, r"format nvfp4-pack-quantized is not read"),
    ({"format": "pack-quantized", "config_groups": {"g": {"weights": {
        "num_bits": 4, "type": "int", "symmetric": False}}}},
     r"unpacks symmetric 4 or 8-bit integers only"),
    ({"sparsity_config": {"format": "sparse-bitmask"}}, r"with a sparsity_config"),
], ids=["nvfp4", "asymmetric-int4", "sparse"])
def test_compressed_tensors_formats_that_are_not_weights_are_refused(tmp_path, change, pattern):
    dense = build_dense(tmp_path / "dense", "llama")
    q_dir = quantize_compressed(dense, tmp_path / "q", "int8")
    cfg = json.loads((q_dir / "config.json").read_text())
    cfg["quantization_config"].update(change)
    (q_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UpcycleError, match=pattern):
        cr.upcycle_from_dense(q_dir, num_experts=2, segment_len=4)


def test_fp8_weights_without_their_scales_are_refused(tmp_path):
    """A float8 tensor is not a weight without its scale: no config saying so, or a scale
    missing from the file, is an error naming the tensor."""
    dense = build_dense(tmp_path / "dense", "llama")
    fp8 = quantize_fp8(dense, tmp_path / "fp8", block=(32, 32))
    cfg_file = fp8 / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({k: v for k, v in cfg.items() if k != "quantization_config"}))
    with pytest.raises(UpcycleError, match=r"layers\.0\.self_attn\.q_proj\.weight is stored as "
                                           r"float8_e4m3fn without a quantization_config"):
        cr.upcycle_from_dense(fp8, num_experts=2, segment_len=4)
    cfg_file.write_text(json.dumps(cfg))
    tensors = load_file(str(fp8 / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight_scale_inv"]
    save_file(tensors, str(fp8 / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UpcycleError, match=r"layers\.1\.mlp\.up_proj\.weight is stored as "
                                           r"float8_e4m3fn without its scales"):
        cr.upcycle_from_dense(fp8, num_experts=2, segment_len=4)


def test_the_reference_check_says_what_transformers_needs(tmp_path, monkeypatch):
    """camex-train compares the import with transformers' own model; where transformers cannot
    load the source (its FP8 loader needs accelerate), the error says so and how to skip."""
    from transformers import AutoModelForCausalLM

    dense = build_dense(tmp_path / "dense", "llama")
    fp8 = quantize_fp8(dense, tmp_path / "fp8", block=(32, 32))
    model = cr.upcycle_from_dense(fp8, num_experts=2, segment_len=4)

    def no_accelerate(*args, **kwargs):
        raise ImportError("Loading an FP8 quantized model requires accelerate")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_accelerate)
    with pytest.raises(UpcycleError, match=r"requires accelerate\); install what it names, or "
                                           r"skip the comparison \(camex-train "
                                           r"--no-verify-upcycle\)"):
        dense_reference_error(model, fp8)


def test_a_sparse_moe_in_fp8_dequantizes_every_expert(tmp_path):
    """Qwen3-MoE's -FP8 releases quantize each expert's projections on their own."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from tests.dense_models import COMMON

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(**{**COMMON, "intermediate_size": 64}, moe_intermediate_size=32,
                         num_experts=4, num_experts_per_tok=2, head_dim=16)
    Qwen3MoeForCausalLM(cfg).save_pretrained(tmp_path / "moe")
    fp8 = quantize_fp8(tmp_path / "moe", tmp_path / "fp8", block=(16, 32))
    model = cr.upcycle_from_dense(fp8, segment_len=4)
    experts = model.transformer.h[1].ffn.experts.up_proj.weight
    for j in range(4):
        assert torch.equal(experts[j], dequantized_reference(
            fp8, f"model.layers.1.mlp.experts.{j}.up_proj.weight"))
