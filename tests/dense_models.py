"""Tiny random dense Llama-family models that transformers builds locally (no hub), and CAMEx
models upcycled from them, for the model-family tests.

Every config has grouped-query attention on (4 query heads, 2 key/value heads). Weights are
transformers' own random init; `spread` then moves every CAMEx parameter (experts, curvature,
routers) off its upcycled value so that routing and merging change the outputs. A sparse MoE
family (SPARSE: GPT-OSS) is built with identical experts, so that its import is exact too (any
merge of identical experts is that expert, as is the source's top-k mixture of them).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (Ernie4_5Config, Ernie4_5ForCausalLM, HunYuanDenseV1Config,
                          HunYuanDenseV1ForCausalLM, HunYuanDenseV1ForSequenceClassification,
                          Exaone4Config, Exaone4ForCausalLM, Exaone4ForSequenceClassification,
                          Gemma2Config, Gemma2ForCausalLM, Gemma2ForSequenceClassification,
                          Gemma3ForCausalLM, Gemma3TextConfig, GptOssConfig, GptOssForCausalLM,
                          GptOssForSequenceClassification,
                          Gemma3TextForSequenceClassification, GraniteConfig, GraniteForCausalLM,
                          LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification,
                          Ministral3Config, Ministral3ForCausalLM,
                          MistralConfig, MistralForCausalLM, MistralForSequenceClassification,
                          Olmo2Config, Olmo2ForCausalLM, Olmo2ForSequenceClassification,
                          Olmo3Config, Olmo3ForCausalLM, Olmo3ForSequenceClassification,
                          Phi3Config, Phi3ForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification,
                          Qwen3Config, Qwen3ForCausalLM, Qwen3ForSequenceClassification,
                          SmolLM3Config, SmolLM3ForCausalLM, SmolLM3ForSequenceClassification)

VOCAB = 97
PAD, BOS, EOS = 0, 1, 2
COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128,
              pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    # a window shorter than the tests' sequences: every family test crosses it
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": 7}),
    # Ministral 3: Mistral with YaRN (its published mscale form) and Llama 4's query scale,
    # which starts at the rotary's original length: 12 here (16,384 published), so the tests'
    # sequences cross it (the fused decode step stands aside from there)
    "ministral3": (Ministral3Config, Ministral3ForCausalLM, {"head_dim": 16, "rope_parameters": {
        "rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "beta_fast": 32.0,
        "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 12, "llama_4_scaling_beta": 0.1}}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {}),
    "phi3": (Phi3Config, Phi3ForCausalLM, {}),
    # every second block without rotary positions (SmolLM3 ships every fourth)
    "smollm3": (SmolLM3Config, SmolLM3ForCausalLM, {"no_rope_layer_interval": 2}),
    # Granite's multipliers (3.x values but the attention one, 1/head_dim here) and a tied head
    "granite": (GraniteConfig, GraniteForCausalLM, {
        "embedding_multiplier": 12.0, "logits_scaling": 8.0, "residual_multiplier": 0.22,
        "attention_multiplier": 1 / 16, "tie_word_embeddings": True, "attention_bias": True}),
    # Gemma 2: sliding and full blocks alternating, score scale 24^-1/2, soft-capping at caps
    # the scores and logits of these weights reach (init 0.1 instead of 0.02: 50 and 30 would
    # be no-ops on a tiny random model, and an importer that dropped them exact)
    "gemma2": (Gemma2Config, Gemma2ForCausalLM, {
        "head_dim": 16, "sliding_window": 7, "query_pre_attn_scalar": 24,
        "initializer_range": 0.1, "attn_logit_softcapping": 2.0,
        "final_logit_softcapping": 5.0}),
    # Gemma 3: sliding and full blocks alternating (the 1B model: 5 to 1), a window the tests
    # cross, each kind with its own rotary base (full ones stretched, as the 4B+ models),
    # score scale 24^-1/2 (not head_dim's)
    "gemma3_text": (Gemma3TextConfig, Gemma3ForCausalLM, {
        "head_dim": 16, "sliding_window": 7, "sliding_window_pattern": 2,
        "query_pre_attn_scalar": 24, "rope_parameters": {
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}),
    # OLMo 2: norms on the branch outputs only, q/k norms over all heads at once
    "olmo2": (Olmo2Config, Olmo2ForCausalLM, {}),
    # OLMo 3: a sliding block and a full one, each kind with its own rotary base
    "olmo3": (Olmo3Config, Olmo3ForCausalLM, {
        "sliding_window": 7, "layer_types": ["sliding_attention", "full_attention"],
        "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 5e5},
                            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}),
    # EXAONE 4.0: OLMo 2's norms, q/k norms per head, a sliding block that rotates and a full
    # one without rotary positions
    "exaone4": (Exaone4Config, Exaone4ForCausalLM, {
        "head_dim": 16, "sliding_window": 7,
        "layer_types": ["sliding_attention", "full_attention"]}),
    # ERNIE 4.5: GLM's interleaved rotary over the whole head, biases on every projection
    "ernie4_5": (Ernie4_5Config, Ernie4_5ForCausalLM, {"head_dim": 16, "use_bias": True}),
    # Hunyuan: per-head q/k norms after the rotation, q/k/v/o biases, a rotary base stretched
    # by a fixed NTK alpha (its configs' "dynamic" with alpha: static)
    "hunyuan_v1_dense": (HunYuanDenseV1Config, HunYuanDenseV1ForCausalLM, {
        "head_dim": 16, "attention_bias": True, "rope_parameters": {
            "rope_type": "dynamic", "alpha": 1000.0, "rope_theta": 10000.0, "factor": 1.0}}),
    # GPT-OSS: a sparse MoE (3 experts, made identical by build_dense) with attention sinks, a
    # sliding block and a full one, untruncated YaRN, a biased router, biased experts whose
    # SwiGLU clamps at a limit these weights cross (0.25 instead of 7: a third of the gates
    # clamp) with a slope of its own
    "gpt_oss": (GptOssConfig, GptOssForCausalLM, {
        "head_dim": 16, "sliding_window": 7, "num_local_experts": 3, "num_experts_per_tok": 2,
        "swiglu_limit": 0.25, "swiglu_alpha": 1.5, "rope_parameters": {
            "rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 32.0,
            "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 32}}),
}
SPARSE = ("gpt_oss",)  # families whose every block is a sparse MoE (their experts are imported)
CLASSIFIERS = {  # (with the family's extra config above)
    "llama": (LlamaConfig, LlamaForSequenceClassification),
    "mistral": (MistralConfig, MistralForSequenceClassification),  # padded, and a window
    "qwen2": (Qwen2Config, Qwen2ForSequenceClassification),
    "qwen3": (Qwen3Config, Qwen3ForSequenceClassification),
    "smollm3": (SmolLM3Config, SmolLM3ForSequenceClassification),
    "gemma2": (Gemma2Config, Gemma2ForSequenceClassification),
    "gemma3_text": (Gemma3TextConfig, Gemma3TextForSequenceClassification),
    "olmo2": (Olmo2Config, Olmo2ForSequenceClassification),
    "olmo3": (Olmo3Config, Olmo3ForSequenceClassification),
    "exaone4": (Exaone4Config, Exaone4ForSequenceClassification),
    "gpt_oss": (GptOssConfig, GptOssForSequenceClassification),
    "hunyuan_v1_dense": (HunYuanDenseV1Config, HunYuanDenseV1ForSequenceClassification),
}


def build_dense(out_dir: Path, family: str, seed: int = 0, **overrides) -> Path:
    """A random dense causal LM of `family`, saved with save_pretrained (safetensors)."""
    torch.manual_seed(seed)
    config_cls, model_cls, extra = FAMILIES[family]
    model = model_cls(config_cls(**{**COMMON, **extra, **overrides})).eval()
    move_off_init(model)
    if family in SPARSE:
        same_experts(model)
    model.save_pretrained(out_dir)
    return out_dir


@torch.no_grad()
def same_experts(model) -> None:
    """Every MoE layer's experts made equal to its first (stacks (E, ...))."""
    for layer in model.model.layers:
        for p in layer.mlp.experts.parameters():
            p.copy_(p[:1].expand_as(p).clone())


