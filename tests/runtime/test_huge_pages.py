"""Large CPU tensors of the engine (weights, expert stacks, merge pool, KV cache) live in
mappings advised for 2 MiB pages where the kernel allows it (camex_runtime/memory.py), and
serving from them changes no output."""
from __future__ import annotations

import gc

import torch

from camex_runtime import Engine, SamplingParams
from camex_runtime.memory import HUGE_PAGE, huge_page_empty, huge_pages_enabled, \
    transparent_huge_pages
from engine_models import build_folded


def mapping_of(ptr: int) -> dict[str, int]:
    """The /proc/self/smaps fields of the mapping that holds address `ptr`."""
    fields, inside = {}, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                if inside:
                    break
                inside = lo <= ptr < hi
            elif inside and head in ("THPeligible:", "AnonHugePages:", "Rss:"):
                fields[head[:-1]] = int(line.split()[1])
    return fields


def test_huge_page_tensors_follow_the_kernel_setting(monkeypatch):
    monkeypatch.delenv("CAMEX_HUGE_PAGES", raising=False)
    t = huge_page_empty((HUGE_PAGE // 4 + 3,), torch.float32)  # just over 2 MiB
    t.fill_(1.5)
    gc.collect()  # the tensor alone keeps its mapping alive
    assert float(t.sum()) == 1.5 * t.numel()
    small = huge_page_empty((16,), torch.float32)
    assert small.shape == (16,)
    mode = transparent_huge_pages()
    if mode in ("always", "madvise"):
        assert huge_pages_enabled()
        assert mapping_of(t.data_ptr())["THPeligible"] == 1
        monkeypatch.setenv("CAMEX_HUGE_PAGES", "0")  # the opt-out: plain torch.empty
        plain = huge_page_empty((HUGE_PAGE // 4 + 3,), torch.float32)
        if mode == "madvise":  # the heap is not advised: not eligible
            assert mapping_of(plain.data_ptr()).get("THPeligible") == 0
    else:  # never / not Linux: plain memory, nothing advised
        assert not huge_pages_enabled()


def test_an_engine_streams_its_weights_from_huge_pages(tmp_path, monkeypatch):
    monkeypatch.delenv("CAMEX_HUGE_PAGES", raising=False)
    path = build_folded(tmp_path / "lm", T=4, d_model=256, d_ff=2048, n_head=4,
                        vocab_size=2304)  # a 2.25 MiB embedding (tied output head)
    prompt = list(range(3, 12))
    sp = SamplingParams(max_new_tokens=6, ignore_eos=True)
    engine = Engine.from_pretrained(path, max_batch_size=2, strategy="merged")
    r = engine.runner
    big = [r.moe[0].w1, r.moe[0].w2, r.cache.pool["fc1_weight"], r.model.lm_head.weight]
    assert all(t.nbytes >= HUGE_PAGE for t in big)
    assert r.model.lm_head.weight is r.tr.wte.weight  # still tied after the move
    if huge_pages_enabled():
        assert all(mapping_of(t.data_ptr())["THPeligible"] == 1 for t in big)
    engine.start()
    try:
        got = engine.submit(prompt, sp).result().token_ids
    finally:
        engine.stop()
    monkeypatch.setenv("CAMEX_HUGE_PAGES", "0")
    plain = Engine.from_pretrained(path, max_batch_size=2, strategy="merged")
    plain.start()
    try:
        assert plain.submit(prompt, sp).result().token_ids == got
    finally:
        plain.stop()
