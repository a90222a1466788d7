from __future__ import annotations

import numpy as np

from xdtrain.rng import rng_for


def test_streams_are_reproducible_and_independent():
    a = rng_for(0, "splits", "sick").random(5)
    assert np.array_equal(a, rng_for(0, "splits", "sick").random(5))
    assert not np.array_equal(a, rng_for(0, "splits", "well").random(5))
    assert not np.array_equal(a, rng_for(1, "splits", "sick").random(5))
    assert not np.array_equal(rng_for(0, 1).random(3), rng_for(0, 2).random(3))
    assert not np.array_equal(rng_for(0, "1").random(3), rng_for(0, 1).random(3))
