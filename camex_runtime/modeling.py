"""CAMEx transformer: blocks, attention, routing and merged-expert FFNs, in both forms.

One source of truth for the architecture. The *training form* (``config.folded=False``) holds
curvature operators and computes ``Δ_i = mask_i ⊙ M_i(τ_i)`` on every forward; the *folded
form* (``config.folded=True``, what export writes) holds ``E'_i`` and uses ``Δ_i = E'_i − E_m``.
Everything else — attention, blocks, routing, the merge formula — is shared, and the serving
engine reuses the same modules (``CamexAttention``, ``route_scores``, ``ExpertBank``).

Routing (docs/DESIGN.md §2): causal LM forwards use causal segment routing (``routing="segment"``:
segment k ≥ 2 is served by the expert merged from the mean FFN input of segment k−1, segment 1
by the mean of its first ``route1_len`` tokens) or one decision from the prompt mean
(``routing="prompt"``). The encoder routes once per sequence over its non-padding tokens.

This module knows nothing of KV caches, batching or HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutput, SequenceClassifierOutput

from .config import CamexConfig
from .merging import KroneckerCurvature, merge_experts, merge_mask, next_dynamic_base


# ---------------------------------------------------------------------------------------------
# Expert banks: what a merge needs, independent of how the deltas were produced.


@dataclass
class LinearBank:
    """One linear map of an MoE FFN as the merge sees it."""

    base_weight: Tensor   # (out, in)   E_m
    base_bias: Tensor     # (out,)
    delta_weight: Tensor  # (E, out, in) Δ_i = mask_i ⊙ M_i(τ_i)  (folded: E'_i − E_m)
    delta_bias: Tensor    # (E, out)     biases merge without curvature
    # Training form only: M_i(τ_i) and τ_i before the mask, which the Dynamic-Merg base chain
    # sums (docs/DESIGN.md §1.4); None where no mask applies (then they equal the deltas).
    unmasked_weight: Tensor | None = None
    unmasked_bias: Tensor | None = None

    def chain_parts(self) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """((E_m weight, Σ-able weight deltas), (bias, bias deltas)) for next_dynamic_base."""
        w = self.delta_weight if self.unmasked_weight is None else self.unmasked_weight
        b = self.delta_bias if self.unmasked_bias is None else self.unmasked_bias
        return (self.base_weight, w), (self.base_bias, b)


@dataclass
class ExpertBank:
    """Everything one MoE layer needs to route and merge."""

    router_weight: Tensor  # (E, d)  W_g, no bias
    fc1: LinearBank        # d -> d_ff
    fc2: LinearBank        # d_ff -> d
    alpha: float


def route_scores(router_weight: Tensor, mean_h: Tensor) -> Tensor:
    """s = softmax(W_g · h̄): (..., d) -> (..., E), computed in fp32 for bf16/fp16 stability."""
    return torch.softmax(mean_h.float() @ router_weight.float().T, dim=-1)


def ffn_activation(x: Tensor) -> Tensor:
    # GPT-2's "gelu_new" (tanh approximation), so upcycled models match GPT-2 exactly.
    return F.gelu(x, approximate="tanh")


def merged_ffn(x: Tensor, bank: ExpertBank, scores: Tensor) -> Tensor:
    """Apply one merged expert per group: x (S, t, d), scores (S, E) -> (S, t, d)."""
    a = bank.alpha
    w1 = merge_experts(bank.fc1.base_weight, bank.fc1.delta_weight, scores, a)  # (S, h, d)
    b1 = merge_experts(bank.fc1.base_bias, bank.fc1.delta_bias, scores, a)      # (S, h)
    w2 = merge_experts(bank.fc2.base_weight, bank.fc2.delta_weight, scores, a)  # (S, d, h)
    b2 = merge_experts(bank.fc2.base_bias, bank.fc2.delta_bias, scores, a)      # (S, d)
    # (S, t, d) @ (S, d, h) -> (S, t, h)
    hid = ffn_activation(torch.baddbmm(b1.unsqueeze(1), x, w1.transpose(1, 2)))
    return torch.baddbmm(b2.unsqueeze(1), hid, w2.transpose(1, 2))


# ---------------------------------------------------------------------------------------------
# Routing plans: which tokens share a merged expert, and which mean routes them.


def segment_means(h: Tensor, T: int, route1_len: int) -> Tensor:
    """Routing inputs of causal segment routing: (B, L, d) -> (B, K, d), K = ceil(L / T).

    Row 0 is the mean of the first ``route1_len`` tokens (segment 1 routes on itself); row k ≥ 1
    is the mean of segment k (0-based k−1), which is full whenever segment k+1 exists.
    """
    B, L, d = h.shape
    K = -(-L // T)
    r1 = max(1, min(route1_len, T, L))
    first = h[:, :r1].mean(1, keepdim=True)                       # (B, 1, d)
    if K == 1:
        return first
    prev = h[:, : (K - 1) * T].reshape(B, K - 1, T, d).mean(2)    # (B, K-1, d)
    return torch.cat([first, prev], dim=1)


def apply_moe(h: Tensor, bank: ExpertBank, *, mode: str, T: int, route1_len: int | None,
              prompt_len: int | None, pad_mask: Tensor | None, training: bool
              ) -> tuple[Tensor, Tensor]:
    """Route and apply one MoE FFN to its inputs h (B, L, d). Returns (output, scores (B, K, E))."""
    B, L, d = h.shape
    if mode == "sequence":  # encoder: one merge per sequence over its non-padding tokens
        m = torch.ones(B, L, 1, dtype=h.dtype, device=h.device) if pad_mask is None \
            else pad_mask.to(h.dtype).unsqueeze(-1)
        mean = (h * m).sum(1) / m.sum(1).clamp_min(1.0)           # (B, d)
        scores = route_scores(bank.router_weight, mean)           # (B, E)
        return merged_ffn(h, bank, scores), scores.unsqueeze(1)
    if mode == "prompt":
        P = L if prompt_len is None else max(1, min(prompt_len, L))
        scores = route_scores(bank.router_weight, h[:, :P].mean(1))   # (B, E)
        return merged_ffn(h, bank, scores), scores.unsqueeze(1)
    if mode != "segment":
        raise ValueError(f"unknown routing mode {mode!r}")
    means = segment_means(h, T, T if route1_len is None else route1_len)  # (B, K, d)
    K = means.shape[1]
    scores = route_scores(bank.router_weight, means)              # (B, K, E)
    if training:
        # Segment 1 routes on its own mean, which includes tokens it then predicts: its scores
        # are stop-gradient (the paper's s_0 = DETACH(G(h̄_1))), so neither the router nor
        # the activations learn from that look-ahead.
        scores = torch.cat([scores[:, :1].detach(), scores[:, 1:]], dim=1)
    pad = K * T - L
    hp = F.pad(h, (0, 0, 0, pad)) if pad else h
    # Each (sequence, segment) is one group with its own merged expert.
    out = merged_ffn(hp.reshape(B * K, T, d), bank, scores.reshape(B * K, -1))
    return out.reshape(B, K * T, d)[:, :L], scores


# ---------------------------------------------------------------------------------------------
# Modules


class CamexAttention(nn.Module):
    """Multi-head self-attention with GPT-2's fused qkv projection."""

    def __init__(self, config: CamexConfig) -> None:
        super().__init__()
        self.n_head, self.d_model = config.n_head, config.d_model
        self.c_attn = nn.Linear(config.d_model, 3 * config.d_model)
        self.c_proj = nn.Linear(config.d_model, config.d_model)

    def split_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, L, d) -> q, k, v each (B, H, L, d/H)."""
        B, L, _ = x.shape
        qkv = self.c_attn(x).view(B, L, 3, self.n_head, self.d_model // self.n_head)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def merge_heads(self, o: Tensor) -> Tensor:
        """(B, H, L, hd) -> c_proj((B, L, d))."""
        B, H, L, hd = o.shape
        return self.c_proj(o.transpose(1, 2).reshape(B, L, H * hd))

    def forward(self, x: Tensor, *, causal: bool, key_padding_mask: Tensor | None = None) -> Tensor:
        q, k, v = self.split_qkv(x)
        mask = None
        if key_padding_mask is not None:
            mask = key_padding_mask[:, None, None, :].bool()      # (B, 1, 1, L) True = attend
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
        return self.merge_heads(o)


class DenseFFN(nn.Module):
    """A plain GPT-2 FFN: blocks outside ``moe_layers`` and the dense baseline."""

    def __init__(self, config: CamexConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.d_model, config.d_ff)
        self.fc2 = nn.Linear(config.d_ff, config.d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(ffn_activation(self.fc1(x)))


class StackedLinear(nn.Module):
    """E linear maps stored as one tensor: weight (E, out, in), bias (E, out)."""

    def __init__(self, num: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num, out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(num, out_features))


class ExpertPair(nn.Module):
    """fc1 and fc2 of E experts."""

    def __init__(self, num: int, d: int, h: int) -> None:
        super().__init__()
        self.fc1 = StackedLinear(num, d, h)
        self.fc2 = StackedLinear(num, h, d)


class CamexMoEFFN(nn.Module):
    """Merged-expert FFN: router, base expert E_m (absent in later Dynamic-Merg layers of the
    training form), routed experts E_1..E_E, and — training form only — curvature operators."""

    def __init__(self, config: CamexConfig, owns_base: bool) -> None:
        super().__init__()
        E, d, h = config.num_experts, config.d_model, config.d_ff
        self.config = config
        self.router = nn.Linear(d, E, bias=False)
        self.base = DenseFFN(config) if owns_base else None
        self.experts = ExpertPair(E, d, h)
        self.curvature = None
        if not config.folded and config.curvature_rank > 0:
            R = config.curvature_rank
            self.curvature = nn.ModuleDict({
                "fc1": KroneckerCurvature(E, h, d, R),
                "fc2": KroneckerCurvature(E, d, h, R),
            })

    def own_base(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        b = self.base
        return b.fc1.weight, b.fc1.bias, b.fc2.weight, b.fc2.bias

    def _deltas(self, name: str, base_w: Tensor, base_b: Tensor) -> LinearBank:
        lin: StackedLinear = getattr(self.experts, name)
        tau_w, tau_b = lin.weight - base_w, lin.bias - base_b      # (E, out, in), (E, out)
        if self.config.folded:  # E'_i − E_m: mask and curvature were applied at export
            return LinearBank(base_w, base_b, tau_w, tau_b)
        c = self.config
        kw = dict(training=self.training, ties_density=c.ties_density, dare_p=c.dare_p)
        mask_w = merge_mask(c.merge_method, tau_w, **kw)
        mask_b = merge_mask(c.merge_method, tau_b, **kw)
        mw = self.curvature[name](tau_w) if self.curvature is not None else tau_w  # M_i(τ_i)
        dw = mw * mask_w if mask_w is not None else mw
        db = tau_b * mask_b if mask_b is not None else tau_b
        return LinearBank(base_w, base_b, dw, db,
                          unmasked_weight=mw if mask_w is not None else None,
                          unmasked_bias=tau_b if mask_b is not None else None)

    def expert_bank(self, base: tuple[Tensor, Tensor, Tensor, Tensor] | None = None) -> ExpertBank:
        """The bank of this layer; ``base`` is the derived E_m of a Dynamic-Merg chain."""
        w1, b1, w2, b2 = self.own_base() if self.base is not None else base
        return ExpertBank(self.router.weight, self._deltas("fc1", w1, b1),
                          self._deltas("fc2", w2, b2), float(self.config.alpha))


class CamexBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1 x); x + ffn(ln_2 x)."""

    def __init__(self, config: CamexConfig, layer: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.attn = CamexAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        is_moe = config.num_experts > 0 and layer in config.moe_layers
        if is_moe:
            # Dynamic-Merg: only the first MoE layer owns a base, unless export materialised all.
            owns = config.folded or not config.dynamic or layer == config.moe_layers[0]
            self.ffn: nn.Module = CamexMoEFFN(config, owns_base=owns)
        else:
            self.ffn = DenseFFN(config)
        self.is_moe = is_moe


# ---------------------------------------------------------------------------------------------
# transformers models


@dataclass
class RoutingRequest:
    """How a full forward routes its MoE layers (see module docstring)."""

    mode: str = "segment"            # "segment" | "prompt" | "sequence" (encoder)
    route1_len: int | None = None    # segment mode: tokens whose mean routes segment 1 (≤ T)
    prompt_len: int | None = None    # prompt mode: tokens whose mean routes everything


class CamexPreTrainedModel(PreTrainedModel):
    config_class = CamexConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["CamexBlock"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, StackedLinear):
            init.normal_(module.weight, mean=0.0, std=std)
            init.zeros_(module.bias)
        elif isinstance(module, KroneckerCurvature):
            for name, value in module.identity_init().items():
                init.copy_(getattr(module, name), value)


class CamexModel(CamexPreTrainedModel):
    """Embeddings, blocks and final LayerNorm; causal (LM) or bidirectional (encoder)."""

    def __init__(self, config: CamexConfig) -> None:
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.wpe = nn.Embedding(config.max_position_embeddings, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(CamexBlock(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.wte = value

    def expert_banks(self) -> dict[int, ExpertBank]:
        """Bank per MoE layer, walking the Dynamic-Merg base chain where the config asks for it."""
        banks: dict[int, ExpertBank] = {}
        derived = None
        for i, block in enumerate(self.h):
            if not block.is_moe:
                continue
            bank = block.ffn.expert_bank(derived)
            banks[i] = bank
            if self.config.dynamic and not self.config.folded:
                # E_m^{l+1} = E_m^l + α/E Σ_i M_i^l(τ_i^l), unmasked deltas (docs/DESIGN.md §1.4)
                a = bank.alpha
                derived = tuple(next_dynamic_base(base, deltas, a) for base, deltas in
                                (*bank.fc1.chain_parts(), *bank.fc2.chain_parts()))
        return banks

    def forward(self, input_ids: Tensor, *, causal: bool = True, attention_mask: Tensor | None = None,
                routing: RoutingRequest | None = None) -> tuple[Tensor, dict[int, Tensor]]:
        """(B, L) token ids -> hidden states (B, L, d) and router scores per MoE layer (B, K, E)."""
        B, L = input_ids.shape
        if L > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {L} tokens exceeds max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        routing = routing or RoutingRequest(mode="segment" if causal else "sequence")
        pos = torch.arange(L, device=input_ids.device)
        x = self.drop(self.wte(input_ids) + self.wpe(pos))
        banks = self.expert_banks()
        all_scores: dict[int, Tensor] = {}
        for i, block in enumerate(self.h):
            x = x + self.drop(block.attn(block.ln_1(x), causal=causal,
                                         key_padding_mask=None if causal else attention_mask))
            h = block.ln_2(x)
            if i in banks:
                y, all_scores[i] = apply_moe(h, banks[i], mode=routing.mode, T=self.config.segment_len,
                                             route1_len=routing.route1_len, prompt_len=routing.prompt_len,
                                             pad_mask=attention_mask, training=self.training)
            else:
                y = block.ffn(h)
            x = x + self.drop(y)
        return self.ln_f(x), all_scores


def _check_lm_attention_mask(attention_mask: Tensor | None) -> None:
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError("CamexForCausalLM.forward takes unpadded sequences (routing means would "
                         "include padding); use camex_runtime.Engine for ragged batches")


class CamexForCausalLM(CamexPreTrainedModel, GenerationMixin):
    """Causal LM head on a causal CamexModel; full-sequence forwards only (no KV cache here —
    incremental decoding is the serving engine's job)."""

    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: CamexConfig) -> None:
        super().__init__(config)
        self.transformer = CamexModel(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None,
                routing: str | None = None, route1_len: int | None = None, prompt_len: int | None = None,
                **kwargs) -> CausalLMOutput:
        """Logits (B, L, V); loss is next-token cross-entropy on ``labels`` (shifted inside,
        -100 ignored). Routing: docs/DESIGN.md §2; default ``segment``, full first segment."""
        _check_lm_attention_mask(attention_mask)
        plan = RoutingRequest(mode=routing or "segment", route1_len=route1_len, prompt_len=prompt_len)
        hidden, scores = self.transformer(input_ids, causal=True, routing=plan)
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        out = CausalLMOutput(loss=loss, logits=logits)
        out.router_scores = scores  # per MoE layer (B, K, E): routing transparency and tests
        return out

    def prepare_inputs_for_generation(self, input_ids: Tensor, **kwargs) -> dict:
        # No KV cache in the reference model: every generate step re-runs the whole sequence,
        # which is exactly the research-code baseline the serving engine is measured against.
        return {"input_ids": input_ids}


class CamexForSequenceClassification(CamexPreTrainedModel):
    """Bidirectional CamexModel, masked-mean pooling, linear head to ``num_labels``."""

    def __init__(self, config: CamexConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.transformer = CamexModel(config)
        self.score = nn.Linear(config.d_model, config.num_labels)
        self.post_init()

    def pool(self, hidden: Tensor, attention_mask: Tensor | None) -> Tensor:
        """(B, L, d) -> (B, d): mean over non-padding tokens."""
        if attention_mask is None:
            return hidden.mean(1)
        m = attention_mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None,
                **kwargs) -> SequenceClassifierOutput:
        hidden, scores = self.transformer(input_ids, causal=False, attention_mask=attention_mask,
                                          routing=RoutingRequest(mode="sequence"))
        logits = self.score(self.pool(hidden, attention_mask))    # (B, num_labels)
        loss = None if labels is None else classification_loss(self.config, logits, labels)
        out = SequenceClassifierOutput(loss=loss, logits=logits)
        out.router_scores = scores
        return out


def classification_loss(config: CamexConfig, logits: Tensor, labels: Tensor) -> Tensor:
    pt = config.problem_type or "single_label_classification"
    if pt == "regression":
        return F.mse_loss(logits.squeeze(-1).float(), labels.float())
    if pt == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float())
    return F.cross_entropy(logits.float(), labels.long())


def classification_scores(config: CamexConfig, logits: Tensor) -> Tensor:
    """What a user sees as scores: softmax (single label), sigmoid (multi label), raw (regression)."""
    pt = config.problem_type or "single_label_classification"
    if pt == "regression":
        return logits.float()
    if pt == "multi_label_classification":
        return torch.sigmoid(logits.float())
    return torch.softmax(logits.float(), dim=-1)
