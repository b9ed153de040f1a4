"""Upcycling: a CAMEx model from a dense Hugging Face checkpoint directory, exact at init.

`upcycle_from_dense(path)` reads the directory's ``config.json``, picks the importer of its
``model_type`` (a registry: ``gpt2``, ``llama``, ``mistral``, ``ministral``, ``ministral3``,
``mistral3`` and ``gemma3``: their language models, ``qwen2``, ``qwen3``, ``phi3``,
``smollm3``, ``seed_oss``, ``glm``, ``glm4``, ``ernie4_5``, ``hunyuan_v1_dense``, ``granite``,
``gemma2``, ``gemma3_text``, ``olmo2``, ``olmo3``, ``exaone4``; sparse MoEs
``mixtral``, ``qwen3_moe``, ``olmoe``, ``gpt_oss``, whose experts are imported, see "Sparse MoE
sources" below), and builds a
training-form CAMEx model whose every expert is a copy of the dense FFN (τ = 0), curvature at
the identity and routers at N(0, 0.02): the merged FFN equals the dense one whatever the scores,
so the model computes exactly the dense model's logits (docs/DESIGN.md, "Model families"). Fused
projections (Phi-3's ``qkv_proj`` and ``gate_up_proj``) are split or kept as the CAMEx layout
needs; separate q/k/v (Llama, Mistral, Qwen2, Qwen3) are fused into one projection; Qwen3's
per-head query and key norms come along (``qk_norm``), and SmolLM3's blocks without rotary positions
(``nope_layers``); Granite's multipliers fold into the weights, and so do Gemma 2/3's norm
offsets and score scales (their branch-output norms, GeGLU, Gemma 3's second rotary base and
Gemma 2's soft-capping are model options).
A ``*ForSequenceClassification`` source gives a classifier that pools and attends as its source.

Sliding-window attention comes along (Mistral, Phi-3, Qwen2/Qwen3 with ``use_sliding_window``:
the window, and which blocks use it). What cannot be reproduced exactly is refused with an
error naming it: rotary types whose frequencies depend on the sequence length, other
activations, quantizations other than fine-grained FP8, compressed-tensors' and MXFP4 experts
(those are dequantized on reading, as transformers does). Weights are read from safetensors
only (single file or sharded with an index), never unpickled.

Dynamic-Merg cannot copy every layer's FFN into a base it does not own: layer 1's base is that
layer's FFN, and each later layer's *experts* are that layer's dense FFN, so τ^l = FFN_l − E_m^l.
With α = 1 the merged expert (Σ s_i = 1) and the next derived base then equal the dense FFN_l
again, so the dynamic model also starts at the dense model (up to rounding); with α ≠ 1 it
does not, and no assignment of its parameters can make it.
"""

from __future__ import annotations

import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Callable

import torch
from safetensors import safe_open
from torch import Tensor

from .config import CamexConfig
from .modeling import CamexForCausalLM, CamexForSequenceClassification, CamexPreTrainedModel

SUPPORTED = ("gpt2", "llama", "mistral", "ministral", "ministral3", "mistral3", "qwen2",
             "qwen3", "phi3", "smollm3", "seed_oss", "glm", "glm4", "ernie4_5",
             "hunyuan_v1_dense", "granite", "gemma2", "gemma3_text", "gemma3", "olmo2", "olmo3",
             "exaone4", "mixtral", "qwen3_moe", "olmoe", "gpt_oss")


class UpcycleError(ValueError):
    """The dense checkpoint cannot be upcycled exactly; the message names what and why."""


# ---------------------------------------------------------------------------------------------
# Reading a dense checkpoint


# Quantized checkpoints whose weights are one stored value per element times a scale grid
# (per tensor, row, group or block), dequantized on reading, as transformers does on a CPU:
# fine-grained FP8 (`quant_method` "fp8": Qwen's and Mistral's -FP8 releases, DeepSeek V3's
# weights; float8 weights, `<name>_scale_inv` per block) and compressed-tensors' unpacked
# formats (vLLM's llm-compressor: RedHatAI's FP8-dynamic and W8A8 releases; float8 or int8
# weights, `<name>_scale`, zero points where asymmetric; its `pack-quantized` W4A16 / W8A16:
# symmetric 4- or 8-bit integers packed into int32 words, `<name>_packed`) and MXFP4 (GPT-OSS's
# experts: 4-bit floats (E2M1), two to a byte, in blocks of 32 sharing a power-of-two scale,
# `<name>_blocks` and `<name>_scales`). Other packings (NVFP4, AWQ, GPTQ, bitsandbytes, ...)
# are refused by name.
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# ("dense": weights kept in full precision, e.g. a checkpoint quantizing only its KV cache)
CT_FORMATS = ("float-quantized", "int-quantized", "naive-quantized", "pack-quantized", "dense")
PACKED_BITS = (4, 8)
# the 16 values of an E2M1 (FP4) code, low nibble first in MXFP4's bytes
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
              -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


@dataclass(frozen=True)
class Quantization:
    """How a checkpoint's quantized weights are read: `scale` is the suffix of each weight's
    scales (`<name><scale>`), `block` the (rows, columns) of a block where the config names
    one (a grid that does not divide the weight needs it)."""
    method: str
    scale: str
    block: tuple[int, int] | None = None
    packed_bits: int | None = None  # pack-quantized: bits per value in the int32 words


def quantization_of(path: Path) -> Quantization | None:
    """How the checkpoint directory at `path` stores its weights (None: full precision);
    refuses, by name, what the importer cannot read exactly."""
    config = json.loads((path / "config.json").read_text())
    quant = config.get("quantization_config")
    if not quant:
        return None
    method = quant.get("quant_method")
    redo = ("start from the full-precision (bf16) release of the model, or load it with "
            "transformers, dequantize and save_pretrained it")
    if method == "fp8":
        block = quant.get("weight_block_size")
        if block is not None and (len(block) != 2 or min(block) < 1):
            raise UpcycleError(f"{path}: quantization_config weight_block_size {block} is not "
                               f"a [rows, columns] block")
        return Quantization("fp8", "_scale_inv", tuple(block) if block else None)
    if method == "compressed-tensors":
        groups = list((quant.get("config_groups") or {}).values())
        formats = {f for f in [quant.get("format"), *(g.get("format") for g in groups)] if f}
        packed = sorted(formats - set(CT_FORMATS))
        if packed:
            raise UpcycleError(f"{path}: compressed-tensors format {', '.join(packed)} is not "
                               f"read; the importer reads {', '.join(CT_FORMATS)} only: {redo}")
        for extra in ("sparsity_config", "transform_config"):
            if quant.get(extra) and (quant[extra] or {}).get("format", "") != "dense":
                raise UpcycleError(f"{path}: compressed-tensors with a {extra} (sparse or "
                                   f"rotated weights) cannot be read as weights: {redo}")
        blocks = {tuple(b) for g in groups if (b := (g.get("weights") or {}).get(
            "block_structure"))}
        bits = None
        if "pack-quantized" in formats:
            schemes = [g.get("weights") or {} for g in groups]
            widths = {w.get("num_bits") for w in schemes}
            if len(widths) != 1 or not widths <= set(PACKED_BITS) or \
                    not all(w.get("symmetric", True) and w.get("type", "int") == "int"
                            for w in schemes):
                raise UpcycleError(f"{path}: compressed-tensors pack-quantized weights of "
                                   f"{sorted(widths, key=str)} bits (symmetric: "
                                   f"{[w.get('symmetric') for w in schemes]}); the importer "
                                   f"unpacks symmetric {' or '.join(map(str, PACKED_BITS))}-bit "
                                   f"integers only: {redo}")
            bits = widths.pop()
        return Quantization(method, "_scale", blocks.pop() if len(blocks) == 1 else None, bits)
    if method == "mxfp4" and config.get("model_type") == "gpt_oss":  # (transformers' MXFP4
        return Quantization(method, "_scales")                       # quantizes nothing else)
    raise UpcycleError(
        f"{path}: the weights are quantized (quant_method {method!r}); the importer reads "
        f"full-precision weights, fine-grained FP8 (fp8), compressed-tensors' formats and "
        f"GPT-OSS's MXFP4 experts (mxfp4) only: {redo}")


