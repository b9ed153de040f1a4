"""Llama-family CAMEx (Llama, Mistral, Ministral and Ministral 3, Mistral 3's language model,
Qwen2, Qwen3, Phi-3, SmolLM3, Seed-OSS, ERNIE 4.5, Hunyuan, Granite, Gemma 2 and 3, OLMo 2
and 3, EXAONE 4; GPT-OSS with identical experts, tests/model/test_gpt_oss.py for the rest):
upcycled exactly from transformers' dense models, folded exactly, refused where it cannot be
exact, saved and loaded by the Auto classes. Tiny random models built locally; GQA on
everywhere."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import camex_runtime as cr
from camex_runtime.upcycle import UpcycleError, dense_reference_error

from tests.dense_models import (CLASSIFIERS, COMMON, FAMILIES, build_dense,
                                build_dense_classifier, move_off_init, random_ids, spread)

FAMILY_NAMES = sorted(FAMILIES)


def rel_err(ref, got):
    return float((ref - got).abs().max() / ref.abs().max())


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_upcycle_is_exact_at_init(tmp_path, family):
    dense_dir = build_dense(tmp_path / family, family)
    model = cr.upcycle_from_dense(dense_dir, num_experts=3, segment_len=4)
    assert model.config.family == "llama" and model.config.num_key_value_heads == 2
    assert model.config.provenance["source_model_type"] == family
    dense = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval()
    ids = random_ids(13, seed=0, batch=2)  # several segments of T=4
    with torch.no_grad():
        ref, got = dense(ids).logits, model.eval()(ids).logits
    assert rel_err(ref, got) <= 1e-5


@pytest.mark.parametrize("overrides", [
    {"moe_layers": [1], "curvature_rank": 2, "merge_method": "ties"},
    {"dynamic": True},
    {"num_experts": 0},
], ids=["moe-subset-ties-rank2", "dynamic", "dense"])
def test_upcycle_variants_are_exact(tmp_path, overrides):
    dense_dir = build_dense(tmp_path / "qwen2", "qwen2")  # q/k/v biases, untied head
    model = cr.upcycle_from_dense(dense_dir, segment_len=4, **{"num_experts": 3, **overrides})
    assert dense_reference_error(model, dense_dir, random_ids(11, seed=1, batch=2)) <= 1e-5


@pytest.mark.parametrize("hf_overrides", [
    {"tie_word_embeddings": False, "attention_bias": False, "mlp_bias": True},
    {"embedding_multiplier": 1.0, "logits_scaling": 1.0},  # the head stays tied
], ids=["untied-mlp-bias", "no-embedding-scales"])
def test_granite_variants_are_exact(tmp_path, hf_overrides):
    """Granite's multipliers fold into the weights: an untied head is scaled on its own; with
    embedding and logit scales of 1 the tied head stays tied (no second table)."""
    dense_dir = build_dense(tmp_path / "granite", "granite", **hf_overrides)
    model = cr.upcycle_from_dense(dense_dir, num_experts=2, segment_len=4)
    tied = hf_overrides.get("embedding_multiplier") == 1.0
    assert model.config.tie_word_embeddings is tied
    assert dense_reference_error(model, dense_dir, random_ids(40, seed=2, batch=2)) <= 1e-5


@pytest.mark.parametrize("hf_overrides", [
    {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32}},
    {"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True, "rope_theta": 500.0},
    {"head_dim": 24},
    # YaRN as Qwen2.5/Qwen3 long-context configs write it (a band of dimensions the tests'
    # 16-wide heads cross), and DeepSeek's mscale form without attention_factor or truncation
    {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}},
    {"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64,
                      "mscale": 0.9, "mscale_all_dim": 0.6, "beta_fast": 16,
                      "truncate": False}},
], ids=["rope-linear", "rope-llama3", "biases-tied-theta", "head-dim", "rope-yarn",
        "rope-yarn-mscale"])
def test_llama_config_variants_are_exact(tmp_path, hf_overrides):
    dense_dir = build_dense(tmp_path / "llama", "llama", **hf_overrides)
    model = cr.upcycle_from_dense(dense_dir, num_experts=2, segment_len=4)
    assert dense_reference_error(model, dense_dir, random_ids(40, seed=2, batch=2)) <= 1e-5


def test_yarn_without_a_factor_keeps_the_sources_frequencies_at_another_served_length(
        tmp_path):
    """YaRN with no `factor` stretches to max_position_embeddings / original (transformers'
    rule, DeepSeek's configs): read from the source at import, so serving a shorter length
    (128 -> 64 here) rotates as the source does."""
    dense_dir = build_dense(tmp_path / "llama", "llama", rope_scaling={
        "rope_type": "yarn", "factor": None, "original_max_position_embeddings": 32})
    model = cr.upcycle_from_dense(dense_dir, num_experts=2, segment_len=4,
                                  max_position_embeddings=64)
    assert model.config.rope_parameters["factor"] == 128 / 32
    assert dense_reference_error(model, dense_dir, random_ids(40, seed=2, batch=2)) <= 1e-5


def test_gemma3_yarn_full_blocks_truncate_as_transformers_does(tmp_path):
    """A config with one rotary description per kind of block (Gemma 3's): transformers' YaRN
    truncates its band there whatever the description says (base and length chosen so that
    truncating moves the band's edge from dimension 4.03 to 5)."""
    rope = {"full_attention": {"rope_type": "yarn", "factor": 8.0, "rope_theta": 100.0,
                               "original_max_position_embeddings": 64, "truncate": False},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    dense_dir = build_dense(tmp_path / "g", "gemma3_text", rope_parameters=rope)
    model = cr.upcycle_from_dense(dense_dir, num_experts=2, segment_len=4)
    assert dense_reference_error(model, dense_dir, random_ids(40, seed=4, batch=2)) <= 1e-5


@pytest.mark.parametrize("rotary", [1.0, 0.5], ids=["full", "partial"])
def test_longrope_serves_below_its_switch_with_the_short_factors(tmp_path, rotary):
    """Phi-3.5 / Phi-4-mini's LongRoPE: below original_max_position_embeddings transformers
    rotates with the short factors (and the attention factor of the whole stretch); past it,
    every position with the long ones. The served length stops at the switch (64 of 128
    here), exact up to it; asking for more is refused by name."""
    rot = int(16 * rotary)
    dense_dir = build_dense(tmp_path / "phi", "phi3", partial_rotary_factor=rotary,
                            original_max_position_embeddings=64, rope_scaling={
        "rope_type": "longrope", "original_max_position_embeddings": 64,
        "short_factor": [1.0 + 0.3 * i for i in range(rot // 2)],
        "long_factor": [4.0 + i for i in range(rot // 2)]})
    model = cr.upcycle_from_dense(dense_dir, num_experts=2, segment_len=4)
    assert model.config.max_position_embeddings == 64
    assert dense_reference_error(model, dense_dir, random_ids(60, seed=3, batch=2)) <= 1e-5
    with pytest.raises(UpcycleError, match="longrope switches every position .* at most 64"):
        cr.upcycle_from_dense(dense_dir, num_experts=2, segment_len=4,
                              max_position_embeddings=128)


def test_ministral3_scales_queries_past_its_original_length(tmp_path):
    """Ministral 3 multiplies every query by 1 + beta * log(1 + position // original) (Llama 4's
    rule) from the rotary's original length on: exact across several such lengths (12, 24, 36
    in a 60-token sequence), and the scale matters."""
    dense_dir = build_dense(tmp_path / "m3", "ministral3")
    model = cr.upcycle_from_dense(dense_dir, num_experts=2, segment_len=4).eval()
    assert model.config.max_position_embeddings == 128
    assert model.transformer.rotary.query_scale_from == 12
    ids = random_ids(60, seed=3, batch=2)
    assert dense_reference_error(model, dense_dir, ids) <= 1e-5
    model.transformer.rotary.query_scale_from = None  # no scale: another model past 12
    assert dense_reference_error(model, dense_dir, ids) > 1e-3
    assert dense_reference_error(model, dense_dir, ids[:, :12]) <= 1e-5  # the same below


def test_ministral_windows_per_block(tmp_path):
    """Ministral 8B: Mistral's blocks, the window on the blocks `layer_types` says."""
    from transformers import MinistralConfig, MinistralForCausalLM

    torch.manual_seed(0)
    MinistralForCausalLM(MinistralConfig(
        **COMMON, head_dim=16, sliding_window=5,
        layer_types=["sliding_attention", "full_attention"])
    ).save_pretrained(tmp_path / "ministral")
    model = cr.upcycle_from_dense(tmp_path / "ministral", num_experts=2, segment_len=4)
    assert (model.config.sliding_window, model.config.sliding_window_layers) == (5, [0])
    ids = random_ids(40, seed=6, batch=2)
    assert dense_reference_error(model, tmp_path / "ministral", ids) <= 1e-5
    model.transformer.h[0].attn.window = None
    assert dense_reference_error(model, tmp_path / "ministral", ids) > 1e-3


@pytest.mark.parametrize("text_type,tied", [("mistral", False), ("ministral3", True)])
def test_mistral3_image_text_checkpoint_gives_its_language_model(tmp_path, text_type, tied):
    """Mistral Small 3.x and Ministral 3 are published as image-text models (`mistral3`): the
    language model under its prefix upcycles alone, exactly, with the head tied as the outer
    config says; the vision tower and projector are left behind."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, PixtralVisionConfig

    torch.manual_seed(0)
    config_cls, _, extra = FAMILIES[text_type]
    text = config_cls(**COMMON, **extra)
    vision = PixtralVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, head_dim=8, image_size=28,
                                 patch_size=14)
    cfg = Mistral3Config(text_config=text.to_dict(), vision_config=vision.to_dict(),
                         tie_word_embeddings=tied)
    dense = Mistral3ForConditionalGeneration(cfg).eval()
    move_off_init(dense)
    dense.save_pretrained(tmp_path / "mm")
    model = cr.upcycle_from_dense(tmp_path / "mm", num_experts=2, segment_len=4)
    assert model.config.provenance["source_model_type"] == "mistral3"
    assert model.config.tie_word_embeddings is tied
    assert dense_reference_error(model, tmp_path / "mm", random_ids(20, seed=2, batch=2)) <= 1e-5
    assert cr.export(spread(model).eval(), tmp_path / "folded").max_rel_error <= 1e-5


def test_mistral3_with_another_language_model_is_refused(tmp_path):
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, PixtralVisionConfig

    vision = PixtralVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, head_dim=8, image_size=28,
                                 patch_size=14)
    text = LlamaConfig(**COMMON).to_dict()
    Mistral3ForConditionalGeneration(Mistral3Config(
        text_config=text, vision_config=vision.to_dict())).save_pretrained(tmp_path / "mm")
    cfg = json.loads((tmp_path / "mm" / "config.json").read_text())
    cfg["text_config"]["model_type"] = "qwen2"
    (tmp_path / "mm" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UpcycleError, match=r"mistral3: a language model of type 'qwen2' is not "
                                           r"supported \(mistral, ministral, ministral3\)"):
        cr.upcycle_from_dense(tmp_path / "mm", num_experts=2, segment_len=4)


def test_exaone4_rotates_only_its_sliding_blocks(tmp_path):
    """EXAONE 4.0 with a window: the full blocks attend without rotary positions (NoPE), the
    sliding ones rotate; without a window (the 1.2B model) every block rotates."""
    dense_dir = build_dense(tmp_path / "e", "exaone4", layer_types=[
        "sliding_attention", "full_attention"])
    model = cr.upcycle_from_dense(dense_dir, num_experts=2, segment_len=4)
    assert model.config.nope_layers == [1] and model.config.sliding_window_layers == [0]
    assert not model.config.pre_norms and model.config.qk_norm_width == "head"
    ids = random_ids(40, seed=6, batch=2)
    assert dense_reference_error(model, dense_dir, ids) <= 1e-5
    model.transformer.h[1].attn.rotates = True  # and leaving the full block unrotated matters
    assert dense_reference_error(model, dense_dir, ids) > 1e-3
    rotating = build_dense(tmp_path / "r", "exaone4", sliding_window=None,
                           layer_types=["full_attention", "full_attention"])
    model = cr.upcycle_from_dense(rotating, num_experts=2, segment_len=4)
    assert model.config.nope_layers is None and model.config.sliding_window is None
    assert dense_reference_error(model, rotating, ids) <= 1e-5


@pytest.mark.parametrize("out_bias", [False, True])
def test_seed_oss_biases_its_query_key_value_and_maybe_its_output(tmp_path, out_bias):
    """Seed-OSS: q/k/v biased with attention_bias (its default), the output projection only with
    attention_out_bias (off in the published 36B)."""
    from transformers import SeedOssConfig, SeedOssForCausalLM

    torch.manual_seed(0)
    dense = SeedOssForCausalLM(SeedOssConfig(**COMMON, head_dim=16,
                                             attention_out_bias=out_bias)).eval()
    move_off_init(dense)
    dense.save_pretrained(tmp_path / "seed")
    model = cr.upcycle_from_dense(tmp_path / "seed", num_experts=2, segment_len=4)
    assert model.config.attention_bias and model.config.attention_out_bias is out_bias
    assert dense_reference_error(model, tmp_path / "seed", random_ids(30, seed=8, batch=2)) <= 1e-5


@pytest.mark.parametrize("model_type", ["glm", "glm4"])
def test_glm_interleaved_rotary_is_a_permutation_of_the_query_and_key_rows(tmp_path,
                                                                          model_type):
    """GLM rotates interleaved pairs of half of each head: the importer permutes every query
    and key head's rotated dims (evens, then odds) so CAMEx's half-split rotation computes the
    same scores; GLM-4-0414's branch-output norms come along. Without the permutation the
    model is another one."""
    import transformers

    prefix = {"glm": "Glm", "glm4": "Glm4"}[model_type]
    config_cls, model_cls = (getattr(transformers, f"{prefix}Config"),
                             getattr(transformers, f"{prefix}ForCausalLM"))
    torch.manual_seed(0)
    dense = model_cls(config_cls(**COMMON, head_dim=16)).eval()
    move_off_init(dense)
    dense.save_pretrained(tmp_path / model_type)
    model = cr.upcycle_from_dense(tmp_path / model_type, num_experts=2, segment_len=4)
    assert model.config.rope_parameters["partial_rotary_factor"] == 0.5
    assert model.config.attention_bias and not model.config.attention_out_bias
    assert model.config.sandwich_norms is (model_type == "glm4")
    ids = random_ids(30, seed=8, batch=2)
    assert dense_reference_error(model, tmp_path / model_type, ids) <= 1e-5
    from camex_runtime import upcycle

    real = upcycle.glm_block
    try:  # the same import without the permutation
        upcycle.IMPORTERS[model_type] = upcycle.Importer(
            upcycle.glm_config, lambda w, hf, i: {**real(w, hf, i), **{
                k: v for k, v in upcycle.llama_block(w, hf, i).items() if k.startswith("attn.")}},
            upcycle.llama_outer, "model.")
        unpermuted = cr.upcycle_from_dense(tmp_path / model_type, num_experts=2, segment_len=4)
    finally:
        upcycle.IMPORTERS[model_type] = upcycle._GLM
    assert dense_reference_error(unpermuted, tmp_path / model_type, ids) > 1e-3


def test_ernie_interleaved_rotary_over_the_whole_head(tmp_path):
    """ERNIE 4.5 rotates interleaved pairs of the whole head (GLM's rotation, full width) and
    biases every projection (`use_bias`): exact with the permutation, another model without."""
    from camex_runtime import upcycle

    src = build_dense(tmp_path / "e", "ernie4_5")
    model = cr.upcycle_from_dense(src, num_experts=2, segment_len=4)
    cfg = model.config
    assert cfg.attention_bias and cfg.attention_out_bias and cfg.mlp_bias
    assert cfg.rope_parameters.get("partial_rotary_factor", 1.0) == 1.0
    ids = random_ids(30, seed=8, batch=2)
    assert dense_reference_error(model, src, ids) <= 1e-5
    try:  # the same import without the permutation
        upcycle.IMPORTERS["ernie4_5"] = upcycle.Importer(
            upcycle.ernie_config, upcycle.llama_block, upcycle.llama_outer, "model.")
        unpermuted = cr.upcycle_from_dense(src, num_experts=2, segment_len=4)
    finally:
        upcycle.IMPORTERS["ernie4_5"] = upcycle._ERNIE
    assert dense_reference_error(unpermuted, src, ids) > 1e-3


def test_hunyuan_norms_the_rotated_heads_on_its_alpha_base(tmp_path):
    """Hunyuan: per-head q/k norms after the rotation (before it, the model is another one) and
    a base stretched by its NTK alpha, imported as a plain base (unstretched: another one)."""
    src = build_dense(tmp_path / "h", "hunyuan_v1_dense")
    model = cr.upcycle_from_dense(src, num_experts=2, segment_len=4)
    cfg = model.config
    assert cfg.qk_norm and cfg.qk_norm_after_rope and cfg.format_needed() == 6
    assert cfg.rope_parameters == {"rope_type": "default",
                                   "rope_theta": 10000.0 * 1000.0 ** (16 / 14)}
    ids = random_ids(30, seed=8, batch=2)
    assert dense_reference_error(model, src, ids) <= 1e-5
    before = cr.upcycle_from_dense(src, num_experts=2, segment_len=4, qk_norm_after_rope=False)
    plain = cr.upcycle_from_dense(src, num_experts=2, segment_len=4,
                                  rope_parameters={"rope_type": "default", "rope_theta": 1e4})
    assert dense_reference_error(before, src, ids) > 1e-3
    assert dense_reference_error(plain, src, ids) > 1e-3


def test_phi3_partial_rotary_and_fused_projections(tmp_path):
    from safetensors import safe_open

    dense_dir = build_dense(tmp_path / "phi3", "phi3", partial_rotary_factor=0.5)
    with safe_open(str(dense_dir / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    assert {"model.layers.0.self_attn.qkv_proj.weight",
            "model.layers.0.mlp.gate_up_proj.weight"} <= names
    model = cr.upcycle_from_dense(dense_dir, num_experts=2, segment_len=4)
    assert model.config.rope_parameters["partial_rotary_factor"] == 0.5
    assert dense_reference_error(model, dense_dir, random_ids(20, seed=3, batch=2)) <= 1e-5


@pytest.mark.parametrize("attention_bias", [False, True])
def test_qwen3_query_and_key_norms(tmp_path, attention_bias):
    """Qwen3's per-head q/k RMSNorms travel (weights moved off their init), with and without
    its attention biases (on q, k, v and o alike, unlike Qwen2's); heads wider than d / H and a
    tied head, as Qwen3-0.6B has."""
    dense_dir = build_dense(tmp_path / "qwen3", "qwen3", attention_bias=attention_bias,
                            head_dim=24, tie_word_embeddings=True)
    model = cr.upcycle_from_dense(dense_dir, num_experts=2, segment_len=4)
    cfg = model.config
    assert cfg.qk_norm and cfg.attention_bias == cfg.attention_out_bias == attention_bias
    dense = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32)
    ours, theirs = model.transformer.h[1].attn, dense.model.layers[1].self_attn
    assert torch.equal(ours.q_norm.weight, theirs.q_norm.weight)
    assert torch.equal(ours.k_norm.weight, theirs.k_norm.weight)
    assert not torch.equal(ours.q_norm.weight, theirs.k_norm.weight)
    assert dense_reference_error(model, dense_dir, random_ids(20, seed=3, batch=2)) <= 1e-5
    with torch.no_grad():  # and they matter: without them the model is another one
        for block in model.transformer.h:
            block.attn.q_norm.weight.fill_(1.0)
    assert dense_reference_error(model, dense_dir, random_ids(20, seed=3, batch=2)) > 1e-3


def test_smollm3_blocks_without_rotary_positions(tmp_path):
    """SmolLM3's NoPE blocks (no_rope_layers 0) attend without positions; rotating them too
    would be another model."""
    dense_dir = build_dense(tmp_path / "smollm3", "smollm3")
    model = cr.upcycle_from_dense(dense_dir, num_experts=2, segment_len=4)
    assert model.config.nope_layers == [1]
    assert [b.attn.rotates for b in model.transformer.h] == [True, False]
    ids = random_ids(20, seed=3, batch=2)
    assert dense_reference_error(model, dense_dir, ids) <= 1e-5
    model.transformer.h[1].attn.rotates = True
    assert dense_reference_error(model, dense_dir, ids) > 1e-3


def test_llama_family_options_are_checked():
    with pytest.raises(ValueError, match="qk_norm .* llama-family option"):
        cr.CamexConfig.from_preset("tiny", qk_norm=True)
    with pytest.raises(ValueError, match="sliding_window is a llama-family option"):
        cr.CamexConfig.from_preset("tiny", sliding_window=4)
    with pytest.raises(ValueError, match="sliding_window must be >= 1"):
        cr.CamexConfig.from_preset("tiny-llama", sliding_window=0)
    with pytest.raises(ValueError, match=r"sliding_window_layers \[5\] out of range"):
        cr.CamexConfig.from_preset("tiny-llama", sliding_window=4, sliding_window_layers=[5])
    cfg = cr.CamexConfig.from_preset("tiny-llama", sliding_window=4, sliding_window_layers=[1])
    assert [cfg.window(i) for i in range(2)] == [None, 4]
    with pytest.raises(ValueError, match="nope_layers is a llama-family option"):
        cr.CamexConfig.from_preset("tiny", nope_layers=[0])
    with pytest.raises(ValueError, match=r"nope_layers \[2\] out of range"):
        cr.CamexConfig.from_preset("tiny-llama", nope_layers=[2])
    with pytest.raises(ValueError, match="pre_norms=False .* needs the llama family and "
                                         "sandwich_norms"):
        cr.CamexConfig.from_preset("tiny-llama", pre_norms=False)
    assert cr.CamexConfig.from_preset("tiny-llama", qk_norm_width="all").format_needed() == 1
    with pytest.raises(ValueError, match="qk_norm_width must be one of"):
        cr.CamexConfig.from_preset("tiny-llama", qk_norm=True, qk_norm_width="pair")
    for name, cap in (("attn_logit_softcapping", 0.0), ("final_logit_softcapping", -1.0)):
        with pytest.raises(ValueError, match=f"{name} must be a positive number"):
            cr.CamexConfig.from_preset("tiny-llama", **{name: cap})
    with pytest.raises(ValueError, match="attn_logit_softcapping must be a positive number"):
        cr.CamexConfig.from_preset("tiny", attn_logit_softcapping=50.0)  # llama family only
    with pytest.raises(ValueError, match="qk_norm_after_rope orders per-head q/k norms"):
        cr.CamexConfig.from_preset("tiny-llama", qk_norm_after_rope=True)
    with pytest.raises(ValueError, match="attention_sinks is a llama-family option"):
        cr.CamexConfig.from_preset("tiny", attention_sinks=True)
    with pytest.raises(ValueError, match="swiglu_limit and swiglu_alpha must be positive"):
        cr.CamexConfig.from_preset("tiny-llama", hidden_act="swigluoai", swiglu_limit=0.0)
    with pytest.raises(ValueError, match="hidden_act 'swigluoai' is not supported for family"):
        cr.CamexConfig.from_preset("tiny", hidden_act="swigluoai")
    # GPT-OSS's options are format 6: older runtimes refuse them by number
    for option in ({"attention_sinks": True}, {"router_bias": True},
                   {"hidden_act": "swigluoai"}):
        assert cr.CamexConfig.from_preset("tiny-llama", **option).format_needed() == 6


def test_the_reference_check_sees_a_wrong_rotary(tmp_path):
    """The exactness checks above can fail: a different rope_theta is far off."""
    dense_dir = build_dense(tmp_path / "llama", "llama")
    model = cr.upcycle_from_dense(dense_dir, num_experts=2, segment_len=4,
                                  rope_parameters={"rope_type": "default", "rope_theta": 20.0})
    assert dense_reference_error(model, dense_dir, random_ids(20, seed=4, batch=2)) > 1e-3


def test_sharded_checkpoints_are_read(tmp_path):
    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(**COMMON)).eval()
    dense.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    model = cr.upcycle_from_dense(tmp_path / "sharded", num_experts=2, segment_len=4)
    assert dense_reference_error(model, tmp_path / "sharded", random_ids(9, seed=5)) <= 1e-5


@pytest.mark.parametrize("case,pattern", [
    ("rope", r"rope_type 'dynamic' is not supported"),
    ("act", r"hidden_act 'gelu' is not supported"),
    ("family", r"model_type 'bert' cannot be upcycled; "
               r"supported: gpt2, llama, mistral, ministral, ministral3, mistral3, qwen2, "
               r"qwen3, phi3, smollm3, seed_oss, glm, glm4, ernie4_5, hunyuan_v1_dense, "
               r"granite, gemma2, gemma3_text, gemma3, olmo2, olmo3, exaone4, mixtral, "
               r"qwen3_moe, olmoe, gpt_oss$"),
    ("pickle", r"no model.safetensors \(found pytorch_model.bin\)"),
    ("gemma-act", r"gemma2: hidden_activation 'gelu' is not supported"),
])
def test_what_cannot_be_exact_is_refused_by_name(tmp_path, case, pattern):
    d = tmp_path / case
    if case == "rope":
        build_dense(d, "llama", rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    elif case == "act":
        build_dense(d, "llama", hidden_act="gelu")
    elif case == "gemma-act":
        build_dense(d, "gemma2", hidden_activation="gelu")
    else:
        build_dense(d, "llama")
        if case == "family":
            cfg = json.loads((d / "config.json").read_text())
            (d / "config.json").write_text(json.dumps({**cfg, "model_type": "bert"}))
        else:
            (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(UpcycleError, match=pattern):
        cr.upcycle_from_dense(d, num_experts=2, segment_len=4)


@pytest.mark.parametrize("family,hf,blocks", [
    ("mistral", {"sliding_window": 5}, None),
    ("phi3", {"sliding_window": 6}, None),
    # Qwen2/Qwen3 slide from max_window_layers on: here block 1 only
    ("qwen2", {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 1}, [1]),
    ("qwen3", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 0}, None),
])
def test_sliding_windows_are_exact_beyond_them(tmp_path, family, hf, blocks):
    """Sequences several windows long, so most tokens attend to less than their prefix; the
    window (and which blocks slide) as transformers applies it."""
    dense_dir = build_dense(tmp_path / family, family, **hf)
    model = cr.upcycle_from_dense(dense_dir, num_experts=2, segment_len=4)
    assert model.config.sliding_window == hf["sliding_window"]
    assert model.config.sliding_window_layers == blocks
    ids = random_ids(40, seed=6, batch=2)
    assert dense_reference_error(model, dense_dir, ids) <= 1e-5
    with torch.no_grad():  # and the window matters: without it the model is another one
        for block in model.transformer.h:
            block.attn.window = None
    assert dense_reference_error(model, dense_dir, ids) > 1e-3


@pytest.mark.parametrize("family,hf,caps", [
    ("gemma2", {}, (2.0, 5.0)),
    # Gemma 3's published configs cap nothing; transformers' Gemma 3 caps the logits when its
    # config says so, and never the scores (it keeps attn_logit_softcapping unused)
    ("gemma3_text", {"attn_logit_softcapping": 2.0, "final_logit_softcapping": 5.0,
                     "initializer_range": 0.1}, (None, 5.0)),
])
def test_soft_capping_is_exact_and_matters(tmp_path, family, hf, caps):
    """Scores and logits capped as transformers caps them (cap * tanh(x / cap)), at caps these
    random weights reach: without a cap the model is another one."""
    dense_dir = build_dense(tmp_path / family, family, **hf)
    model = cr.upcycle_from_dense(dense_dir, num_experts=2, segment_len=4).eval()
    assert (model.config.attn_logit_softcapping, model.config.final_logit_softcapping) == caps
    ids = random_ids(30, seed=7, batch=2)
    assert dense_reference_error(model, dense_dir, ids) <= 1e-5
    model.config.final_logit_softcapping = None
    assert dense_reference_error(model, dense_dir, ids) > 1e-3
    model.config.final_logit_softcapping = caps[1]
    if caps[0] is not None:
        for block in model.transformer.h:
            block.attn.softcap = None
        assert dense_reference_error(model, dense_dir, ids) > 1e-3


@pytest.mark.parametrize("family", ["gemma2", "olmo2"])
def test_attention_biases_come_along(tmp_path, family):
    """attention_bias on: q/k/v/o biases fused as the weights are (Gemma 2's query rows scaled
    with their biases; build_dense moves biases off transformers' zero init)."""
    dense_dir = build_dense(tmp_path / family, family, attention_bias=True)
    model = cr.upcycle_from_dense(dense_dir, num_experts=2, segment_len=4)
    assert model.config.attention_bias and model.config.attention_out_bias
    assert dense_reference_error(model, dense_dir, random_ids(30, seed=8, batch=2)) <= 1e-5


def test_a_window_the_served_length_never_exceeds_is_full_attention(tmp_path):
    dense_dir = build_dense(tmp_path / "m", "mistral", sliding_window=64)
    model = cr.upcycle_from_dense(dense_dir, num_experts=2, segment_len=4,
                                  max_position_embeddings=64)
    assert model.config.sliding_window is None
    assert dense_reference_error(model, dense_dir, random_ids(64, seed=6)) <= 1e-5


def test_gemma3_scales_embeddings_after_the_lookup_and_keeps_its_head_tied(tmp_path):
    """Gemma's sqrt(d) embedding scale is applied to the looked-up rows, not folded into the
    table, so the tied head still shares the table (a scaled copy: +vocab x d parameters)."""
    dense_dir = build_dense(tmp_path / "g", "gemma3_text")
    model = cr.upcycle_from_dense(dense_dir, num_experts=2, segment_len=4)
    assert model.config.tie_word_embeddings and model.config.embedding_scale == 8.0  # sqrt(64)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    cr.export(model.eval(), tmp_path / "folded")
    folded = AutoModelForCausalLM.from_pretrained(tmp_path / "folded")
    assert folded.lm_head.weight.data_ptr() == folded.transformer.wte.weight.data_ptr()
    assert dense_reference_error(folded, dense_dir, random_ids(20, seed=3, batch=2)) <= 1e-5


def test_gemma3_image_text_checkpoint_gives_its_language_model(tmp_path):
    """Gemma 3 4B/12B/27B are published as image-text models (`gemma3`): the language model
    under its prefix upcycles alone, exactly (the vision tower is left behind), and folds."""
    from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig,
                              SiglipVisionConfig)

    torch.manual_seed(0)
    text = Gemma3TextConfig(**COMMON, **FAMILIES["gemma3_text"][2])
    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                num_attention_heads=2, image_size=28, patch_size=14)
    cfg = Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(),
                       mm_tokens_per_image=4, boi_token_index=3, eoi_token_index=4,
                       image_token_index=5, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    dense = Gemma3ForConditionalGeneration(cfg).eval()
    move_off_init(dense)
    dense.save_pretrained(tmp_path / "mm")
    model = cr.upcycle_from_dense(tmp_path / "mm", num_experts=2, segment_len=4)
    assert model.config.provenance["source_model_type"] == "gemma3"
    assert model.config.vocab_size == text.vocab_size and model.config.sandwich_norms
    assert dense_reference_error(model, tmp_path / "mm", random_ids(20, seed=2, batch=2)) <= 1e-5
    assert cr.export(spread(model).eval(), tmp_path / "folded").max_rel_error <= 1e-5


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_export_folds_llama_family_exactly_and_auto_loads_it(tmp_path, family):
    model = spread(cr.upcycle_from_dense(build_dense(tmp_path / "d", family), num_experts=3,
                                         segment_len=4, curvature_rank=2)).eval()
    report = cr.export(model, tmp_path / "folded")
    assert report.max_rel_error <= 1e-5
    folded = AutoModelForCausalLM.from_pretrained(tmp_path / "folded").eval()
    assert folded.config.folded and folded.config.family == "llama"
    ids = random_ids(17, seed=7, batch=2)
    with torch.no_grad():
        for kw in ({}, {"route1_len": 1}, {"routing": "prompt", "prompt_len": 6}):
            assert rel_err(model(ids, **kw).logits, folded(ids, **kw).logits) <= 1e-5
    # ... and the training form reloads from its own save_pretrained
    model.save_pretrained(tmp_path / "train")
    again = cr.CamexForCausalLM.from_pretrained(tmp_path / "train").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits)


@pytest.mark.parametrize("family", sorted(CLASSIFIERS))
def test_classifier_upcycles_exactly_and_pools_the_last_token(tmp_path, family):
    from transformers import AutoModelForSequenceClassification

    d = build_dense_classifier(tmp_path / family, family)
    model = cr.upcycle_from_dense(d, num_experts=3, segment_len=4).eval()
    assert isinstance(model, cr.CamexForSequenceClassification)
    assert model.config.classifier_pooling == "last" and model.config.classifier_causal
    dense = AutoModelForSequenceClassification.from_pretrained(d, dtype=torch.float32).eval()
    ids = random_ids(10, seed=8, batch=2)
    mask = torch.ones_like(ids)
    ids[1, 6:], mask[1, 6:] = 0, 0  # right-padded with the pad id, as HF pools it
    with torch.no_grad():
        ref = dense(ids, attention_mask=mask).logits
        got = model(ids, attention_mask=mask).logits
    assert rel_err(ref, got) <= 1e-5


@pytest.mark.parametrize("family", ["llama", "gemma2", "olmo3"])
def test_llama_training_form_trains(tmp_path, family):
    """Gradients reach every CAMEx parameter once the experts differ from their base (at the
    upcycled init τ = 0, so M(τ) = 0 and the curvature factors get no gradient yet); through
    soft-capped scores (Gemma 2) and blocks without pre-norms (OLMo 3) too."""
    model = spread(cr.upcycle_from_dense(build_dense(tmp_path / "d", family), num_experts=3,
                                         segment_len=4, curvature_rank=2)).train()
    ids = random_ids(13, seed=9, batch=2)
    model(ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        if any(k in name for k in (".curvature.", ".experts.", ".base.", ".router.")):
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_only_checkpoints_older_runtimes_would_misread_get_the_new_format(tmp_path):
    """qk_norm or a sliding window: format 2, which runtimes before them refuse by name (they
    would have loaded it and attended wrongly); Gemma 3's blocks (branch-output norms, GeGLU,
    a second rotary base): format 3; soft-capping (Gemma 2), blocks without pre-norms and q/k
    norms over all heads (OLMo 2): format 4; Llama 4's query scale served past where it
    starts (Ministral 3): format 5; everything else stays format 1. All load."""
    from safetensors import safe_open

    from camex_runtime.checkpoint import load_folded

    for family, want in (("llama", 1), ("qwen3", 2), ("mistral", 2), ("smollm3", 2),
                         ("granite", 1), ("gemma3_text", 3), ("gemma2", 4), ("olmo2", 4),
                         ("ministral3", 5)):
        model = cr.upcycle_from_dense(build_dense(tmp_path / family, family), num_experts=2,
                                      segment_len=4)
        cr.export(model.eval(), tmp_path / f"{family}-folded")
        folded = tmp_path / f"{family}-folded"
        assert json.loads((folded / "config.json").read_text())["format_version"] == want
        with safe_open(str(folded / "model.safetensors"), framework="pt") as f:
            assert f.metadata()["camex_format_version"] == str(want)
        assert load_folded(folded).config.format_version == want


def test_upcycling_can_show_its_progress_block_by_block(tmp_path, capsys):
    """A large or quantized source reads for minutes: `progress=True` (camex-train's default)
    draws a bar over the blocks on stderr; off by default for the library."""
    src = build_dense(tmp_path / "src", "llama")
    cr.upcycle_from_dense(src, num_experts=2, segment_len=4)
    assert "upcycling" not in capsys.readouterr().err
    cr.upcycle_from_dense(src, num_experts=2, segment_len=4, progress=True)
    err = capsys.readouterr().err
    assert "upcycling src" in err and "2/2" in err and "block" in err
