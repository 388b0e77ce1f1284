"""The scaling-law fitter recovers known exponents from noisy synthetic sweeps.

Points come from L(N, D) = E + A N^-alpha + B D^-beta with D = C / (6 N) (the Chinchilla form),
for which N_opt ~ C^(beta / (alpha + beta)), D_opt ~ C^(alpha / (alpha + beta)) and the
frontier L(C) - E ~ C^-(alpha beta / (alpha + beta)). Tolerance: 0.03 on the IsoFLOP exponents,
0.04 on the frontier exponent, with 0.5% multiplicative noise.
"""
import numpy as np
import pytest

from vidit import scaling

ALPHA, BETA, E, A, B = 0.34, 0.28, 0.5, 40.0, 60.0


def synthetic(noise=0.005, seed=0):
    rng = np.random.default_rng(seed)
    a = BETA / (ALPHA + BETA)
    params, flops, tokens, losses = [], [], [], []
    for c in np.logspace(15, 19, 5):
        # Sizes around the optimum: G such that N_opt = G (C/6)^a.
        g = (ALPHA * A / (BETA * B)) ** (1 / (ALPHA + BETA))
        n_opt = g * (c / 6) ** a
        for n in n_opt * np.logspace(-1, 1, 7):
            d = c / (6 * n)
            loss = E + A * n**-ALPHA + B * d**-BETA
            params.append(n)
            flops.append(c)
            tokens.append(d)
            losses.append(loss * (1 + noise * rng.standard_normal()))
    return params, flops, tokens, losses


def test_fitter_recovers_known_exponents():
    fit = scaling.fit_sweep(*synthetic(), bootstrap=200)
    a, b = BETA / (ALPHA + BETA), ALPHA / (ALPHA + BETA)
    assert fit["a"].value == pytest.approx(a, abs=0.03)
    assert fit["b"].value == pytest.approx(b, abs=0.03)
    assert fit["alpha"].value == pytest.approx(ALPHA * BETA / (ALPHA + BETA), abs=0.04)
    assert fit["a"].low <= fit["a"].value <= fit["a"].high
    assert fit["a"].high - fit["a"].low < 0.1  # the interval is informative
    assert len(fit["minima"]) == 5


def test_prediction_follows_the_fit():
    fit = scaling.fit_sweep(*synthetic(noise=0.0), bootstrap=20)
    small, large = (scaling.predict(fit, c, 1e15) for c in (1e20, 1e21))
    assert large["n_opt"] / small["n_opt"] == pytest.approx(10 ** fit["a"].value, rel=1e-6)
    assert large["loss"] < small["loss"]


def test_too_few_sizes_is_an_error():
    with pytest.raises(ValueError, match=">= 3 model sizes"):
        scaling.fit_sweep([1e6, 2e6, 1e6, 2e6], [1e15, 1e15, 1e16, 1e16], [1, 1, 1, 1],
                          [1.0, 0.9, 0.8, 0.7], bootstrap=5)
