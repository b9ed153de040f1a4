"""Host syncs in the step loop: on a GPU every `.tolist()`, `.item()`, `int(t)`, `float(t)` or
`bool(t)` of a device tensor stalls the CPU until the device catches up. A decode step needs
exactly two (the sampled token ids and their logprobs, which the host must see); prefill chunks
add none (a completed prompt's first token is sampled with the decoding rows). This test counts
them on the CPU, where
the same calls run, so a new sync in the hot path fails here before it slows a GPU."""
from __future__ import annotations

import torch

from camex_runtime import Engine, SamplingParams
from engine_models import build_folded

# `numpy`: on the CPU the sampler reads the argmax and the chosen logprobs through numpy
# (engine/sampling.py, argmax_rows), where a GPU tensor goes through `tolist`: one host read each
CONVERSIONS = ("tolist", "item", "__int__", "__float__", "__bool__", "__index__", "numpy")


class SyncCounter:
    def __init__(self, monkeypatch):
        self.count = 0
        for name in CONVERSIONS:
            real = getattr(torch.Tensor, name)

            def counted(t, *a, _real=real, **kw):
                self.count += 1
                return _real(t, *a, **kw)
            monkeypatch.setattr(torch.Tensor, name, counted)


def test_decode_and_prefill_steps_sync_only_for_the_sampled_tokens(tmp_path, monkeypatch):
    path = build_folded(tmp_path / "lm", T=4)
    for strategy in ("merged", "mixture", "auto"):
        engine = Engine.from_pretrained(path, max_batch_size=4, strategy=strategy,
                                        max_batched_tokens=5)
        sp = SamplingParams(max_new_tokens=40, ignore_eos=True)
        handles = [engine.submit(list(range(1 + i, 8 + i)), sp) for i in range(3)]
        engine.step()  # prefills
        for _ in range(5):  # warm: the cost model's probe and first merges are behind us
            engine.step()
        counter = SyncCounter(monkeypatch)
        # a long prompt arrives: chunks of 2 tokens next to 3 decoding rows
        handles.append(engine.submit(list(range(3, 30)), sp))
        steps = 0
        while not handles[-1]._events and steps < 40:  # until its first token: crosses segment
            engine.step()  # boundaries (T=4), so new routing decisions and merges
            steps += 1
        assert handles[-1]._events and steps >= 10  # completed inside the counted steps
        assert counter.count == 2 * steps, (strategy, counter.count, steps)
        monkeypatch.undo()
        for h in handles:
            h.cancel()
        engine.step()