def unpack_int32(packed: Tensor, bits: int, cols: int) -> Tensor:
    """(rows, words) int32 words of `bits`-bit values, value i of a row at bits [i·bits,
    (i+1)·bits) of its little-endian bit stream, stored plus 2^(bits−1) (compressed-tensors'
    packing) -> (rows, cols) int16, the signed values."""
    if sys.byteorder != "little":  # the words' bytes read in memory order
        raise UpcycleError("unpacking int32-packed weights needs a little-endian CPU")
    stream = packed.contiguous().view(torch.uint8)  # (rows, 4·words), bit order kept
    if bits == 4:
        stream = torch.stack([stream & 0xF, stream >> 4], dim=-1).flatten(-2)
    return stream[:, :cols].to(torch.int16) - (1 << (bits - 1))


def dequantize(q: Tensor, scales: Tensor, zero: Tensor | None, block: tuple[int, int] | None,
               name: str) -> Tensor:
    """(q − zero) × scale in fp32, the scale (and zero point) a grid over the weight: one value
    (per tensor), a column (per row), or blocks — (rows, columns) from `block` where the grid
    is its ceiling division of the weight (DeepSeek's last blocks are cut short), else from the
    grid when it divides the weight (transformers' rule). E8M0 scales stored as bytes are powers
    of two."""
    rows, cols = q.shape[-2:]

    def spread(grid: Tensor) -> Tensor:
        grid = grid.float().reshape(1, 1) if grid.dim() < 2 else grid.float()
        gr, gc = grid.shape[-2:]
        if block is not None and (-(-rows // block[0]), -(-cols // block[1])) == (gr, gc):
            bm, bn = block
        elif rows % gr == 0 and cols % gc == 0:
            bm, bn = rows // gr, cols // gc
        else:
            raise UpcycleError(f"{name}: weight {tuple(q.shape)} and its scale grid "
                               f"{tuple(grid.shape)} do not tile (block {block})")
        return grid.repeat_interleave(bm, dim=-2)[..., :rows, :] \
            .repeat_interleave(bn, dim=-1)[..., :cols]

    s = spread((scales.float() - 127.0).exp2() if scales.dtype == torch.uint8 else scales)
    w = q.float() if zero is None else q.float() - spread(zero)
    return w * s


def dequantize_mxfp4(blocks: Tensor, scales: Tensor, name: str) -> Tensor:
    """MXFP4 as GPT-OSS stores its experts: blocks (..., rows, G, 16) uint8, two E2M1 codes a
    byte (low nibble first), scales (..., rows, G) uint8 E8M0 (2^(s − 127)) per 32 values ->
    (..., G·32, rows) fp32: the values of each row of 32-wide groups, transposed as
    transformers' expert parameters hold them ((E, in, out))."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or \
            blocks.shape[:-1] != scales.shape or blocks.shape[-1] != 16:
        raise UpcycleError(f"{name}: MXFP4 blocks {tuple(blocks.shape)} {blocks.dtype} and "
                           f"scales {tuple(scales.shape)} {scales.dtype} are not (..., rows, "
                           f"G, 16) and (..., rows, G) bytes")
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    *lead, rows, groups, _ = blocks.shape
    out = torch.empty(*lead, groups * 32, rows, dtype=torch.float32)
    flat_b, flat_s = blocks.reshape(-1, rows, groups, 16), scales.reshape(-1, rows, groups)
    for i, part in enumerate(out.view(-1, groups * 32, rows)):  # an expert at a time: the
        codes = torch.stack([flat_b[i] & 0x0F, flat_b[i] >> 4], dim=-1).flatten(-2)  # indices
        values = lut[codes.int()] * (flat_s[i].float() - 127.0).exp2().unsqueeze(-1)  # stay
        part.copy_(values.view(rows, groups * 32).T)  # one expert's size (gpt-oss-20b: 66 MB)
    return out


class DenseWeights:
    """Tensors of a Hugging Face checkpoint directory by name (model.safetensors, or shards
    listed in model.safetensors.index.json), read one at a time as fp32; a quantized weight
    (`quant`) dequantized with its scales."""

    def __init__(self, path: Path, quant: Quantization | None = None) -> None:
        self.quant = quant
        index = path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: path / f for name, f in weight_map.items()}
        elif (path / "model.safetensors").is_file():
            with safe_open(str(path / "model.safetensors"), framework="pt") as f:
                self.files = dict.fromkeys(f.keys(), path / "model.safetensors")
        else:
            found = sorted(p.name for p in path.glob("*.bin")) or ["no weights"]
            raise UpcycleError(f"{path}: no model.safetensors (found {', '.join(found)}); only "
                               f"safetensors checkpoints are read — re-save the model with "
                               f"save_pretrained(..., safe_serialization=True)")
        self.prefix = ""

    def under(self, prefix: str | tuple[str, ...]) -> DenseWeights:
        """The same checkpoint read with `prefix` prepended to every name (when it has such
        names: a bare body model saves without its task model's prefix); several prefixes:
        the first the checkpoint has."""
        view = DenseWeights.__new__(DenseWeights)
        view.files, view.quant = self.files, self.quant
        found = [p for p in ((prefix,) if isinstance(prefix, str) else prefix)
                 if any(n.startswith(p) for n in self.files)]
        view.prefix = found[0] if found else ""
        return view

    def has(self, name: str) -> bool:
        full = self.prefix + name
        return full in self.files or f"{full}_packed" in self.files or \
            f"{full}_blocks" in self.files

    def get(self, name: str) -> Tensor:
        full = self.prefix + name
        if f"{full}_blocks" in self.files and self.quant and self.quant.method == "mxfp4":
            if f"{full}_scales" not in self.files:
                raise UpcycleError(f"{full}_blocks has no {full}_scales: its values are not "
                                   f"the weights")
            return dequantize_mxfp4(self._read(f"{full}_blocks"), self._read(f"{full}_scales"),
                                    full)
        if f"{full}_packed" in self.files and self.quant and self.quant.packed_bits:
            rows, cols = (int(n) for n in self._read(f"{full}_shape").tolist())
            q = unpack_int32(self._read(f"{full}_packed"), self.quant.packed_bits, cols)
            if q.shape[0] != rows:
                raise UpcycleError(f"{full}_packed holds {q.shape[0]} rows, its shape says "
                                   f"{rows}")
            return dequantize(q, self._read(f"{full}{self.quant.scale}"), None,
                              self.quant.block, full)
        if full not in self.files:
            raise UpcycleError(f"dense checkpoint has no tensor {full!r}")
        t = self._read(full)
        scale = f"{full}{self.quant.scale}" if self.quant else None
        if scale in self.files:
            zero = f"{full}_zero_point"
            return dequantize(t, self._read(scale),
                              self._read(zero) if zero in self.files else None,
                              self.quant.block, full)
        if t.dtype in FP8_DTYPES or not (t.is_floating_point() or t.dtype == torch.bool):
            missing = f"its scales ({scale})" if self.quant else "a quantization_config"
            raise UpcycleError(f"{full} is stored as {str(t.dtype).removeprefix('torch.')} "
                               f"without {missing}: its values are not the weights")
        return t.float()

    def _read(self, full: str) -> Tensor:
        with safe_open(str(self.files[full]), framework="pt") as f:
            return f.get_tensor(full)


# ---------------------------------------------------------------------------------------------
# Importers: a Hugging Face config -> CamexConfig fields, and dense tensors in CAMEx names.


@dataclass(frozen=True)
class Importer:
    config: Callable[[Any], dict[str, Any]]      # HF config -> CamexConfig kwargs
    # (weights, HF config, layer) -> {camex name under transformer.h.{i}.: tensor}, where the
    # FFN projections are named "ffn.<proj>.weight|bias" as in a dense CAMEx block.
    block: Callable[[DenseWeights, Any, int], dict[str, Tensor]]
    # (weights) -> {"wte", "wpe"?, "ln_f.weight", "ln_f.bias"?, "lm_head"?, "score"?}
    outer: Callable[[DenseWeights, Any], dict[str, Tensor]]
    prefix: str | tuple[str, ...]                 # body prefix inside the checkpoint
    # a sparse-MoE source: blocks also give "experts.<proj>.weight" stacked (E, out, in) (and
    # ".bias" (E, out) where the experts have biases) and "router.weight" (E, d) (and
    # "router.bias"), which become the CAMEx layer's experts, their mean its base
    sparse: bool = False


def _common(hf) -> dict[str, Any]:
    return dict(vocab_size=hf.vocab_size, tie_word_embeddings=bool(hf.tie_word_embeddings),
                bos_token_id=hf.bos_token_id, eos_token_id=hf.eos_token_id,
                pad_token_id=getattr(hf, "pad_token_id", None))


def language_model_of(text_config: Callable[[Any], dict[str, Any]]
                      ) -> Callable[[Any], dict[str, Any]]:
    """The config reader of an image-text checkpoint's language model (Gemma 3 4B+, Mistral
    Small 3.x, Ministral 3): the text half's, with the head tied or not and the special ids
    as the outer config says (transformers reads them there)."""
    def config(hf) -> dict[str, Any]:
        cfg = text_config(_text(hf))
        cfg["tie_word_embeddings"] = bool(hf.tie_word_embeddings)
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(hf, name, None) is not None:
                cfg[name] = getattr(hf, name)
        return cfg
    return config


def gpt2_config(hf) -> dict[str, Any]:
    if getattr(hf, "activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise UpcycleError(f"unsupported GPT-2 activation {hf.activation_function!r}; "
                           f"CAMEx's GPT-2 family uses gelu_new")
    return dict(_common(hf), family="gpt2", d_model=hf.n_embd, n_layer=hf.n_layer,
                n_head=hf.n_head, d_ff=hf.n_inner or 4 * hf.n_embd,
                max_position_embeddings=hf.n_positions, layer_norm_epsilon=hf.layer_norm_epsilon)


def gpt2_block(w: DenseWeights, hf, i: int) -> dict[str, Tensor]:
    p = f"h.{i}."
    out = {f"ln_{k}.{t}": w.get(f"{p}ln_{k}.{t}") for k in (1, 2) for t in ("weight", "bias")}
    # GPT-2's Conv1D stores weights as (in, out); nn.Linear wants (out, in).
    for ours, theirs in (("attn.c_attn", "attn.c_attn"), ("attn.c_proj", "attn.c_proj"),
                         ("ffn.fc1", "mlp.c_fc"), ("ffn.fc2", "mlp.c_proj")):
        out[f"{ours}.weight"] = w.get(f"{p}{theirs}.weight").T.contiguous()
        out[f"{ours}.bias"] = w.get(f"{p}{theirs}.bias")
    return out


def gpt2_outer(w: DenseWeights, hf) -> dict[str, Tensor]:
    return {"wte": w.get("wte.weight"), "wpe": w.get("wpe.weight"),
            "ln_f.weight": w.get("ln_f.weight"), "ln_f.bias": w.get("ln_f.bias")}


def llama_config(hf) -> dict[str, Any]:
    mt = hf.model_type
    if hf.hidden_act != "silu":
        raise UpcycleError(f"{mt}: hidden_act {hf.hidden_act!r} is not supported "
                           f"(SwiGLU with silu)")
    rope = dict(getattr(hf, "rope_parameters", None) or {})
    if "rope_theta" not in rope:
        rope["rope_theta"] = getattr(hf, "rope_theta", 10000.0)
    rope.setdefault("rope_type", "default")
    factor = getattr(hf, "partial_rotary_factor", None)
    if factor is not None:
        rope.setdefault("partial_rotary_factor", factor)
    heads = hf.num_attention_heads
    # Qwen2 always biases q/k/v (not o); Llama, Qwen3 and SmolLM3 bias all four with
    # attention_bias.
    declared = bool(getattr(hf, "attention_bias", False))
    all_four = mt in ("llama", "qwen3", "smollm3", "granite", "qwen3_moe", "olmoe", "gpt_oss",
                      "hunyuan_v1_dense")
    qkv_only = mt in ("seed_oss", "glm", "glm4")
    qkv_bias = True if mt == "qwen2" else (all_four or qkv_only) and declared
    # Seed-OSS and GLM: q/k/v biased with attention_bias, the output only with Seed-OSS's
    # attention_out_bias
    out_bias = (bool(getattr(hf, "attention_out_bias", False)) if qkv_only
                else all_four and declared)
    # SmolLM3's no_rope_layers: per block, 1 = rotary positions, 0 = none (NoPE)
    nope = [i for i, rotates in enumerate(getattr(hf, "no_rope_layers", None) or ())
            if not rotates]
    return dict(_common(hf), family="llama", d_model=hf.hidden_size, n_layer=hf.num_hidden_layers,
                n_head=heads, num_key_value_heads=hf.num_key_value_heads or heads,
                head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // heads,
                d_ff=hf.intermediate_size, max_position_embeddings=hf.max_position_embeddings,
                rope_parameters=rope, layer_norm_epsilon=hf.rms_norm_eps, hidden_act="silu",
                attention_bias=qkv_bias,
                attention_out_bias=out_bias, nope_layers=nope or None,
                mlp_bias=bool(getattr(hf, "mlp_bias", False)),
                qk_norm=mt in ("qwen3", "qwen3_moe", "olmoe"),
                **dict(zip(("sliding_window", "sliding_window_layers"), sliding_window(hf))))


def sliding_window(hf) -> tuple[int | None, list[int] | None]:
    """(the attention window the source applies, the blocks that apply it: None for all);
    (None, None) when every block attends to everything. `layer_types` (transformers 5) names
    each block's kind where a family mixes them (Qwen2/Qwen3: blocks from max_window_layers)."""
    window = getattr(hf, "sliding_window", None)
    types = list(getattr(hf, "layer_types", None) or [])
    sliding_on = getattr(hf, "use_sliding_window", False)
    if hf.model_type == "smollm3" and not sliding_on:  # its blocks ignore layer_types then
        return None, None
    if hf.model_type in ("qwen2", "qwen3", "qwen3_moe") and not sliding_on \
            and "sliding_attention" not in types:
        return None, None
    if window is None:
        return None, None
    if not types:
        return int(window), None
    blocks = [i for i, kind in enumerate(types) if kind == "sliding_attention"]
    if not blocks:
        return None, None
    return int(window), None if len(blocks) == len(types) else blocks


def llama_block(w: DenseWeights, hf, i: int) -> dict[str, Tensor]:
    out = llama_attention(w, hf, i)
    m = f"layers.{i}.mlp."
    if w.has(f"{m}gate_up_proj.weight"):  # Phi-3: rows gate first, then up
        gate, up = w.get(f"{m}gate_up_proj.weight").chunk(2, dim=0)
        out["ffn.gate_proj.weight"], out["ffn.up_proj.weight"] = gate, up
    else:
        for proj in ("gate_proj", "up_proj"):
            out[f"ffn.{proj}.weight"] = w.get(f"{m}{proj}.weight")
    out["ffn.down_proj.weight"] = w.get(f"{m}down_proj.weight")
    for proj in ("gate_proj", "up_proj", "down_proj"):
        if w.has(f"{m}{proj}.bias"):
            out[f"ffn.{proj}.bias"] = w.get(f"{m}{proj}.bias")
    return out


# GLM (`glm`: GLM-4-9B; `glm4`: GLM-4-0414, GLM-Z1): Llama with Phi-3's fused gate_up_proj,
# q/k/v biases, half the head rotated (partial_rotary_factor 0.5) and the rotation applied to
# interleaved pairs (dims 2i, 2i+1) instead of halves (i, i + rot/2). Permuting the rotated
# dims of every query and key head the same way (even dims first, then odd) turns one into
# the other, and q·k does not see a permutation both sides share: exact, no model option.
# GLM-4-0414 adds an RMSNorm on each branch's output (sandwich_norms, with the pre-norms).


def glm_config(hf) -> dict[str, Any]:
    cfg = llama_config(hf)
    if hf.model_type == "glm4":
        cfg["sandwich_norms"] = True
    return cfg


def interleaved_rotary(out: dict[str, Tensor], cfg: dict[str, Any]) -> dict[str, Tensor]:
    """A block's fused q/k/v (`out`, CAMEx names) whose source rotates interleaved pairs of the
    rotated dims, with every query and key head's rotated rows reordered evens first, then odds
    (`cfg`: the block's CamexConfig fields): halves rotation then computes the same scores."""
    hd, heads, kv = cfg["head_dim"], cfg["n_head"], cfg["num_key_value_heads"]
    rot = int(hd * cfg["rope_parameters"].get("partial_rotary_factor", 1.0))
    within = torch.cat([torch.arange(0, rot, 2), torch.arange(1, rot, 2),
                        torch.arange(rot, hd)])
    rows = torch.cat([h * hd + within for h in range(heads + kv)]
                     + [torch.arange((heads + kv) * hd, (heads + 2 * kv) * hd)])  # v as it is
    for name in ("attn.c_attn.weight", "attn.c_attn.bias"):
        if name in out:
            out[name] = out[name][rows]
    return out


def glm_block(w: DenseWeights, hf, i: int) -> dict[str, Tensor]:
    out = interleaved_rotary(llama_block(w, hf, i), glm_config(hf))
    if hf.model_type == "glm4":
        p = f"layers.{i}."
        out["ln_attn_out.weight"] = w.get(f"{p}post_self_attn_layernorm.weight")
        out["ln_ffn_out.weight"] = w.get(f"{p}post_mlp_layernorm.weight")
    return out


# Hunyuan (`hunyuan_v1_dense`: Tencent's dense Hunyuan 0.5B-7B): Llama with per-head q/k norms
# applied to the rotated queries and keys (`qk_norm_after_rope`), and a rotary base stretched by
# a fixed NTK `alpha` (its configs say "dynamic", but with `alpha` nothing depends on the
# length): base · alpha^(hd / (hd − 2)), imported as a plain rotary of that base, the same
# arithmetic transformers does.


def hunyuan_config(hf) -> dict[str, Any]:
    cfg = llama_config(hf)
    rope, hd = cfg["rope_parameters"], cfg["head_dim"]
    if rope.get("rope_type") == "dynamic" and rope.get("alpha"):
        cfg["rope_parameters"] = {"rope_type": "default", "rope_theta":
                                  rope["rope_theta"] * rope["alpha"] ** (hd / (hd - 2))}
    cfg.update(qk_norm=True, qk_norm_after_rope=True)
    return cfg


def hunyuan_block(w: DenseWeights, hf, i: int) -> dict[str, Tensor]:
    out = llama_block(w, hf, i)
    a = f"layers.{i}.self_attn."
    out["attn.q_norm.weight"] = w.get(f"{a}query_layernorm.weight")
    out["attn.k_norm.weight"] = w.get(f"{a}key_layernorm.weight")
    return out


# ERNIE 4.5 (`ernie4_5`: Baidu's dense ERNIE-4.5-0.3B): Llama with GLM's interleaved rotary
# over the whole head, and biases on every projection where `use_bias` says.


def ernie_config(hf) -> dict[str, Any]:
    cfg = llama_config(hf)
    bias = bool(getattr(hf, "use_bias", False))
    cfg.update(attention_bias=bias, attention_out_bias=bias, mlp_bias=bias)
    return cfg


def ernie_block(w: DenseWeights, hf, i: int) -> dict[str, Tensor]:
    return interleaved_rotary(llama_block(w, hf, i), ernie_config(hf))


def llama_attention(w: DenseWeights, hf, i: int) -> dict[str, Tensor]:
    """A Llama-shaped block's two norms and attention (everything but its FFN)."""
    p = f"layers.{i}."
    out = {"ln_1.weight": w.get(f"{p}input_layernorm.weight"),
           "ln_2.weight": w.get(f"{p}post_attention_layernorm.weight")}
    a = f"{p}self_attn."
    if w.has(f"{a}qkv_proj.weight"):  # Phi-3: already fused, rows q, k, v
        out["attn.c_attn.weight"] = w.get(f"{a}qkv_proj.weight")
    else:
        out["attn.c_attn.weight"] = torch.cat([w.get(f"{a}{x}_proj.weight") for x in "qkv"])
        if w.has(f"{a}q_proj.bias"):
            out["attn.c_attn.bias"] = torch.cat([w.get(f"{a}{x}_proj.bias") for x in "qkv"])
    out["attn.c_proj.weight"] = w.get(f"{a}o_proj.weight")
    if w.has(f"{a}q_norm.weight"):  # Qwen3: RMSNorm per query / key head
        out["attn.q_norm.weight"] = w.get(f"{a}q_norm.weight")
        out["attn.k_norm.weight"] = w.get(f"{a}k_norm.weight")
    if w.has(f"{a}o_proj.bias"):
        out["attn.c_proj.bias"] = w.get(f"{a}o_proj.bias")
    return out


def llama_outer(w: DenseWeights, hf) -> dict[str, Tensor]:
    return {"wte": w.get("embed_tokens.weight"), "ln_f.weight": w.get("norm.weight")}


# Mistral 3 (`mistral3`: Mistral Small 3.1/3.2, Magistral, Ministral 3 as published, image +
# text): the language model alone, a Mistral (`mistral`) or a Ministral 3 (`ministral3`:
# Mistral with YaRN and, past the rotary's original length, Llama 4's query scale, see
# layers.RotaryEmbedding); the vision tower and projector are left behind.
MISTRAL3_TEXT = ("mistral", "ministral", "ministral3")


def _mistral3_text_config(text) -> dict[str, Any]:
    if text.model_type not in MISTRAL3_TEXT:
        raise UpcycleError(f"mistral3: a language model of type {text.model_type!r} is not "
                           f"supported ({', '.join(MISTRAL3_TEXT)})")
    return llama_config(text)


mistral3_config = language_model_of(_mistral3_text_config)


def mistral3_outer(w: DenseWeights, hf) -> dict[str, Tensor]:
    out = llama_outer(w, hf)
    if not hf.tie_word_embeddings:  # (the outer config's flag, as transformers reads it)
        out["lm_head"] = w.under(("language_model.", "")).get("lm_head.weight")
    return out


# Granite (IBM, 3.x dense): Llama with four multipliers, each a linear scale that folds into
# weights — the embeddings (x embedding_multiplier; a tied head then gets its own unscaled copy),
# the attention scores (attention_multiplier in place of head_dim^-1/2: into q's rows, which
# the rotation commutes with), each block's two residual branches (x residual_multiplier:
# into o_proj and down_proj) and the logits (/ logits_scaling: into the head).

def _granite_scales(hf) -> tuple[float, float, float, float]:
    return (float(hf.embedding_multiplier), float(hf.logits_scaling),
            float(hf.residual_multiplier), float(hf.attention_multiplier))


def granite_config(hf) -> dict[str, Any]:
    cfg = llama_config(hf)
    embed, logits, _, _ = _granite_scales(hf)
    if embed != 1.0 or logits != 1.0:  # the table and the head scale differently
        cfg["tie_word_embeddings"] = False
    return cfg


def granite_block(w: DenseWeights, hf, i: int) -> dict[str, Tensor]:
    out = llama_block(w, hf, i)
    _, _, residual, attention = _granite_scales(hf)
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    q_rows = hf.num_attention_heads * head_dim
    q_scale = attention * head_dim ** 0.5  # the attention then applies head_dim^-1/2
    for name in ("attn.c_attn.weight", "attn.c_attn.bias"):
        if name in out:
            out[name] = out[name].clone()
            out[name][:q_rows] *= q_scale
    for name in ("attn.c_proj.weight", "attn.c_proj.bias", "ffn.down_proj.weight",
                 "ffn.down_proj.bias"):
        if name in out:
            out[name] = out[name] * residual
    return out


def granite_outer(w: DenseWeights, hf) -> dict[str, Tensor]:
    embed, logits, _, _ = _granite_scales(hf)
    table = w.get("embed_tokens.weight")
    out = {"wte": table * embed, "ln_f.weight": w.get("norm.weight")}
    if embed != 1.0 or logits != 1.0:
        top = w.under("")
        head = top.get("lm_head.weight") if not hf.tie_word_embeddings else table
        out["lm_head"] = head / logits
    return out


# Gemma 3 (text, `gemma3_text`: the 1B model and the language half of the larger ones saved
# as text models). Llama-shaped, with: norms that scale by (1 + weight) — folded, the weight
# becomes 1 + w; an RMSNorm on each branch's output before the residual add (sandwich_norms);
# GeGLU (gelu_pytorch_tanh); per-head q/k norms; attention scores scaled by
# query_pre_attn_scalar^-1/2 instead of head_dim^-1/2 — folded into the query norm's weight
# (the rotation is linear); embeddings scaled by sqrt(hidden_size) after the lookup
# (embedding_scale: the tied head keeps sharing the table); sliding-window blocks that rotate
# with their own base (rope_local_parameters); the logits soft-capped as Gemma 2's where a
# config sets final_logit_softcapping (Gemma 3's published configs do not).
#
# Gemma 2 is the same block without the per-head q/k norms and with one rotary base: the score
# scale folds into the query rows instead; and with soft-capping on, which the config carries
# (attention scores and final logits, each cap * tanh(x / cap)).


def _layered_rope(params: dict) -> dict:
    """One kind of block's rotary description from a config that keeps one per kind
    (`rope_parameters[layer_type]`): transformers' YaRN reads `truncate` from the outer dict
    there, which has none, so it always truncates — and so must we."""
    params = dict(params)
    if params.get("rope_type") == "yarn":
        params["truncate"] = True
    return params


def _text(hf):
    """A multimodal Gemma 3's text half (its config's `text_config`), else the config."""
    return getattr(hf, "text_config", None) or hf


def _gemma_checks(hf) -> None:
    """What Gemma 2 and 3 configs may ask for that these importers do not reproduce."""
    mt = hf.model_type
    if hf.hidden_activation != "gelu_pytorch_tanh":
        raise UpcycleError(f"{mt}: hidden_activation {hf.hidden_activation!r} is not supported "
                           f"(GeGLU with gelu_pytorch_tanh)")
    if getattr(hf, "use_bidirectional_attention", False):
        raise UpcycleError(f"{mt}: use_bidirectional_attention is not supported (causal only)")


def gemma3_config(hf) -> dict[str, Any]:
    _gemma_checks(hf)
    rope = hf.rope_parameters
    types = list(hf.layer_types)
    window, window_layers = sliding_window(hf)
    return dict(_common(hf), family="llama", d_model=hf.hidden_size, n_layer=hf.num_hidden_layers,
                n_head=hf.num_attention_heads, num_key_value_heads=hf.num_key_value_heads,
                head_dim=hf.head_dim, d_ff=hf.intermediate_size,
                max_position_embeddings=hf.max_position_embeddings,
                rope_parameters=_layered_rope(rope["full_attention"]),
                rope_local_parameters=_layered_rope(rope["sliding_attention"]),
                rope_local_layers=[i for i, t in enumerate(types) if t == "sliding_attention"],
                layer_norm_epsilon=hf.rms_norm_eps, hidden_act="gelu_pytorch_tanh",
                attention_bias=bool(hf.attention_bias), attention_out_bias=bool(hf.attention_bias),
                mlp_bias=False, qk_norm=True, sandwich_norms=True,
                embedding_scale=float(torch.tensor(hf.hidden_size ** 0.5, dtype=torch.float32)),
                # transformers' Gemma 3 keeps attn_logit_softcapping in its config but never
                # applies it; its head applies final_logit_softcapping
                final_logit_softcapping=getattr(hf, "final_logit_softcapping", None),
                sliding_window=window, sliding_window_layers=window_layers)


# Gemma 3 4B/12B/27B as published (`gemma3`, image + text): its language model alone
gemma3_multimodal_config = language_model_of(gemma3_config)


def _projections(w: DenseWeights, i: int) -> dict[str, Tensor]:
    """Block i's separate q/k/v/o projections (their biases where the source has them) fused
    into CAMEx's c_attn / c_proj, and its gated FFN's three bias-free projections (Gemma,
    OLMo)."""
    a, m = f"layers.{i}.self_attn.", f"layers.{i}.mlp."
    out = {"attn.c_attn.weight": torch.cat([w.get(f"{a}{x}_proj.weight") for x in "qkv"]),
           "attn.c_proj.weight": w.get(f"{a}o_proj.weight")}
    if w.has(f"{a}q_proj.bias"):
        out["attn.c_attn.bias"] = torch.cat([w.get(f"{a}{x}_proj.bias") for x in "qkv"])
        out["attn.c_proj.bias"] = w.get(f"{a}o_proj.bias")
    for proj in ("gate_proj", "up_proj", "down_proj"):
        out[f"ffn.{proj}.weight"] = w.get(f"{m}{proj}.weight")
    return out


def gemma2_config(hf) -> dict[str, Any]:
    _gemma_checks(hf)
    window, window_layers = sliding_window(hf)
    return dict(_common(hf), family="llama", d_model=hf.hidden_size, n_layer=hf.num_hidden_layers,
                n_head=hf.num_attention_heads, num_key_value_heads=hf.num_key_value_heads,
                head_dim=hf.head_dim, d_ff=hf.intermediate_size,
                max_position_embeddings=hf.max_position_embeddings,
                rope_parameters=dict(hf.rope_parameters), layer_norm_epsilon=hf.rms_norm_eps,
                hidden_act="gelu_pytorch_tanh", attention_bias=bool(hf.attention_bias),
                attention_out_bias=bool(hf.attention_bias), mlp_bias=False,
                sandwich_norms=True,
                embedding_scale=float(torch.tensor(hf.hidden_size ** 0.5, dtype=torch.float32)),
                attn_logit_softcapping=hf.attn_logit_softcapping,
                final_logit_softcapping=hf.final_logit_softcapping,
                sliding_window=window, sliding_window_layers=window_layers)


def gemma2_block(w: DenseWeights, hf, i: int) -> dict[str, Tensor]:
    """Gemma 3's block without q/k norms: query_pre_attn_scalar^-1/2 in the query rows."""
    p = f"layers.{i}."
    plus_one = lambda name: w.get(name) + 1.0  # noqa: E731  (Gemma's norms scale by 1 + w)
    q_rows = hf.num_attention_heads * hf.head_dim
    q_scale = (hf.head_dim / hf.query_pre_attn_scalar) ** 0.5
    out = {"ln_1.weight": plus_one(f"{p}input_layernorm.weight"),
           "ln_attn_out.weight": plus_one(f"{p}post_attention_layernorm.weight"),
           "ln_2.weight": plus_one(f"{p}pre_feedforward_layernorm.weight"),
           "ln_ffn_out.weight": plus_one(f"{p}post_feedforward_layernorm.weight"),
           **_projections(w, i)}
    for name in ("attn.c_attn.weight", "attn.c_attn.bias"):
        if name in out:
            out[name][:q_rows] *= q_scale  # (torch.cat made a copy)
    return out


def gemma3_block(w: DenseWeights, hf, i: int) -> dict[str, Tensor]:
    hf = _text(hf)
    p, a = f"layers.{i}.", f"layers.{i}.self_attn."
    plus_one = lambda name: w.get(name) + 1.0  # noqa: E731  (Gemma's norms scale by 1 + w)
    out = {"ln_1.weight": plus_one(f"{p}input_layernorm.weight"),
           "ln_attn_out.weight": plus_one(f"{p}post_attention_layernorm.weight"),
           "ln_2.weight": plus_one(f"{p}pre_feedforward_layernorm.weight"),
           "ln_ffn_out.weight": plus_one(f"{p}post_feedforward_layernorm.weight"),
           # our attention scales scores by head_dim^-1/2; Gemma by query_pre_attn_scalar^-1/2
           "attn.q_norm.weight": plus_one(f"{a}q_norm.weight")
           * (hf.head_dim / hf.query_pre_attn_scalar) ** 0.5,
           "attn.k_norm.weight": plus_one(f"{a}k_norm.weight"), **_projections(w, i)}
    return out


def gemma3_outer(w: DenseWeights, hf) -> dict[str, Tensor]:
    out = {"wte": w.get("embed_tokens.weight"), "ln_f.weight": w.get("norm.weight") + 1.0}
    if not hf.tie_word_embeddings:  # (a multimodal config's own flag, not its text half's)
        out["lm_head"] = w.under(("language_model.", "")).get("lm_head.weight")
    return out


# OLMo 2 / OLMo 3 (AI2's fully open models): Llama's SwiGLU blocks with the norms moved — none
# before the branches (pre_norms=False), an RMSNorm on each branch's output (sandwich_norms'
# output norms), and q/k norms over all query heads together and all key heads together
# (qk_norm_width "all"), before the rotary positions. OLMo 3 adds sliding-window blocks (three
# of every four) and a rotary description per kind of block (layer_types).


def olmo_config(hf) -> dict[str, Any]:
    mt = hf.model_type
    if hf.hidden_act != "silu":
        raise UpcycleError(f"{mt}: hidden_act {hf.hidden_act!r} is not supported (SwiGLU with "
                           f"silu)")
    heads = hf.num_attention_heads
    rope = dict(hf.rope_parameters)
    local = {}
    if "full_attention" in rope:  # OLMo 3: one description per kind of block
        full, sliding = _layered_rope(rope["full_attention"]), \
            _layered_rope(rope["sliding_attention"])
        rope = full
        if sliding != full:
            local = dict(rope_local_parameters=sliding, rope_local_layers=[
                i for i, t in enumerate(hf.layer_types) if t == "sliding_attention"])
    window, window_layers = sliding_window(hf)
    bias = bool(getattr(hf, "attention_bias", False))
    return dict(_common(hf), family="llama", d_model=hf.hidden_size, n_layer=hf.num_hidden_layers,
                n_head=heads, num_key_value_heads=hf.num_key_value_heads or heads,
                head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // heads,
                d_ff=hf.intermediate_size, max_position_embeddings=hf.max_position_embeddings,
                rope_parameters=rope, layer_norm_epsilon=hf.rms_norm_eps, hidden_act="silu",
                attention_bias=bias, attention_out_bias=bias, mlp_bias=False, qk_norm=True,
                qk_norm_width="all", pre_norms=False, sandwich_norms=True,
                sliding_window=window, sliding_window_layers=window_layers, **local)


def exaone4_config(hf) -> dict[str, Any]:
    """EXAONE 4.0 (LG AI Research, 1.2B / 32B): OLMo 2's block (norms on the branch outputs
    only) with Qwen3's q/k norms per head; with a window, three of four blocks slide and
    rotate, and the full ones attend without rotary positions."""
    cfg = olmo_config(hf)
    cfg.update(qk_norm_width="head")
    if getattr(hf, "sliding_window", None) is not None:
        cfg["nope_layers"] = [i for i, kind in enumerate(hf.layer_types)
                              if kind == "full_attention"] or None
    return cfg


def olmo_block(w: DenseWeights, hf, i: int) -> dict[str, Tensor]:
    p, a = f"layers.{i}.", f"layers.{i}.self_attn."
    return {"ln_attn_out.weight": w.get(f"{p}post_attention_layernorm.weight"),
            "ln_ffn_out.weight": w.get(f"{p}post_feedforward_layernorm.weight"),
            "attn.q_norm.weight": w.get(f"{a}q_norm.weight"),
            "attn.k_norm.weight": w.get(f"{a}k_norm.weight"), **_projections(w, i)}


# Sparse MoE sources (Mixtral, Qwen3-MoE, OLMoE): the CAMEx paper's starting point (its
# Algorithm 1 turns a model's SMoE layers into merged-expert layers). Each SMoE layer's N
# experts become the CAMEx layer's N routed experts, their mean the base E_m (so τ_i = E_i −
# mean), the source's gate its router. At init, with the curvature at the identity and α = 1,
# the merged FFN is Σ s_i E_i with s = softmax(gate · h̄): the experts averaged in weight space
# by the source's own router over the segment — not the source's top-k mixture of outputs, so
# not the source's logits: such a model is a starting point for fine-tuning, not a copy.


def _num_experts(hf) -> int:
    return int(getattr(hf, "num_local_experts", None) or hf.num_experts)


def smoe_config(hf) -> dict[str, Any]:
    mt = hf.model_type
    if mt == "qwen3_moe" and (list(getattr(hf, "mlp_only_layers", None) or ())
                              or getattr(hf, "decoder_sparse_step", 1) != 1):
        raise UpcycleError("qwen3_moe: dense layers between the MoE ones (mlp_only_layers, "
                           "decoder_sparse_step) are not supported: their FFN width differs")
    if mt == "olmoe" and getattr(hf, "clip_qkv", None) is not None:
        raise UpcycleError(f"olmoe: clip_qkv={hf.clip_qkv} is not supported")
    cfg = llama_config(hf)
    cfg.update(num_experts=_num_experts(hf), moe_layers=None,
               d_ff=getattr(hf, "moe_intermediate_size", None) or hf.intermediate_size)
    if mt == "olmoe":  # q/k norms over all heads together, as OLMo 2's
        cfg.update(qk_norm_width="all")
    return cfg


def smoe_block(w: DenseWeights, hf, i: int) -> dict[str, Tensor]:
    out = llama_attention(w, hf, i)
    if hf.model_type == "mixtral":
        m, names = f"layers.{i}.block_sparse_moe.", {"gate_proj": "w1", "up_proj": "w3",
                                                      "down_proj": "w2"}
    else:
        m, names = f"layers.{i}.mlp.", {p: p for p in ("gate_proj", "up_proj", "down_proj")}
    n = _num_experts(hf)
    for ours, theirs in names.items():
        out[f"experts.{ours}.weight"] = torch.stack(
            [w.get(f"{m}experts.{j}.{theirs}.weight") for j in range(n)])
    out["router.weight"] = w.get(f"{m}gate.weight")
    return out


# GPT-OSS (OpenAI's gpt-oss-20b / -120b): a sparse MoE of Llama-shaped blocks with biases on
# q/k/v/o, attention sinks (a learned logit per head that joins every softmax: `attention_sinks`),
# sliding-window and full blocks alternating, YaRN, a biased router (`router_bias`) and experts
# with biases whose SwiGLU is clamped ((up + 1) · gate · σ(1.702 · gate), gate ≤ 7, |up| ≤ 7:
# hidden_act "swigluoai"). transformers keeps each layer's experts as (E, in, out) stacks with
# the gate and up columns interleaved (gate even, up odd); the published checkpoints store them
# in MXFP4 (dequantized on reading, `dequantize_mxfp4`). As with Mixtral, the source's top-4
# mixture of outputs becomes a merge of all experts in weight space: a starting point.


def gpt_oss_config(hf) -> dict[str, Any]:
    cfg = smoe_config(hf)
    cfg.update(hidden_act="swigluoai", swiglu_limit=float(hf.swiglu_limit),
               swiglu_alpha=float(hf.swiglu_alpha), attention_sinks=True, router_bias=True,
               mlp_bias=True)
    return cfg


def gpt_oss_block(w: DenseWeights, hf, i: int) -> dict[str, Tensor]:
    out = llama_attention(w, hf, i)
    out["attn.sinks"] = w.get(f"layers.{i}.self_attn.sinks")
    m = f"layers.{i}.mlp."
    gate_up, gate_up_b = w.get(f"{m}experts.gate_up_proj"), w.get(f"{m}experts.gate_up_proj_bias")
    out["experts.gate_proj.weight"] = gate_up[..., 0::2].transpose(1, 2).contiguous()
    out["experts.up_proj.weight"] = gate_up[..., 1::2].transpose(1, 2).contiguous()
    out["experts.gate_proj.bias"], out["experts.up_proj.bias"] = \
        gate_up_b[:, 0::2].contiguous(), gate_up_b[:, 1::2].contiguous()
    out["experts.down_proj.weight"] = w.get(f"{m}experts.down_proj").transpose(1, 2).contiguous()
    out["experts.down_proj.bias"] = w.get(f"{m}experts.down_proj_bias")
    out["router.weight"], out["router.bias"] = w.get(f"{m}router.weight"), \
        w.get(f"{m}router.bias")
    return out


_GPT2 = Importer(gpt2_config, gpt2_block, gpt2_outer, "transformer.")
_LLAMA = Importer(llama_config, llama_block, llama_outer, "model.")
_GRANITE = Importer(granite_config, granite_block, granite_outer, "model.")
_GEMMA2 = Importer(gemma2_config, gemma2_block, gemma3_outer, "model.")
_OLMO = Importer(olmo_config, olmo_block, llama_outer, "model.")
_EXAONE4 = Importer(exaone4_config, olmo_block, llama_outer, "model.")
_GLM = Importer(glm_config, glm_block, llama_outer, "model.")
_ERNIE = Importer(ernie_config, ernie_block, llama_outer, "model.")
_HUNYUAN = Importer(hunyuan_config, hunyuan_block, llama_outer, "model.")
_SMOE = Importer(smoe_config, smoe_block, llama_outer, "model.", sparse=True)
_GPT_OSS = Importer(gpt_oss_config, gpt_oss_block, llama_outer, "model.", sparse=True)
_GEMMA3 = Importer(gemma3_config, gemma3_block, gemma3_outer, "model.")
# transformers 5 saves the language model under model.language_model., older releases (and the
# published checkpoints) under language_model.model.
_GEMMA3_MM = Importer(gemma3_multimodal_config, gemma3_block, gemma3_outer,
                      ("model.language_model.", "language_model.model."))
_MISTRAL3 = Importer(mistral3_config, llama_block, mistral3_outer,
                     ("model.language_model.", "language_model.model."))
IMPORTERS: dict[str, Importer] = {"gpt2": _GPT2, "llama": _LLAMA, "mistral": _LLAMA,
                                  "ministral": _LLAMA, "ministral3": _LLAMA,
                                  "mistral3": _MISTRAL3,
                                  "qwen2": _LLAMA, "qwen3": _LLAMA, "phi3": _LLAMA,
                                  "smollm3": _LLAMA, "granite": _GRANITE, "gemma2": _GEMMA2,
                                  "gemma3_text": _GEMMA3, "gemma3": _GEMMA3_MM,
                                  "olmo2": _OLMO, "olmo3": _OLMO, "exaone4": _EXAONE4,
                                  "seed_oss": _LLAMA, "glm": _GLM, "glm4": _GLM,
                                  "ernie4_5": _ERNIE, "hunyuan_v1_dense": _HUNYUAN,
                                  "mixtral": _SMOE, "qwen3_moe": _SMOE, "olmoe": _SMOE,
                                  "gpt_oss": _GPT_OSS}


# ---------------------------------------------------------------------------------------------
# Upcycling


def read_dense_config(path: Path):
    """The dense directory's transformers config, refusing what no importer handles."""
    from transformers import AutoConfig

    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise UpcycleError(f"{path}: no config.json (is this a Hugging Face model directory?)")
    model_type = json.loads(cfg_file.read_text()).get("model_type")
    if model_type not in IMPORTERS:
        raise UpcycleError(f"{path}: model_type {model_type!r} cannot be upcycled; supported: "
                           f"{', '.join(SUPPORTED)}")
    quantization_of(path)
    return AutoConfig.from_pretrained(str(path))


def camex_config_for(hf, head: str, overrides: dict[str, Any]) -> CamexConfig:
    """CamexConfig of the upcycled model: the source's architecture, CAMEx knobs from
    `overrides` (a window at least the served length is full attention: dropped)."""
    kwargs = IMPORTERS[hf.model_type].config(hf)
    if head == "classifier":
        kwargs.update(classifier_pooling="last", classifier_causal=True,
                      num_labels=hf.num_labels, id2label=dict(hf.id2label),
                      label2id=dict(hf.label2id), problem_type=hf.problem_type)
    for name in ("rope_parameters", "rope_local_parameters"):  # before overrides move it:
        params = kwargs.get(name)  # YaRN / LongRoPE without a factor: the source's stretch
        if params and params.get("rope_type") in ("yarn", "longrope") and \
                not params.get("factor"):
            kwargs[name] = params = {**params, "factor": kwargs["max_position_embeddings"]
                                     / params["original_max_position_embeddings"]}
        if params and params.get("rope_type") == "longrope":  # served below its switch
            kwargs["max_position_embeddings"] = min(kwargs["max_position_embeddings"],
                                                    params["original_max_position_embeddings"])
    if IMPORTERS[hf.model_type].sparse:  # the source fixes the experts and where they are
        n, layers = kwargs["num_experts"], list(range(kwargs["n_layer"]))
        if overrides.get("num_experts", n) != n:
            raise UpcycleError(f"{hf.model_type}: the source has {n} experts per MoE layer; "
                               f"num_experts {overrides['num_experts']} cannot be imported "
                               f"(leave it unset or {n})")
        if overrides.get("moe_layers") not in (None, layers):
            raise UpcycleError(f"{hf.model_type}: every layer of the source is a MoE layer; "
                               f"moe_layers {overrides['moe_layers']} cannot be imported")
        if overrides.get("dynamic"):
            raise UpcycleError(f"{hf.model_type}: Dynamic-Merg derives each later layer's base "
                               f"from the layer before; a sparse source's layers each have "
                               f"their own experts (import without dynamic)")
    kwargs.update(overrides)
    window = kwargs.get("sliding_window")
    if window is not None and window >= kwargs.get("max_position_embeddings", window + 1):
        kwargs.update(sliding_window=None, sliding_window_layers=None)
    try:
        return CamexConfig(**kwargs)
    except ValueError as e:
        raise UpcycleError(f"{hf.model_type}: {e}") from None


@torch.no_grad()
def upcycle_from_dense(path: str | Path, head: str = "auto", *, progress: bool = False,
                       **config_overrides: Any) -> CamexPreTrainedModel:
    """A training-form CAMEx model initialised from the dense checkpoint at ``path``.

    `head`: "auto" (a classifier for a ``*ForSequenceClassification`` source, else a causal
    LM), "lm", or "classifier" (from an LM source: a fresh score head, decoder pooling; pass
    num_labels/id2label/label2id in the overrides). `config_overrides` set CAMEx knobs
    (num_experts, moe_layers, segment_len, curvature_rank, merge_method, ...). `progress`: a
    bar on stderr, block by block (a large or quantized source reads for minutes)."""
    path = Path(path)
    hf = read_dense_config(path)
    arch = (getattr(hf, "architectures", None) or [""])[0]
    source_is_clf = arch.endswith("ForSequenceClassification")
    if source_is_clf and hf.model_type == "gemma3":
        raise UpcycleError("gemma3: the image-text model's classifier is not supported; "
                           "upcycle its language model as an LM (head='classifier' adds a "
                           "fresh head)")
    head = ("classifier" if source_is_clf else "lm") if head == "auto" else head
    if head not in ("lm", "classifier"):
        raise UpcycleError(f"head must be 'auto', 'lm' or 'classifier', got {head!r}")
    if head == "classifier" and not source_is_clf:
        config_overrides = {"classifier_pooling": "last", "classifier_causal": True,
                            **config_overrides}
        hf.num_labels = config_overrides.get("num_labels", hf.num_labels)
    cfg = camex_config_for(hf, head if source_is_clf else "lm", config_overrides)
    importer = IMPORTERS[hf.model_type]
    weights = DenseWeights(path, quantization_of(path))
    model = (CamexForSequenceClassification if head == "classifier" else CamexForCausalLM)(cfg)
    _copy_dense(model, weights, importer, hf, f"upcycling {path.name}" if progress else None)
    model.config.provenance = {**model.config.provenance, "upcycled_from": path.name,
                               "source_model_type": hf.model_type, "source_architecture": arch}
    _carry_generation_config(model, path)
    return model


def _copy_dense(model: CamexPreTrainedModel, w: DenseWeights, importer: Importer, hf,
                bar: str | None = None) -> None:
    """Every dense tensor into its CAMEx place; MoE FFNs get it as base and as every expert.
    `bar`: the description of a progress bar over the blocks (None: none)."""
    from tqdm.auto import tqdm

    tr = model.transformer
    top, body = w, w.under(importer.prefix)  # heads live outside the body's prefix
    outer = importer.outer(body, hf)
    tr.wte.weight.copy_(outer["wte"])
    if tr.wpe is not None:
        tr.wpe.weight.copy_(outer["wpe"])
    tr.ln_f.weight.copy_(outer["ln_f.weight"])
    if "ln_f.bias" in outer:
        tr.ln_f.bias.copy_(outer["ln_f.bias"])
    for i, block in enumerate(tqdm(tr.h, desc=bar, unit="block", disable=bar is None)):
        _copy_block(block, importer.block(body, hf, i))
    if isinstance(model, CamexForCausalLM):
        if "lm_head" in outer:  # the importer made it (Granite: scaled)
            model.lm_head.weight.copy_(outer["lm_head"])
        elif not model.config.tie_word_embeddings:
            model.lm_head.weight.copy_(top.get("lm_head.weight"))
    elif top.has("score.weight"):  # a classifier source; else the fresh head stays
        model.score.weight.copy_(top.get("score.weight"))
        if model.score.bias is not None and top.has("score.bias"):
            model.score.bias.copy_(top.get("score.bias"))


def _copy_block(block, tensors: dict[str, Tensor]) -> None:
    params = dict(block.named_parameters())
    ffn = {k[len("ffn."):]: v for k, v in tensors.items() if k.startswith("ffn.")}
    experts = {k[len("experts."):]: v for k, v in tensors.items() if k.startswith("experts.")}
    for name, value in tensors.items():
        if not name.startswith(("ffn.", "experts.", "router.")):
            _assign(params, name, value)
    if experts:  # a sparse-MoE source's layer: its experts, their mean as the base, its gate
        moe = block.ffn
        for name, stacked in experts.items():  # "gate_proj.weight": (E, out, in)
            proj, kind = name.rsplit(".", 1)
            _assign(params, f"ffn.experts.{proj}.{kind}", stacked)
            _assign(params, f"ffn.base.{proj}.{kind}", stacked.mean(dim=0))
        _assign(params, "ffn.router.weight", tensors["router.weight"])
        if "router.bias" in tensors:
            _assign(params, "ffn.router.bias", tensors["router.bias"])
        return
    if not block.is_moe:
        for name, value in ffn.items():
            _assign(params, f"ffn.{name}", value)
        return
    moe = block.ffn
    for name, value in ffn.items():  # "gate_proj.weight", "fc1.bias", ...
        proj, kind = name.rsplit(".", 1)
        if moe.base is not None:
            getattr(getattr(moe.base, proj), kind).copy_(value)
        stacked = getattr(getattr(moe.experts, proj), kind)
        stacked.copy_(value.expand_as(stacked))
    moe.router.weight.normal_(0.0, 0.02)


def _assign(params: dict[str, torch.nn.Parameter], name: str, value: Tensor) -> None:
    if name not in params:
        raise UpcycleError(f"dense tensor for {name!r} has no place in the CAMEx block "
                           f"(a bias the config does not declare?)")
    if tuple(params[name].shape) != tuple(value.shape):
        raise UpcycleError(f"dense tensor for {name!r} has shape {tuple(value.shape)}, the "
                           f"CAMEx block expects {tuple(params[name].shape)}")
    params[name].copy_(value)


def _carry_generation_config(model: CamexPreTrainedModel, path: Path) -> None:
    """The source's generation_config.json (EOS id lists, ...) travels with the model."""
    if isinstance(model, CamexForCausalLM) and (path / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(path))


@torch.no_grad()
def dense_reference_error(model: CamexPreTrainedModel, path: str | Path,
                          input_ids: Tensor | None = None) -> float:
    """Max relative logit error of `model` against the dense source at `path` (fp32, eval),
    loading the source with transformers (its eager attention: the reference, and the only
    one that soft-caps scores — sdpa skips a cap without a word). For tests and the trainer's
    upcycle check."""
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText,
                              AutoModelForSequenceClassification)

    is_clf = isinstance(model, CamexForSequenceClassification)
    auto = AutoModelForSequenceClassification if is_clf else AutoModelForCausalLM
    if not is_clf and type(AutoConfig.from_pretrained(str(path))) not in auto._model_mapping:
        auto = AutoModelForImageTextToText  # Mistral 3: the image-text model, on text alone
    kwargs = {}
    quant = quantization_of(Path(path))
    if quant is not None:  # dequantized weights, full-precision activations: what is imported
        from transformers import CompressedTensorsConfig, FineGrainedFP8Config, Mxfp4Config

        kwargs["quantization_config"] = {"fp8": FineGrainedFP8Config, "mxfp4": Mxfp4Config}.get(
            quant.method, CompressedTensorsConfig)(dequantize=True)
    try:
        with warnings.catch_warnings():  # "the checkpoint's quantization_config is used, with
            warnings.filterwarnings("ignore", message=".*quantization_config")  # dequantize"
            dense = auto.from_pretrained(str(path), dtype=torch.float32,
                                         attn_implementation="eager", **kwargs).eval()
    except ImportError as e:  # transformers loads FP8 checkpoints through accelerate
        raise UpcycleError(f"{path}: transformers cannot load the source to compare with "
                           f"({e}); install what it names, or skip the comparison "
                           f"(camex-train --no-verify-upcycle)") from None
    if input_ids is None:
        g = torch.Generator().manual_seed(0)
        L = min(model.config.max_position_embeddings, 3 * model.config.segment_len + 1, 64)
        input_ids = torch.randint(0, model.config.vocab_size, (2, L), generator=g)
    was_training = model.training
    model.eval()
    try:
        ref = dense(input_ids).logits
        got = model(input_ids).logits
    finally:
        model.train(was_training)
    return float((ref - got).abs().max() / ref.abs().max().clamp_min(1e-12))