@torch.no_grad()
def move_off_init(model) -> None:
    """transformers initialises norm weights to ones and biases to zeros, where an importer
    that dropped one would still be exact; move them so it is not."""
    for name, p in model.named_parameters():
        if "norm" in name or name.endswith(".bias"):
            p.add_(torch.randn_like(p) * 0.2)
        elif name.endswith(".sinks"):  # (GPT-OSS) logits the size of the scores'
            p.add_(torch.randn_like(p))


def build_dense_classifier(out_dir: Path, family: str, num_labels: int = 3, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    config_cls, model_cls = CLASSIFIERS[family]
    labels = {i: f"label{i}" for i in range(num_labels)}
    cfg = config_cls(**COMMON, **FAMILIES[family][2], num_labels=num_labels, id2label=labels,
                     label2id={v: k for k, v in labels.items()})
    model = model_cls(cfg).eval()
    move_off_init(model)
    if family in SPARSE:
        same_experts(model)
    model.save_pretrained(out_dir)
    return out_dir


@torch.no_grad()
def spread(model, seed: int = 1, router_scale: float = 8.0):
    """Every CAMEx parameter moves: experts by noise the size of their weights, curvature
    factors off the identity, routers scaled so that scores are far from uniform."""
    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        if ".experts." in name:
            p.add_(torch.randn_like(p) * p.std().clamp_min(1e-3) * 2)
        elif ".curvature." in name:
            p.add_(torch.randn_like(p) * 0.05)
        elif ".router." in name:
            p.mul_(router_scale / p.std().clamp_min(1e-6) * 0.02)
    return model


def random_ids(n: int, seed: int, batch: int = 1) -> torch.Tensor:
    """Token ids that avoid the special ids (a pad id mid-sequence changes HF's classifier
    pooling, an EOS would stop generation)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, n), generator=g)


def _quantized_copy(src: Path, out: Path, quantize, quantization_config: dict) -> Path:
    """`src`'s checkpoint in `out` with every 2-D projection of its blocks replaced by
    `quantize(name, weight) -> {name: tensor, ...}` and the config's `quantization_config`
    set; everything else (embeddings, norms, biases, the head) as it was."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, w in load_file(str(src / "model.safetensors")).items():
        if ".layers." in name and name.endswith("proj.weight") and w.dim() == 2:
            tensors.update(quantize(name, w.float()))
        else:
            tensors[name] = w
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (out / "config.json").write_text(json.dumps(config))
    if (src / "generation_config.json").is_file():
        shutil.copy(src / "generation_config.json", out / "generation_config.json")
    return out


def quantize_fp8(src: Path, out: Path, block: tuple[int, int], scale_dtype=torch.float32,
                 ceil_grid: bool = False) -> Path:
    """`src`'s checkpoint with every projection of its blocks in fine-grained FP8 as Qwen's and
    Mistral's -FP8 releases store it: float8_e4m3fn weights and a `weight_scale_inv` per
    (rows, columns) block (absmax / 448), `quantization_config` quant_method "fp8".
    `ceil_grid`: blocks that need not divide the weight (DeepSeek V3's grid, the last block
    cut short). `scale_dtype` torch.uint8: E8M0 scales (powers of two, the exponent + 127)."""
    bm, bn = block

    def quantize(name: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
        rows, cols = w.shape
        grid = (-(-rows // bm), -(-cols // bn))
        assert ceil_grid or (rows % bm == 0 and cols % bn == 0), (name, w.shape, block)
        scales = torch.empty(grid)
        q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
        for i in range(grid[0]):
            for j in range(grid[1]):
                part = w[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn]
                s = part.abs().max().clamp_min(1e-12) / 448.0
                if scale_dtype == torch.uint8:
                    s = torch.exp2(torch.ceil(torch.log2(s)))
                scales[i, j] = s
                q[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn] = (part / s).to(torch.float8_e4m3fn)
        stored = ((torch.log2(scales) + 127).to(torch.uint8) if scale_dtype == torch.uint8
                  else scales.to(scale_dtype))
        return {name: q, f"{name}_scale_inv": stored}

    return _quantized_copy(src, out, quantize, {
        "quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
        "weight_block_size": list(block)})


def dequantized_reference(q_dir: Path, name: str) -> torch.Tensor:
    """Weight `name` of a `quantize_fp8` checkpoint, dequantized block by block in a loop (an
    independent reading of the format, for grids transformers does not load)."""
    import json

    from safetensors.torch import load_file

    tensors = load_file(str(q_dir / "model.safetensors"))
    bm, bn = json.loads((q_dir / "config.json").read_text())["quantization_config"][
        "weight_block_size"]
    q, s = tensors[name].float(), tensors[f"{name}_scale_inv"]
    s = torch.exp2(s.float() - 127) if s.dtype == torch.uint8 else s.float()
    w = torch.empty_like(q)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            w[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn] = \
                q[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn] * s[i, j]
    return w


def quantize_compressed(src: Path, out: Path, kind: str, symmetric: bool = True) -> Path:
    """`src`'s checkpoint as llm-compressor saves it (compressed-tensors, vLLM's format; e.g.
    RedHatAI's -FP8-dynamic and -quantized.w8a8 releases): every projection of the blocks
    with a scale per row (`weight_scale`, shape (rows, 1)), `kind` "fp8" (format
    float-quantized, float8_e4m3fn) or "int8" (int-quantized; with `symmetric` False also a
    `weight_zero_point` per row), activations dynamic per token (the config says so; a
    dequantized model ignores it, as transformers' does)."""
    def quantize(name: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        if kind == "fp8":
            s = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 448.0
            out[name] = (w / s).to(torch.float8_e4m3fn)
        elif symmetric:
            s = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0
            out[name] = (w / s).round().clamp(-128, 127).to(torch.int8)
        else:
            lo, hi = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
            s = ((hi - lo) / 255.0).clamp_min(1e-12)
            zero = (-128 - lo / s).round().clamp(-128, 127)
            out[name] = ((w / s).round() + zero).clamp(-128, 127).to(torch.int8)
            out[f"{name}_zero_point"] = zero.to(torch.int8)
        out[f"{name}_scale"] = s.to(torch.bfloat16).float()
        return out

    number = "float" if kind == "fp8" else "int"
    return _quantized_copy(src, out, quantize, {
        "quant_method": "compressed-tensors", "quantization_status": "compressed",
        "format": f"{number}-quantized", "ignore": ["lm_head"], "kv_cache_scheme": None,
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": number, "symmetric": symmetric,
                        "strategy": "channel", "dynamic": False},
            "input_activations": {"num_bits": 8, "type": number, "symmetric": True,
                                  "strategy": "token", "dynamic": True}}}})


def quantize_packed(src: Path, out: Path, bits: int, group: int) -> Path:
    """`src`'s checkpoint as llm-compressor's W4A16 / W8A16 (compressed-tensors
    `pack-quantized`, e.g. RedHatAI's -quantized.w4a16 releases): every projection of the
    blocks as symmetric `bits`-bit integers with a scale per `group` columns, packed into int32
    words by compressed-tensors' own packer (`weight_packed`, `weight_scale`, `weight_shape`)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    top = (1 << (bits - 1)) - 1

    def quantize(name: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
        rows, cols = w.shape
        groups = w.reshape(rows, cols // group, group)
        s = (groups.abs().amax(dim=-1) / top).clamp_min(1e-12).to(torch.bfloat16).float()
        q = (groups / s[..., None]).round().clamp(-top - 1, top).reshape(rows, cols)
        base = name[:-len("weight")]
        return {f"{base}weight_packed": pack_to_int32(q.to(torch.int8), bits),
                f"{base}weight_scale": s, f"{base}weight_shape": torch.tensor([rows, cols])}

    return _quantized_copy(src, out, quantize, {
        "quant_method": "compressed-tensors", "quantization_status": "compressed",
        "format": "pack-quantized", "ignore": ["lm_head"], "kv_cache_scheme": None,
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": bits, "type": "int", "symmetric": True,
                        "strategy": "group", "group_size": group, "dynamic": False}}}})
