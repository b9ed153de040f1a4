"""Arrival processes for open-loop load: when each request is sent.

An open-loop client sends requests on a schedule that does not wait for responses, so a slow
server sees a growing queue (as real users would produce) instead of a politely slowed client.
This module only produces the schedule — offsets in seconds from the start of the run — and
knows nothing about HTTP or about what is sent.

- ``poisson``: exponential inter-arrival gaps with mean ``1/rate``.
- ``gamma``: gamma gaps with shape ``burstiness`` and the same mean ``1/rate`` (the convention of
  vLLM's ``benchmark_serving``): ``burstiness == 1`` is exactly Poisson, ``< 1`` is burstier
  (coefficient of variation ``1/sqrt(burstiness)``), ``> 1`` is more regular.
- ``rate == inf``: every request at t = 0 (a burst; useful to measure peak capacity).

Closed-loop load (fixed concurrency) has no schedule and lives in ``runner.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

ARRIVAL_PROCESSES = ("poisson", "gamma")


def poisson_gaps(rate: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """Exponential inter-arrival gaps (n,) in seconds with mean 1/rate."""
    return rng.exponential(scale=1.0 / rate, size=n)


def gamma_gaps(rate: float, n: int, rng: np.random.Generator,
               burstiness: float = 1.0) -> np.ndarray:
    """Gamma inter-arrival gaps (n,) with shape=burstiness and mean 1/rate."""
    if burstiness <= 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    # mean = shape * scale = 1/rate  =>  scale = 1 / (rate * shape)
    return rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)


# Registry: name -> gap sampler taking (rate, n, rng, burstiness).
_SAMPLERS: dict[str, Callable[..., np.ndarray]] = {
    "poisson": lambda rate, n, rng, burstiness: poisson_gaps(rate, n, rng),
    "gamma": gamma_gaps,
}


def arrival_offsets(
    n: int,
    rate: float,
    process: str = "poisson",
    burstiness: float = 1.0,
    seed: int | None = 0,
) -> list[float]:
    """Send times (seconds from the start of the run) of ``n`` requests, non-decreasing.

    The first request goes out at t=0; request i waits the sum of the first i gaps, so the
    long-run rate is ``rate`` and the schedule is reproducible from ``seed``.
    """
    if n < 0:
        raise ValueError(f"request count must be >= 0, got {n}")
    if not rate > 0:
        raise ValueError(f"rate must be > 0 requests/s (or inf), got {rate}")
    if process not in _SAMPLERS:
        raise ValueError(f"unknown arrival process {process!r}; choose from {ARRIVAL_PROCESSES}")
    if math.isinf(rate) or n == 0:
        return [0.0] * n
    rng = np.random.default_rng(seed)
    gaps = _SAMPLERS[process](rate, n - 1, rng, burstiness)  # (n-1,)
    return [0.0] + np.cumsum(gaps).tolist()
