"""CamexConfig: the one description of a CAMEx model, shared by training, export and serving.

It is a `transformers.PretrainedConfig` (``model_type="camex"``) so a checkpoint directory loads
with ``AutoConfig``; importing :mod:`camex_runtime` registers it. The config knows nothing about
tensors; it only validates that the numbers describe a buildable model.

Two families share every CAMEx mechanism (routing, merging, folding, serving) and differ only in
the transformer around the merged FFNs (see docs/DESIGN.md, "Model families"):

- ``family="gpt2"``: LayerNorm, learned absolute positions, fused qkv with biases, GELU FFN
  ``fc2(gelu(fc1 x))``.
- ``family="llama"`` (Llama, Mistral, Qwen2, Qwen3, Phi-3, SmolLM3, Granite, Gemma 2 and 3,
  OLMo 2 and 3 import into it): RMSNorm, rotary positions (``nope_layers`` without; a second
  description for ``rope_local_layers``), grouped-query attention (``num_key_value_heads``),
  optional q/k/v biases (Qwen2), optional RMSNorm of queries and keys (``qk_norm``, per head as
  Qwen3 or over all heads as OLMo 2), optional pre-norms (OLMo 2 has none), optional
  sliding windows, optional norms on each branch's output (``sandwich_norms``, Gemma), optional
  soft-capped attention scores and logits (Gemma 2), SwiGLU FFN ``down(silu(gate x) * up x)``
  (or GeGLU, Gemma) whose three projections each merge with the same scores.

Named presets (``CamexConfig.from_preset("gpt2-small")``) follow gpt-fast's ``ModelArgs.from_name``.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

# The folded checkpoint format (checkpoint.py reads READABLE_FORMATS, refuses others).
# FORMAT_VERSION is the layout; FORMAT_NEW_ATTENTION marks a config whose model an older
# runtime would load but compute wrongly (per-head q/k norms, sliding windows, NoPE blocks: it
# would ignore them). Only such checkpoints are written with it, so older runtimes refuse them
# by number and keep reading every checkpoint they can serve (`CamexConfig.format_needed`).
# FORMAT_NEW_BLOCKS (3) likewise marks blocks an older runtime would misread: norms around
# each branch's output, GeGLU FFNs, a second rotary base (Gemma 3); FORMAT_CAPS_AND_NORMS (4)
# soft-capped attention scores or logits (Gemma 2), blocks without pre-norms and q/k norms over
# all heads together (OLMo 2); FORMAT_QUERY_SCALE (5) Llama 4's query scale past the rotary's
# original length (Ministral 3) on a model served that far; FORMAT_SINKS (6) attention sinks,
# biased routers and GPT-OSS's clamped SwiGLU (GPT-OSS), q/k norms after the rotation (Hunyuan).
FORMAT_VERSION = 1
FORMAT_NEW_ATTENTION = 2
FORMAT_NEW_BLOCKS = 3
FORMAT_CAPS_AND_NORMS = 4
FORMAT_QUERY_SCALE = 5
FORMAT_SINKS = 6
READABLE_FORMATS = (FORMAT_VERSION, FORMAT_NEW_ATTENTION, FORMAT_NEW_BLOCKS,
                    FORMAT_CAPS_AND_NORMS, FORMAT_QUERY_SCALE, FORMAT_SINKS)

MERGE_METHODS = ("domain_specific", "ties", "dare")
FAMILIES = ("gpt2", "llama")
# Activation of each family's FFN (the only one its blocks implement).
# llama: silu = SwiGLU, gelu_pytorch_tanh = GeGLU (Gemma), swigluoai = GPT-OSS's clamped SwiGLU
# ((up + 1) * gate * sigmoid(alpha * gate), gate clamped above at swiglu_limit, up to ±limit).
FAMILY_ACTIVATIONS = {"gpt2": ("gelu_new", "gelu_pytorch_tanh"),
                      "llama": ("silu", "gelu_pytorch_tanh", "swigluoai")}
# Rotary types whose frequencies do not depend on the sequence length: reproduced exactly with
# transformers' own initialisers. "dynamic", ... are refused at load. "longrope" (Phi-3.5,
# Phi-4-mini) changes every position's frequencies once a sequence passes its
# original_max_position_embeddings, which no KV cache can follow: it is served below that
# length only (its short factors), where it is static.
ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")
CLASSIFIER_POOLING = ("mean", "last")
QK_NORM_WIDTHS = ("head", "all")
ROUTING_MODES = ("segment", "prompt")
PROBLEM_TYPES = ("single_label_classification", "multi_label_classification", "regression")


class CamexConfig(PretrainedConfig):
    model_type = "camex"

    def __init__(
        self,
        # Transformer around the merged FFNs: "gpt2" or "llama" (module docstring).
        family: str = "gpt2",
        vocab_size: int = 50257,
        d_model: int = 768,
        n_layer: int = 12,
        n_head: int = 12,
        d_ff: int = 3072,
        max_position_embeddings: int = 1024,
        # llama: key/value heads of grouped-query attention (None = n_head, plain multi-head).
        num_key_value_heads: int | None = None,
        # Width of one attention head (None = d_model // n_head); some llama configs set it apart.
        head_dim: int | None = None,
        # llama: transformers' rotary description {"rope_type", "rope_theta", ...} (ROPE_TYPES).
        rope_parameters: dict[str, Any] | None = None,
        # Biases of the q/k/v projections, the attention output and the FFN projections.
        # None = the family's default (gpt2: all biased; llama: none; Qwen2 sets attention_bias).
        attention_bias: bool | None = None,
        attention_out_bias: bool | None = None,
        mlp_bias: bool | None = None,
        # llama: RMSNorm over each query and key head (its own weight, head_dim wide) before the
        # rotary positions, as Qwen3 does.
        qk_norm: bool = False,
        # llama, with qk_norm: "head" (Qwen3, Gemma 3: one RMSNorm over each head) or "all"
        # (OLMo 2: one RMSNorm over all query heads together, one over all key heads).
        qk_norm_width: str = "head",
        # llama, with qk_norm: the norms apply to the rotated queries and keys (Hunyuan), not
        # before the rotation.
        qk_norm_after_rope: bool = False,
        # llama: sliding-window attention, each token attending to itself and the window - 1
        # tokens before it (Mistral, Phi-3, Qwen2/Qwen3 with use_sliding_window), in the
        # blocks `sliding_window_layers` lists (None: every block); None: full attention.
        sliding_window: int | None = None,
        sliding_window_layers: list[int] | None = None,
        # llama: blocks whose attention has no rotary positions at all (NoPE; SmolLM3's every
        # fourth block); None: every block rotates.
        nope_layers: list[int] | None = None,
        # llama: the rotary description of the blocks `rope_local_layers` lists, where it
        # differs from `rope_parameters` (Gemma 3: its sliding-window blocks rotate with base
        # 10,000, the others with 1,000,000); None: one for every block.
        rope_local_parameters: dict[str, Any] | None = None,
        rope_local_layers: list[int] | None = None,
        # llama: an RMSNorm on the output of each block's attention and of its FFN, before
        # the residual add (Gemma 2/3's "sandwich" norms; `ln_attn_out`, `ln_ffn_out`).
        sandwich_norms: bool = False,
        # llama: False drops the norms before each branch (ln_1, ln_2): OLMo 2's blocks norm
        # only the branch outputs (with sandwich_norms).
        pre_norms: bool = True,
        # llama: token embeddings are multiplied by this after the lookup (Gemma: sqrt(d)),
        # so a tied head keeps sharing the table; None: not scaled.
        embedding_scale: float | None = None,
        # llama: soft-capping (Gemma 2): attention scores become cap * tanh(score / cap)
        # before the softmax, and the causal LM's logits likewise with their own cap; None: off.
        attn_logit_softcapping: float | None = None,
        final_logit_softcapping: float | None = None,
        # FFN activation; None = the family's (gpt2: gelu_new, llama: silu).
        hidden_act: str | None = None,
        # llama, hidden_act "swigluoai" (GPT-OSS): the clamp of the gate (above) and of the up
        # projection (both sides), and the gate's sigmoid slope.
        swiglu_limit: float = 7.0,
        swiglu_alpha: float = 1.702,
        # llama: every attention head has a learned logit that joins each query's softmax as
        # one more column without a value (attention sinks, GPT-OSS: `attn.sinks`, (n_head,)).
        attention_sinks: bool = False,
        # A bias in each merged-expert layer's router (GPT-OSS's routers have one).
        router_bias: bool = False,
        # Classifiers: "mean" pools the non-padding tokens (CAMEx encoders), "last" the last
        # non-padding token (transformers' *ForSequenceClassification of decoder families),
        # and `classifier_causal` keeps the decoder's causal attention for such upcycled heads.
        classifier_pooling: str = "mean",
        classifier_causal: bool = False,
        # Routed experts per MoE FFN (the base expert E_m is extra and never routed); 0 = dense.
        num_experts: int = 7,
        # Indices of blocks whose FFN is a merged-expert layer; None = every block.
        moe_layers: list[int] | None = None,
        # T of causal segment routing: segment k is served by the expert merged from segment k-1.
        segment_len: int = 256,
        # Scale of the merged domain vectors: E = E_m + alpha * sum_i s_i * Delta_i.
        alpha: float = 1.0,
        # Kronecker rank R of each curvature operator M_i; 0 = Euclidean merging (no curvature).
        curvature_rank: int = 1,
        merge_method: str = "domain_specific",
        # ties: fraction of largest-|tau| entries kept per expert before sign election
        # (1 = no trim).
        ties_density: float = 1.0,
        # dare: drop probability during training (eval and folded form are the identity).
        dare_p: float = 0.1,
        # Dynamic-Merg: only the first MoE layer owns a base; see docs/DESIGN.md §1.4.
        dynamic: bool = False,
        # Default inference routing mode: "segment" (training-consistent) or "prompt" (Lory).
        routing: str = "segment",
        layer_norm_epsilon: float = 1e-5,
        dropout: float = 0.0,
        initializer_range: float = 0.02,
        # Serving form: True once export has folded the curvature into the experts.
        folded: bool = False,
        format_version: int = FORMAT_VERSION,
        # Provenance written by the trainer/export: data, eval metrics, how it was made.
        provenance: dict[str, Any] | None = None,
        tie_word_embeddings: bool = True,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        **kwargs: Any,
    ) -> None:
        self.family = family
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.n_layer = n_layer
        self.n_head = n_head
        self.d_ff = d_ff
        self.max_position_embeddings = max_position_embeddings
        if head_dim is None and n_head > 0 and d_model % n_head:
            raise ValueError(f"d_model={d_model} is not divisible by n_head={n_head}")
        self.num_key_value_heads = n_head if num_key_value_heads is None else num_key_value_heads
        self.head_dim = head_dim if head_dim is not None else (d_model // n_head if n_head else 0)
        llama = family == "llama"
        self.rope_parameters = (dict(rope_parameters) if rope_parameters is not None else
                                {"rope_type": "default", "rope_theta": 10000.0}) if llama else None
        self.attention_bias = (not llama) if attention_bias is None else bool(attention_bias)
        self.attention_out_bias = ((not llama) if attention_out_bias is None
                                   else bool(attention_out_bias))
        self.mlp_bias = (not llama) if mlp_bias is None else bool(mlp_bias)
        self.qk_norm = bool(qk_norm)
        self.qk_norm_width = qk_norm_width
        self.qk_norm_after_rope = bool(qk_norm_after_rope)
        self.pre_norms = bool(pre_norms)
        self.sliding_window = None if sliding_window is None else int(sliding_window)
        self.sliding_window_layers = (None if sliding_window_layers is None
                                      else sorted(int(i) for i in sliding_window_layers))
        self.nope_layers = None if not nope_layers else sorted(int(i) for i in nope_layers)
        self.rope_local_parameters = (None if rope_local_parameters is None
                                      else dict(rope_local_parameters))
        self.rope_local_layers = (
            None if rope_local_parameters is None or rope_local_layers is None
            else sorted(int(i) for i in rope_local_layers))
        self.sandwich_norms = bool(sandwich_norms)
        self.embedding_scale = None if embedding_scale is None else float(embedding_scale)
        self.attn_logit_softcapping = (None if attn_logit_softcapping is None
                                       else float(attn_logit_softcapping))
        self.final_logit_softcapping = (None if final_logit_softcapping is None
                                        else float(final_logit_softcapping))
        self.hidden_act = hidden_act or ("silu" if llama else "gelu_new")
        self.swiglu_limit = float(swiglu_limit)
        self.swiglu_alpha = float(swiglu_alpha)
        self.attention_sinks = bool(attention_sinks)
        self.router_bias = bool(router_bias)
        self.classifier_pooling = classifier_pooling
        self.classifier_causal = bool(classifier_causal)
        self.num_experts = num_experts
        self.moe_layers = (list(range(n_layer)) if moe_layers is None
                           else sorted(int(i) for i in moe_layers))
        self.segment_len = segment_len
        self.alpha = alpha
        self.curvature_rank = curvature_rank
        self.merge_method = merge_method
        self.ties_density = ties_density
        self.dare_p = dare_p
        self.dynamic = dynamic
        self.routing = routing
        self.layer_norm_epsilon = layer_norm_epsilon
        self.dropout = dropout
        self.initializer_range = initializer_range
        self.folded = folded
        self.format_version = format_version
        self.provenance = dict(provenance or {})
        super().__init__(
            tie_word_embeddings=tie_word_embeddings,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            **kwargs,
        )
        self.validate_camex()

    # transformers' generic code (generate, pipelines) reads these standard names.
    @property
    def hidden_size(self) -> int:
        return self.d_model

    @property
    def num_hidden_layers(self) -> int:
        return self.n_layer

    @property
    def num_attention_heads(self) -> int:
        return self.n_head

    @property
    def uses_rope(self) -> bool:
        return self.family == "llama"

    def window(self, layer: int) -> int | None:
        """The attention window of block `layer` (tokens a query sees, itself included), None
        for full causal attention."""
        if self.sliding_window is None or (self.sliding_window_layers is not None
                                           and layer not in self.sliding_window_layers):
            return None
        return self.sliding_window

    def rotates(self, layer: int) -> bool:
        """Whether block `layer` applies rotary positions (the family has them, not NoPE)."""
        return self.uses_rope and layer not in (self.nope_layers or ())

    def local_rope(self, layer: int) -> bool:
        """Whether block `layer` rotates with `rope_local_parameters`."""
        return self.rope_local_parameters is not None and \
            layer in (self.rope_local_layers or ())

    def format_needed(self) -> int:
        """The oldest checkpoint format that describes this model (FORMAT_VERSION's comment)."""
        if self.attention_sinks or self.router_bias or self.hidden_act == "swigluoai" or \
                self.qk_norm_after_rope:
            return FORMAT_SINKS
        if any(p and p.get("llama_4_scaling_beta") and self.max_position_embeddings >
               p["original_max_position_embeddings"]
               for p in (self.rope_parameters, self.rope_local_parameters)):
            return FORMAT_QUERY_SCALE
        if self.attn_logit_softcapping is not None or self.final_logit_softcapping is not None \
                or not self.pre_norms or self.qk_norm and self.qk_norm_width != "head":
            return FORMAT_CAPS_AND_NORMS
        if self.sandwich_norms or self.rope_local_parameters is not None or \
                self.embedding_scale is not None or \
                (self.family == "llama" and self.hidden_act != "silu"):
            return FORMAT_NEW_BLOCKS
        new = self.qk_norm or self.sliding_window is not None or bool(self.nope_layers)
        return FORMAT_NEW_ATTENTION if new else FORMAT_VERSION

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0 and len(self.moe_layers) > 0

    def validate_camex(self) -> None:
        """Raise ValueError with the offending field when the numbers cannot build a model."""
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.n_head < 1 or self.head_dim < 1:
            raise ValueError(f"n_head and head_dim must be >= 1, "
                             f"got {self.n_head}, {self.head_dim}")
        kv = self.num_key_value_heads
        if kv < 1 or self.n_head % kv:
            raise ValueError(f"num_key_value_heads={kv} must divide n_head={self.n_head}")
        if self.family == "gpt2" and (kv != self.n_head
                                      or self.head_dim * self.n_head != self.d_model):
            raise ValueError("family 'gpt2' has plain multi-head attention: num_key_value_heads "
                             "must equal n_head and head_dim d_model // n_head")
        if self.qk_norm_width not in QK_NORM_WIDTHS:
            raise ValueError(f"qk_norm_width must be one of {QK_NORM_WIDTHS}, "
                             f"got {self.qk_norm_width!r}")
        if not self.pre_norms and not (self.family == "llama" and self.sandwich_norms):
            raise ValueError("pre_norms=False (OLMo 2's blocks) needs the llama family and "
                             "sandwich_norms: a block without any norm is not served")
        if self.qk_norm and self.family != "llama":
            raise ValueError("qk_norm (per-head RMSNorm of queries and keys) is a llama-family "
                             "option; family 'gpt2' has none")
        if self.sliding_window is not None:
            if self.family != "llama":
                raise ValueError("sliding_window is a llama-family option; family 'gpt2' "
                                 "attends to every earlier token")
            if self.sliding_window < 1:
                raise ValueError(f"sliding_window must be >= 1, got {self.sliding_window}")
            bad = [i for i in self.sliding_window_layers or () if not 0 <= i < self.n_layer]
            if bad:
                raise ValueError(f"sliding_window_layers {bad} out of range for "
                                 f"n_layer={self.n_layer}")
        if self.nope_layers:
            if self.family != "llama":
                raise ValueError("nope_layers is a llama-family option; family 'gpt2' has no "
                                 "rotary positions to leave out")
            bad = [i for i in self.nope_layers if not 0 <= i < self.n_layer]
            if bad:
                raise ValueError(f"nope_layers {bad} out of range for n_layer={self.n_layer}")
        if self.hidden_act not in FAMILY_ACTIVATIONS[self.family]:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported for family "
                             f"{self.family!r} (supported: {FAMILY_ACTIVATIONS[self.family]})")
        for name in ("rope_parameters", "rope_local_parameters"):
            params = getattr(self, name)
            if params is None:
                continue
            rope_type = params.get("rope_type", "default")
            if rope_type not in ROPE_TYPES:
                raise ValueError(f"{name}: rope_type {rope_type!r} is not supported "
                                 f"(its frequencies depend on the sequence length or are not "
                                 f"reproduced exactly); supported: {ROPE_TYPES}")
            old_len = params.get("original_max_position_embeddings")
            if rope_type == "longrope" and self.max_position_embeddings > old_len:
                raise ValueError(
                    f"{name}: longrope switches every position to its long factors once a "
                    f"sequence passes original_max_position_embeddings={old_len}, which a KV "
                    f"cache cannot follow; max_position_embeddings "
                    f"{self.max_position_embeddings} must be at most {old_len}")
            beta = params.get("llama_4_scaling_beta")
            if beta and not (isinstance(old_len, int) and old_len > 0):
                raise ValueError(f"{name}: llama_4_scaling_beta scales queries from "
                                 f"original_max_position_embeddings on, which must be a "
                                 f"positive length (got {old_len!r})")
            factor = params.get("partial_rotary_factor", 1.0)
            if not 0.0 < factor <= 1.0 or int(self.head_dim * factor) % 2:
                raise ValueError(f"{name}: partial_rotary_factor {factor} must be in "
                                 f"(0, 1] and give an even rotary width of head_dim "
                                 f"{self.head_dim}")
        if (self.rope_local_parameters is not None or self.sandwich_norms
                or self.embedding_scale is not None) and self.family != "llama":
            raise ValueError("rope_local_parameters, sandwich_norms and embedding_scale are "
                             "llama-family options")
        if self.attention_sinks and self.family != "llama":
            raise ValueError("attention_sinks is a llama-family option")
        if self.qk_norm_after_rope and not (self.qk_norm and self.qk_norm_width == "head"):
            raise ValueError("qk_norm_after_rope orders per-head q/k norms (qk_norm, "
                             "qk_norm_width \"head\") after the rotation: it needs them")
        if self.hidden_act == "swigluoai" and not (self.swiglu_limit > 0.0
                                                   and self.swiglu_alpha > 0.0):
            raise ValueError(f"swiglu_limit and swiglu_alpha must be positive, got "
                             f"{self.swiglu_limit}, {self.swiglu_alpha}")
        for name in ("attn_logit_softcapping", "final_logit_softcapping"):
            cap = getattr(self, name)
            if cap is not None and not (self.family == "llama" and 0.0 < cap < float("inf")):
                raise ValueError(f"{name} must be a positive number (llama family only), "
                                 f"got {cap} for family {self.family!r}")
        bad = [i for i in self.rope_local_layers or () if not 0 <= i < self.n_layer]
        if bad:
            raise ValueError(f"rope_local_layers {bad} out of range for n_layer={self.n_layer}")
        widths = {int(self.head_dim * p.get("partial_rotary_factor", 1.0))
                  for p in (self.rope_parameters, self.rope_local_parameters) if p is not None}
        if len(widths) > 1:
            raise ValueError("rope_local_parameters must rotate as many dimensions as "
                             "rope_parameters")
        if self.classifier_pooling not in CLASSIFIER_POOLING:
            raise ValueError(f"classifier_pooling must be one of {CLASSIFIER_POOLING}, "
                             f"got {self.classifier_pooling!r}")
        if self.num_experts < 0:
            raise ValueError(f"num_experts must be >= 0, got {self.num_experts}")
        if self.curvature_rank < 0:
            raise ValueError(f"curvature_rank must be >= 0, got {self.curvature_rank}")
        if self.segment_len < 1:
            raise ValueError(f"segment_len must be >= 1, got {self.segment_len}")
        if self.merge_method not in MERGE_METHODS:
            raise ValueError(f"merge_method must be one of {MERGE_METHODS}, "
                             f"got {self.merge_method!r}")
        if self.routing not in ROUTING_MODES:
            raise ValueError(f"routing must be one of {ROUTING_MODES}, got {self.routing!r}")
        if not 0.0 < self.ties_density <= 1.0:
            raise ValueError(f"ties_density must be in (0, 1], got {self.ties_density}")
        if not 0.0 <= self.dare_p < 1.0:
            raise ValueError(f"dare_p must be in [0, 1), got {self.dare_p}")
        bad = [i for i in self.moe_layers if not 0 <= i < self.n_layer]
        if bad:
            raise ValueError(f"moe_layers {bad} out of range for n_layer={self.n_layer}")
        pt = getattr(self, "problem_type", None)
        if pt is not None and pt not in PROBLEM_TYPES:
            raise ValueError(f"problem_type must be one of {PROBLEM_TYPES}, got {pt!r}")

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> CamexConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


