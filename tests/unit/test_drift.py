"""PSI and KS, the drift statistics (pure numpy/scipy)."""

from __future__ import annotations

import numpy as np
import pytest

from batch.drift import ks, psi


def test_psi_is_small_for_the_same_distribution_and_large_for_a_shift() -> None:
    rng = np.random.default_rng(0)
    reference = rng.normal(0, 1, 20_000)
    assert psi(reference, rng.normal(0, 1, 5_000)) < 0.02
    assert 0.1 < psi(reference, rng.normal(0.5, 1, 5_000)) < 0.5
    assert psi(reference, rng.normal(2, 1, 5_000)) > 1.0
    assert psi(reference, reference) == pytest.approx(0.0, abs=1e-12)


def test_psi_handles_constant_and_discrete_features() -> None:
    zeros = np.zeros(1000)
    assert psi(zeros, zeros) == pytest.approx(0.0, abs=1e-12)
    assert psi(zeros, np.ones(1000)) > 1.0  # every value left the reference's only bin
    flags = (np.arange(1000) % 4 == 0).astype(float)
    assert psi(flags, flags) == pytest.approx(0.0, abs=1e-12)
    assert psi(flags, (np.arange(1000) % 2 == 0).astype(float)) > 0.1


def test_ks_detects_a_shift() -> None:
    rng = np.random.default_rng(1)
    reference = rng.normal(0, 1, 5_000)
    same, p_same = ks(reference, rng.normal(0, 1, 2_000))
    moved, p_moved = ks(reference, rng.normal(0.3, 1, 2_000))
    assert same < 0.05 and p_same > 0.01
    assert moved > 0.1 and p_moved < 1e-6
