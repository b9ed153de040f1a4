"""A text cut into pieces at random places, as a stream may deliver it (for the splitters of
streamed chat answers: server.reasoning, server.tool_calls)."""
from __future__ import annotations

import random
from collections.abc import Iterator


def random_pieces(text: str, seed: int, trials: int = 200, most_cuts: int = 8
                  ) -> Iterator[list[str]]:
    """`trials` ways to cut `text` into up to `most_cuts` + 1 non-empty pieces."""
    rng = random.Random(seed)
    for _ in range(trials):
        cuts = sorted(rng.sample(range(1, len(text)),
                                 min(len(text) - 1, rng.randint(0, most_cuts))))
        yield [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
