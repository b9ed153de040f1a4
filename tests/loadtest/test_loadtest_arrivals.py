"""Arrival processes: mean rate and dispersion (seeded statistical checks), edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from loadtest.arrivals import arrival_offsets

N = 20_000


def gaps(offsets):
    return np.diff(np.asarray(offsets))


@pytest.mark.parametrize(
    "process,burstiness,cv",
    [("poisson", 1.0, 1.0), ("gamma", 1.0, 1.0), ("gamma", 0.25, 2.0), ("gamma", 4.0, 0.5)],
)
def test_mean_rate_and_dispersion(process, burstiness, cv):
    rate = 40.0
    g = gaps(arrival_offsets(N, rate, process, burstiness, seed=123))
    # the mean gap of N-1 iid gaps has standard error (cv / rate) / sqrt(N-1): allow 4 of them
    stderr = cv / rate / math.sqrt(N - 1)
    assert abs(g.mean() - 1 / rate) < 4 * stderr
    assert g.std() / g.mean() == pytest.approx(cv, rel=0.1)
    assert (g >= 0).all()


def test_schedule_starts_at_zero_and_is_reproducible():
    a = arrival_offsets(50, 10.0, "gamma", 0.5, seed=7)
    assert a[0] == 0.0 and len(a) == 50 and a == sorted(a)
    assert a == arrival_offsets(50, 10.0, "gamma", 0.5, seed=7)
    assert a != arrival_offsets(50, 10.0, "gamma", 0.5, seed=8)


def test_infinite_rate_is_a_burst_at_zero():
    assert arrival_offsets(5, math.inf) == [0.0] * 5
    assert arrival_offsets(0, 3.0) == []


@pytest.mark.parametrize("kwargs", [dict(rate=0.0), dict(rate=-1.0),
                                    dict(rate=1.0, process="uniform"),
                                    dict(rate=1.0, process="gamma", burstiness=0.0)])
def test_bad_arguments_are_refused(kwargs):
    with pytest.raises(ValueError):
        arrival_offsets(10, **kwargs)