PRESETS: dict[str, dict[str, Any]] = {
    # The benchmark shape (docs/DESIGN.md §9): GPT-2 small, 1 base + 7 routed experts per FFN.
    "gpt2-small": dict(vocab_size=50257, d_model=768, n_layer=12, n_head=12, d_ff=3072,
                       max_position_embeddings=1024, num_experts=7, segment_len=256),
    # Unit-test size: runs in milliseconds on a CPU.
    "tiny": dict(vocab_size=97, d_model=32, n_layer=2, n_head=4, d_ff=64,
                 max_position_embeddings=64, num_experts=3, segment_len=4),
    # The same, Llama-shaped: rotary, RMSNorm, 2 key/value heads for 4 query heads, SwiGLU.
    "tiny-llama": dict(family="llama", vocab_size=97, d_model=32, n_layer=2, n_head=4,
                       num_key_value_heads=2, d_ff=64, max_position_embeddings=64,
                       num_experts=3, segment_len=4, layer_norm_epsilon=1e-6,
                       tie_word_embeddings=False),
    # TinyLlama-1.1B's shape (random weights in benchmarks): 22 blocks, 32 heads, 4 KV heads.
    "tinyllama-1b": dict(family="llama", vocab_size=32000, d_model=2048, n_layer=22, n_head=32,
                         num_key_value_heads=4, d_ff=5632, max_position_embeddings=2048,
                         num_experts=7, moe_layers=list(range(1, 22, 2)), segment_len=256,
                         layer_norm_epsilon=1e-5, tie_word_embeddings=False),
}
