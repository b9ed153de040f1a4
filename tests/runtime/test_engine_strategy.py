"""The `auto` strategy: the cost model's decisions, and that the engine follows them."""
from __future__ import annotations

import pytest

from camex_runtime import Engine, SamplingParams
from camex_runtime.engine.cost_model import MEASURE_PASSES, CostModel, StrategyProfile
from engine_models import build_folded, results_alone

# merged weights cheap to apply, the mixture 8x a dense FFN: the B=1 decode regime
MERGED_CHEAP = StrategyProfile(points=(1, 16, 128), merged=(1.0, 2.0, 10.0),
                               mixture=(8.0, 12.0, 40.0), merge=20.0, num_experts=3)
MIXTURE_CHEAP = StrategyProfile(points=(1, 16, 128), merged=(5.0, 6.0, 10.0),
                                mixture=(1.0, 1.5, 4.0), merge=50.0, num_experts=3)


def test_cost_model_regimes():
    c = CostModel(MERGED_CHEAP)
    assert c.choose([1], new_merges=0) == "merged"  # cached merge at B=1
    assert c.choose([1] * 16, new_merges=0) == "mixture"  # 16 merged GEMVs vs one mixture
    assert c.choose([256], new_merges=1) == "merged"  # a prefill segment amortises its merge
    assert c.choose([1], new_merges=1) == "mixture"  # a merge for one token does not pay
    assert c.mixture_time(256) == pytest.approx(40.0 + (40.0 - 12.0) * 128 / 112)
    # rows the pool refused run the mixture anyway: 4 cached merges (4.0) + the mixture for
    # 12 rows (~10.9) lose to one mixture for all 16 rows (12.0)
    assert c.choose([1] * 4, new_merges=0) == "merged"
    assert c.choose([1] * 4, new_merges=0, mixture_rows=12) == "mixture"
    assert c.choose([1], new_merges=0, mixture_rows=1) == "mixture"  # 1 + 8 > 8.27
    assert c.choose([128], new_merges=0, mixture_rows=1) == "merged"  # 10 + 8 < 40.25
    # batched merges read the deltas once: 16 merges cost (E + 1 + 16) / (E + 2) merges
    assert c.merged_time([4] * 16, 16, batched_merges=True) == pytest.approx(
        20.0 * 20 / 5 + 16 * (1.0 + 3 / 15))


def test_remembered_choices_are_the_choices(monkeypatch):
    """A decode step asks the same question once per MoE layer: answers are remembered, keyed
    by everything they depend on, and the memory stays bounded."""
    import camex_runtime.engine.cost_model as cm
    monkeypatch.setattr(cm, "CHOICES_KEPT", 8)
    c = CostModel(MERGED_CHEAP)
    asked = [([1], 0, False, 0), ([1] * 16, 0, False, 0), ([1], 1, False, 0),
             ([1] * 4, 0, False, 0), ([1] * 4, 0, False, 12), ([4] * 16, 16, True, 0),
             ([4] * 16, 16, False, 0)]
    for tokens, new, batched, refused in asked * 3 + [([n], 0, False, 0) for n in range(20)]:
        want = CostModel(MERGED_CHEAP).choose(tokens, new, batched, mixture_rows=refused)
        assert c.choose(tokens, new, batched, mixture_rows=refused) == want
        assert len(c._choices) <= 8
    assert {c.choose([1], 0), c.choose([1] * 16, 0)} == {"merged", "mixture"}


def test_measured_profile_is_sane(tmp_path):
    engine = Engine.from_pretrained(build_folded(tmp_path / "lm"), max_batch_size=1)
    assert engine.info()["cost_profile"] is None  # measured when first needed (the warm-up)
    p = engine.runner.cost.p
    assert p.points == (1, 16, 128) and p.num_experts == 3
    assert all(t > 0 for t in p.merged + p.mixture) and p.merge > 0
    reported = engine.info()["cost_profile"]  # as /info and the warm-up log show it
    assert reported["points"] == [1, 16, 128]
    assert reported["merged_ms"] == [round(t * 1e3, 3) for t in p.merged]
    assert reported["mixture_ms"] == [round(t * 1e3, 3) for t in p.mixture]


def timings(p: StrategyProfile) -> tuple[float, ...]:
    return (*p.merged, *p.mixture, p.merge)


class SlowStretchMachine:
    """A fake clock and fake kernels: each call costs a fixed time, three times that while
    the clock is inside [start, start + width) (another tenant on the machine)."""

    def __init__(self, start: float = float("inf"), width: float = 0.0) -> None:
        self.t, self.start, self.width = 0.0, start, width

    def clock(self) -> float:
        return self.t

    def run(self, cost: float) -> None:
        self.t += cost * (3.0 if self.start <= self.t < self.start + self.width else 1.0)

    def install(self, monkeypatch, moe) -> None:
        import camex_runtime.engine.cost_model as cm
        monkeypatch.setattr(cm, "apply_merged", lambda x, w, kind: self.run(0.5 + 0.02 * len(x)))
        monkeypatch.setattr(cm, "apply_mixture", lambda x, m, s: self.run(4.0 + 0.2 * len(x)))
        monkeypatch.setattr(type(moe), "merge_into", lambda m, s, out: self.run(3.0))


