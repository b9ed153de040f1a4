"""CamexConfig: the one description of a CAMEx model, shared by training, export and serving.

It is a `transformers.PretrainedConfig` (``model_type="camex"``) so a checkpoint directory loads
with ``AutoConfig``; importing :mod:`camex_runtime` registers it. The config knows nothing about
tensors; it only validates that the numbers describe a buildable model.

Named presets (``CamexConfig.from_preset("gpt2-small")``) follow gpt-fast's ``ModelArgs.from_name``.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

FORMAT_VERSION = 1  # bump when the folded checkpoint layout changes (checkpoint.py refuses others)

MERGE_METHODS = ("domain_specific", "ties", "dare")
ROUTING_MODES = ("segment", "prompt")
PROBLEM_TYPES = ("single_label_classification", "multi_label_classification", "regression")


class CamexConfig(PretrainedConfig):
    model_type = "camex"

    def __init__(
        self,
        vocab_size: int = 50257,
        d_model: int = 768,
        n_layer: int = 12,
        n_head: int = 12,
        d_ff: int = 3072,
        max_position_embeddings: int = 1024,
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
        # ties: fraction of largest-|tau| entries kept per expert before sign election (1 = no trim).
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
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.n_layer = n_layer
        self.n_head = n_head
        self.d_ff = d_ff
        self.max_position_embeddings = max_position_embeddings
        self.num_experts = num_experts
        self.moe_layers = list(range(n_layer)) if moe_layers is None else sorted(int(i) for i in moe_layers)
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
    def is_moe(self) -> bool:
        return self.num_experts > 0 and len(self.moe_layers) > 0

    def validate_camex(self) -> None:
        """Raise ValueError with the offending field when the numbers cannot build a model."""
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
        if self.num_experts < 0:
            raise ValueError(f"num_experts must be >= 0, got {self.num_experts}")
        if self.curvature_rank < 0:
            raise ValueError(f"curvature_rank must be >= 0, got {self.curvature_rank}")
        if self.segment_len < 1:
            raise ValueError(f"segment_len must be >= 1, got {self.segment_len}")
        if self.merge_method not in MERGE_METHODS:
            raise ValueError(f"merge_method must be one of {MERGE_METHODS}, got {self.merge_method!r}")
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
    def from_preset(cls, name: str, **overrides: Any) -> "CamexConfig":
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
}
