"""CAMEx transformer: blocks, the one block loop, and the transformers-facing models.

One source of truth for the architecture of every family (config.family): the pieces come from
`layers` (norms, rotary, attention, dense FFNs) and `experts` (merged-expert FFNs in training
and folded form, routing of full-sequence forwards). `CamexModel.run` is the only place a block
is applied, for training, reference forwards and the serving engine alike; what differs between
those is passed in as two contexts (the gpt-fast / vLLM model-runner pattern):

- an *attention context* (`layers.AttentionContext`): `FullAttention` here, the engine's KV-cache
  contexts when serving;
- a *routing context* with ``apply(layer, h) -> y`` for the merged-expert FFNs:
  `experts.ReferenceRouting` here, the engine's merge-cache-backed contexts when serving.

This module knows nothing of KV caches, batching or HTTP.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutput, SequenceClassifierOutput

from .config import CamexConfig
from .experts import (CamexMoEFFN, ExpertBank, LinearBank, ReferenceRouting,  # noqa: F401
                      RoutingRequest, StackedLinear, apply_moe, merged_ffn, next_bank_base,
                      route_scores, segment_means)
from .layers import (AttentionContext, CamexAttention, DenseFFN, FullAttention,  # noqa: F401
                     RMSNorm, RotaryEmbedding, family_of)
from .merging import KroneckerCurvature


def dropout(p: float) -> nn.Module:
    """Dropout, or nothing at all when p = 0 (serving runs these modules every step)."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


class RoutingContext(Protocol):
    """How the merged-expert FFN of block `layer` is applied to its inputs h (B, L, d)."""

    def apply(self, layer: int, h: Tensor) -> Tensor: ...