def test_a_slow_stretch_at_start_up_does_not_bias_the_profile(tmp_path, monkeypatch):
    """The profile is measured once, at warm-up, and decides the strategy for the server's
    life: a stretch of a slow machine shorter than one pass over the probes, wherever it falls,
    must leave every timing as measured on a quiet machine (each probe keeps clean runs)."""
    engine = Engine.from_pretrained(build_folded(tmp_path / "lm"), max_batch_size=1)
    moe = engine.runner.moe[0]
    quiet = SlowStretchMachine()
    quiet.install(monkeypatch, moe)
    truth = StrategyProfile.measure(moe, clock=quiet.clock)
    assert truth.merge == 3.0 and truth.mixture == pytest.approx((4.2, 7.2, 29.6))
    assert truth.merged == pytest.approx((0.52, 0.82, 3.06))
    one_pass = quiet.t / (MEASURE_PASSES + 2)  # + the warm-up pass and the rotating buffers'
    checked = 0
    for i in range(60):
        machine = SlowStretchMachine(start=i * quiet.t / 60, width=0.9 * one_pass)
        machine.install(monkeypatch, moe)
        got = StrategyProfile.measure(moe, clock=machine.clock)
        assert timings(got) == pytest.approx(timings(truth)), f"stretch from {machine.start}"
        assert CostModel(got).choose([1] * 8, 0.0) == CostModel(truth).choose([1] * 8, 0.0)
        checked += machine.t > quiet.t  # the stretch did slow the measurement down
    assert checked > 40


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return build_folded(tmp_path_factory.mktemp("auto") / "lm")


@pytest.mark.parametrize("profile,merges", [(MERGED_CHEAP, True), (MIXTURE_CHEAP, False)])
def test_engine_follows_the_cost_model(path, profile, merges):
    engine = Engine.from_pretrained(path, max_batch_size=2, strategy="auto", profile=profile)
    engine.start()
    try:
        out = engine.generate(list(range(1, 10)), max_new_tokens=9, ignore_eos=True)
    finally:
        engine.stop()
    assert (engine.stats().cache.merges > 0) is merges
    forced = Engine.from_pretrained(path, max_batch_size=2, strategy="mixture", profile=profile)
    forced.start()
    try:
        assert forced.generate(list(range(1, 10)), max_new_tokens=9,
                               ignore_eos=True).token_ids == out.token_ids
    finally:
        forced.stop()


def test_bad_strategy_and_routing_are_rejected(path):
    with pytest.raises(ValueError, match="strategy"):
        Engine.from_pretrained(path, strategy="fastest")
    with pytest.raises(ValueError, match="routing"):
        Engine.from_pretrained(path, routing="sideways")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        Engine.from_pretrained(path, max_total_tokens=10_000)
    assert SamplingParams().max_new_tokens == 20


def test_merges_are_amortised_over_their_reuse():
    from camex_runtime.engine.routing_state import SlotRouting
    st = SlotRouting("segment", prompt_len=5, route1_len=4, num_moe=1, max_len=30)
    assert st.future_uses(4, T=4) == 3  # positions 5, 6, 7 share segment 2's merge
    assert st.future_uses(7, T=4) == 0  # the segment's last token
    assert st.future_uses(27, T=4) == 0  # position 28 is the last one processed (29 is not)
    assert SlotRouting("prompt", 5, 4, 1, max_len=30).future_uses(4, T=4) == 24
    c = CostModel(MERGED_CHEAP)
    assert c.choose_segment(1, future=0, new_merge=True) == "mixture"
    assert c.choose_segment(1, future=3, new_merge=True) == "merged"  # 20+1+3 <= 8+24
    assert c.choose([1], new_merges=1 / 4) == "merged"  # a decode merge reused 4 times


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
def test_rows_opening_segments_together_merge_in_one_pass_per_layer(path, monkeypatch, native):
    """Streams that started together open their segments in the same step. Their new merges
    at a layer are built by one pass over the expert stack (kernels.merge_many with a row per
    stream), not one pass per stream, and the tokens stay those of each stream alone: with
    the native kernels and with torch's (CUDA's path, and CPUs without the extension)."""
    from camex_runtime import kernels
    if not native:
        monkeypatch.setattr(kernels, "native", lambda: None)
    prompts = [[1 + i, 2 + i, 3 + i, 4 + i, 5 + i, 6 + i] for i in range(3)]  # same length
    sp = SamplingParams(max_new_tokens=12, ignore_eos=True)
    want = [r.token_ids for r in results_alone(path, prompts, sp, strategy="merged")]
    engine = Engine.from_pretrained(path, max_batch_size=3, strategy="merged")
    handles = [engine.submit(p, sp) for p in prompts]
    engine.step()  # the three prefills
    passes = []  # outputs per merge_many call (one call per weight part and merge pass)
    real = kernels.merge_many
    monkeypatch.setattr(kernels, "merge_many",
                        lambda base, deltas, coeffs, outs: (passes.append(len(outs)),
                                                            real(base, deltas, coeffs, outs)))
    M = len(engine.runner.moe)
    per_step = []
    while not all(h.done for h in handles):
        before = engine.runner.cache.merges
        engine.step()
        per_step.append(engine.runner.cache.merges - before)
    assert 3 * M in per_step  # a step where all three opened a segment: every merge at once
    assert 3 in passes and set(passes) <= {1, 2, 3}  # ... three outputs per pass
    assert sum(passes) == sum(per_step) * 4  # fc1/fc2 weights and biases, per merge
    assert [h.result().token_ids for h in handles] == want
    assert engine.runner.cache.referenced == 0
