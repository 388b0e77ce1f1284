"""vidit.budget recovers known laws from a synthetic sweep and predicts a budget with intervals.

Synthetic points: L(N, D, lr, B) = E + A N^-alpha + B0 D^-beta + c (log lr/eta*)^2
+ c (log B/B*)^2 with eta* = k N^a D^b and B* = k' N^a' D^b', 0.5% multiplicative noise.
"""
import math

import numpy as np
import pytest

from vidit import budget

E, A, ALPHA, B0, BETA = 0.05, 30.0, 0.35, 80.0, 0.3
LR_K, LR_A, LR_B = 3.0, -0.45, 0.08
BS_K, BS_A, BS_B = 0.02, 0.1, 0.3
K_FLOPS = 8.0  # training FLOPs per parameter-token of this synthetic model


def true_lr(n, d):
    return LR_K * n**LR_A * d**LR_B


def true_batch(n, d):
    return BS_K * n**BS_A * d**BS_B


def synthetic(noise=0.005, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for n in np.logspace(4, 6, 5):
        for d in np.logspace(6, 8, 4):
            for lr in true_lr(n, d) * 2.0 ** np.arange(-3, 4):
                for bs in true_batch(n, d) * 2.0 ** np.arange(-2, 3):
                    loss = (E + A * n**-ALPHA + B0 * d**-BETA
                            + 0.02 * math.log(lr / true_lr(n, d)) ** 2
                            + 0.02 * math.log(bs / true_batch(n, d)) ** 2)
                    rows.append((n, d, K_FLOPS * n * d, lr, bs,
                                 loss * (1 + noise * rng.standard_normal())))
    return [list(c) for c in zip(*rows)]


def inside(value, fit_interval, slack=0.0):
    lo, hi = fit_interval
    return lo - slack <= value <= hi + slack


@pytest.fixture(scope="module")
def laws():
    return budget.fit_laws(budget.groups(*synthetic()), bootstrap=100)


def test_laws_are_recovered_within_their_intervals(laws):
    point, samples = laws["point"], laws["samples"]
    e, a, alpha, b, beta = point["loss"]
    assert alpha == pytest.approx(ALPHA, abs=0.06) and beta == pytest.approx(BETA, abs=0.06)
    assert inside(ALPHA, budget.interval([s["loss"][2] for s in samples]), 0.02)
    assert inside(BETA, budget.interval([s["loss"][4] for s in samples]), 0.02)
    for name, (ka, kb) in (("lr", (LR_A, LR_B)), ("batch", (BS_A, BS_B))):
        _, fa, fb = point[name]
        assert fa == pytest.approx(ka, abs=0.08) and fb == pytest.approx(kb, abs=0.08), name
        assert inside(ka, budget.interval([s[name][1] for s in samples]), 0.03), name
        assert inside(kb, budget.interval([s[name][2] for s in samples]), 0.03), name
    assert point["flops_per_param_token"] == pytest.approx(K_FLOPS, rel=1e-2)


def test_prediction_has_intervals_and_names_what_is_extrapolated(laws):
    c = 1e17  # 1000x the grid's largest budget (8e14)
    p = budget.predict(laws, c)
    # The true optimum of the synthetic law at this budget:
    g = (ALPHA * A / (BETA * B0)) ** (1 / (ALPHA + BETA))
    n_true = g * (c / K_FLOPS) ** (BETA / (ALPHA + BETA))
    d_true = c / (K_FLOPS * n_true)
    value, lo, hi = p["params"]
    assert lo <= value <= hi and lo < hi
    assert n_true == pytest.approx(value, rel=0.5)  # three decades out, within 50%
    assert inside(math.log(n_true), (math.log(lo), math.log(hi)), 0.3)
    assert p["lr"][0] == pytest.approx(true_lr(n_true, d_true), rel=0.5)
    assert p["batch"][0] == pytest.approx(true_batch(n_true, d_true), rel=0.5)
    text = " ".join(p["warnings"])
    assert "the budget 1e+17 is extrapolated" in text and "beyond the largest" in text
    assert "the model size" in text
    inside_grid = budget.predict(laws, 1e13)
    assert not any("budget" in w for w in inside_grid["warnings"])


def test_a_grid_without_varied_tokens_cannot_predict_a_budget():
    n, d, f, lr, bs, loss = synthetic()
    keep = [i for i, x in enumerate(d) if x == d[0]]
    pick = lambda col: [col[i] for i in keep]  # noqa: E731
    laws = budget.fit_laws(budget.groups(*map(pick, (n, d, f, lr, bs, loss))), bootstrap=5)
    assert "loss" not in laws["point"] and laws["point"]["lr"][2] == 0.0  # b = 0: D fixed
    with pytest.raises(ValueError, match="vary both the model size and the training tokens"):
        budget.predict(laws, 1e15)


def test_optimum_is_the_parabola_vertex_and_flags_the_grid_edge():
    lrs = [1e-4, 2e-4, 4e-4, 8e-4]
    losses = [(math.log(x) - math.log(3e-4)) ** 2 for x in lrs]
    value, edge = budget.optimum(lrs, losses)
    assert value == pytest.approx(3e-4, rel=1e-6) and not edge
    value, edge = budget.optimum(lrs, [4, 3, 2, 1])
    assert value == pytest.approx(8e-4) and edge