class CamexBlock(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1 x); x + ffn(ln_2 x). With `sandwich_norms`
    (Gemma 2/3) each branch's output is normed too: x + ln_attn_out(attn(ln_1 x)), then
    x + ln_ffn_out(ffn(ln_2 x)); without `pre_norms` (OLMo 2) ln_1 and ln_2 are identities."""

    def __init__(self, config: CamexConfig, layer: int) -> None:
        super().__init__()
        fam = family_of(config)
        self.layer = layer
        pre = (lambda: fam.norm(config.d_model, config.layer_norm_epsilon)) \
            if config.pre_norms else nn.Identity
        self.ln_1 = pre()
        self.attn = CamexAttention(config, layer)
        self.ln_2 = pre()
        if config.sandwich_norms:
            self.ln_attn_out = fam.norm(config.d_model, config.layer_norm_epsilon)
            self.ln_ffn_out = fam.norm(config.d_model, config.layer_norm_epsilon)
        else:
            self.ln_attn_out = self.ln_ffn_out = None
        self.drop = dropout(config.dropout)
        is_moe = config.num_experts > 0 and layer in config.moe_layers
        if is_moe:
            # Dynamic-Merg: only the first MoE layer owns a base, unless export materialised all.
            owns = config.folded or not config.dynamic or layer == config.moe_layers[0]
            self.ffn: nn.Module = CamexMoEFFN(config, owns_base=owns)
        else:
            self.ffn = DenseFFN(config)
        self.is_moe = is_moe

    def forward(self, x: Tensor, rope: tuple[Tensor, ...] | None, attn: AttentionContext,
                moe: RoutingContext) -> Tensor:
        a = self.attn(self.ln_1(x), attn, rope=rope)
        if self.ln_attn_out is not None:
            a = self.ln_attn_out(a)
        x = x + self.drop(a)
        h = self.ln_2(x)
        f = moe.apply(self.layer, h) if self.is_moe else self.ffn(h)
        if self.ln_ffn_out is not None:
            f = self.ln_ffn_out(f)
        return x + self.drop(f)


# ---------------------------------------------------------------------------------------------
# transformers models


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
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, StackedLinear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, KroneckerCurvature):
            for name, value in module.identity_init().items():
                init.copy_(getattr(module, name), value)


class CamexModel(CamexPreTrainedModel):
    """Embeddings, blocks and final norm; causal (LM) or bidirectional (encoder)."""

    def __init__(self, config: CamexConfig) -> None:
        super().__init__(config)
        fam = family_of(config)
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        # GPT-2 adds a learned position table; llama rotates q/k instead (no parameters).
        self.wpe = nn.Embedding(config.max_position_embeddings, config.d_model) \
            if fam.learned_positions else None
        self.rotary = RotaryEmbedding(config) if config.uses_rope else None
        # Gemma 3: the blocks config.local_rope names rotate with a second description
        self.rotary_local = RotaryEmbedding(config, config.rope_local_parameters) \
            if config.uses_rope and config.rope_local_parameters is not None else None
        # dtype of the activations when it differs from the weights' (set by the serving
        # engine's mixed precision: 16-bit weights, fp32 activations); None: the weights'
        self.activation_dtype: torch.dtype | None = None
        self.drop = dropout(config.dropout)
        self.h = nn.ModuleList(CamexBlock(config, i) for i in range(config.n_layer))
        self.ln_f = fam.norm(config.d_model, config.layer_norm_epsilon)
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
            banks[i] = block.ffn.expert_bank(derived)
            if self.config.dynamic and not self.config.folded:
                derived = next_bank_base(banks[i])  # the unmasked deltas (docs/DESIGN.md §1)
        return banks

    def run(self, input_ids: Tensor, positions: Tensor, attn: AttentionContext,
            moe: RoutingContext, *, layers: tuple[int, int] | None = None,
            hidden: Tensor | None = None) -> Tensor:
        """The block loop of every forward: (B, L) token ids at `positions` ((B, L) or (L,)
        absolute indices) -> final hidden states (B, L, d). `attn` says where keys and values
        come from, `moe` how merged-expert FFNs are routed and applied.

        `layers=(first, last)` runs blocks [first, last) only, starting from `hidden` (the
        output of block first-1) when first > 0; the final norm applies once the last block
        ran (the engine's layer-by-layer prefill of a routing span)."""
        first, last = layers if layers is not None else (0, len(self.h))
        if first == 0:
            x = self.wte(input_ids)
            if self.activation_dtype is not None:
                x = x.to(self.activation_dtype)
            if self.config.embedding_scale is not None:  # Gemma: sqrt(d), the head unscaled
                x = x * self.config.embedding_scale
            if self.wpe is not None:
                x = x + self.wpe(positions)
            x = self.drop(x)
        else:
            x = hidden
        rope = self.rotary(positions, x.dtype) if self.rotary is not None else None
        local = self.rotary_local(positions, x.dtype) if self.rotary_local is not None else rope
        for block in self.h[first:last]:
            x = block(x, local if block.attn.local_rope else rope, attn, moe)
        return self.ln_f(x) if last == len(self.h) else x

    def forward(self, input_ids: Tensor, *, causal: bool = True,
                attention_mask: Tensor | None = None,
                routing: RoutingRequest | None = None) -> tuple[Tensor, dict[int, Tensor]]:
        """(B, L) token ids -> hidden states (B, L, d) and router scores per MoE layer (B, K, E)."""
        B, L = input_ids.shape
        if L > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {L} tokens exceeds max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        routing = routing or RoutingRequest(mode="segment" if causal else "sequence")
        moe = ReferenceRouting(self.expert_banks(), routing, self.config.segment_len,
                               attention_mask, self.training)
        attn = FullAttention(causal, attention_mask)
        positions = torch.arange(L, device=input_ids.device)
        return self.run(input_ids, positions, attn, moe), moe.scores


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

    def logits(self, hidden: Tensor) -> Tensor:
        """The head on final hidden states (..., d) -> (..., V), soft-capped where the config
        caps logits (Gemma 2: cap * tanh(logits / cap)). Every path to logits goes through
        here (forward and the serving engine alike)."""
        logits = self.lm_head(hidden)
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                labels: Tensor | None = None, routing: str | None = None,
                route1_len: int | None = None, prompt_len: int | None = None,
                **kwargs) -> CausalLMOutput:
        """Logits (B, L, V); loss is next-token cross-entropy on ``labels`` (shifted inside,
        -100 ignored). Routing: docs/DESIGN.md §2; default ``segment``, full first segment."""
        _check_lm_attention_mask(attention_mask)
        plan = RoutingRequest(mode=routing or "segment", route1_len=route1_len,
                              prompt_len=prompt_len)
        hidden, scores = self.transformer(input_ids, causal=True, routing=plan)
        logits = self.logits(hidden)
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
    """CamexModel, pooling, linear head to ``num_labels``.

    CAMEx encoders (trained here) attend bidirectionally and pool the mean of the non-padding
    tokens; classifiers upcycled from a decoder's ``*ForSequenceClassification`` keep its causal
    attention and pool its last non-padding token, as transformers does
    (``classifier_causal``, ``classifier_pooling``). Routing is one merged expert per sequence
    and MoE layer from the masked mean of its tokens either way."""

    def __init__(self, config: CamexConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.transformer = CamexModel(config)
        # transformers' decoder classifiers have no bias on their score head
        self.score = nn.Linear(config.d_model, config.num_labels,
                               bias=config.classifier_pooling == "mean")
        self.post_init()

    def pool(self, hidden: Tensor, attention_mask: Tensor | None) -> Tensor:
        """(B, L, d) -> (B, d): mean over non-padding tokens, or the last non-padding token."""
        if self.config.classifier_pooling == "last":
            if attention_mask is None:
                return hidden[:, -1]
            L = hidden.shape[1]
            last = (attention_mask.long() * torch.arange(L, device=hidden.device)).argmax(-1)
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        if attention_mask is None:
            return hidden.mean(1)
        m = attention_mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                labels: Tensor | None = None, **kwargs) -> SequenceClassifierOutput:
        hidden, scores = self.transformer(input_ids, causal=self.config.classifier_causal,
                                          attention_mask=attention_mask,
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


SCORE_FUNCTIONS = ("softmax", "sigmoid", "none")


def classification_scores(config: CamexConfig, logits: Tensor, function: str | None = None
                          ) -> Tensor:
    """What a user sees as scores: softmax (single label), sigmoid (multi label), raw
    (regression); `function` (one of SCORE_FUNCTIONS; "none": the logits) overrides that."""
    if function is None:
        pt = config.problem_type or "single_label_classification"
        function = {"regression": "none", "multi_label_classification": "sigmoid"}.get(
            pt, "softmax")
    if function == "none":
        return logits.float()
    if function == "sigmoid":
        return torch.sigmoid(logits.float())
    return torch.softmax(logits.float(), dim=-1)
