"""Scaling-law fits from sweep results: pure functions over arrays (numpy + scipy).

Each sweep point is (N parameters, C training FLOPs, D training tokens, loss). Fits:

- IsoFLOP minima (Chinchilla "approach 2", as the DiT/SD3 scaling studies do): for each compute
  budget C, a parabola of loss against log N; its vertex is N_opt(C), and D_opt = C / (6 N_opt).
  Then N_opt ~ C^a and D_opt ~ C^b by least squares in log-log space.
- The compute-optimal frontier: L(C) = A C^-alpha + L_inf through the best loss at each budget.
- Confidence intervals: a bootstrap over points (resampled within each budget), percentiles.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import optimize


@dataclasses.dataclass
class Fit:
    """A fitted exponent with its bootstrap interval."""

    value: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"


def isoflop_minima(params, flops, losses, budget_tol: float = 0.05):
    """[(C, N_opt, L_opt)] per budget with >= 3 model sizes; budgets grouped within 5%."""
    params, flops, losses = (np.asarray(a, float) for a in (params, flops, losses))
    out = []
    for c in _budgets(flops, budget_tol):
        at = np.abs(flops / c - 1) <= budget_tol
        if len(np.unique(params[at])) < 3:
            continue
        x, y = np.log(params[at]), losses[at]
        curve = np.polyfit(x, y, 2)
        a2, a1, _ = curve
        if a2 <= 0:  # no interior minimum: take the best measured point
            best = np.argmin(y)
            out.append((c, float(params[at][best]), float(y[best])))
            continue
        x_opt = float(np.clip(-a1 / (2 * a2), x.min(), x.max()))
        out.append((c, math.exp(x_opt), float(np.polyval(curve, x_opt))))
    return out


def _budgets(flops, tol):
    budgets = []
    for f in np.sort(flops):
        if not budgets or f / budgets[-1] - 1 > tol:
            budgets.append(f)
    return budgets


def power_law(x, y) -> tuple[float, float]:
    """(exponent, prefactor) of y = k x^e by least squares on logs."""
    e, logk = np.polyfit(np.log(x), np.log(y), 1)
    return float(e), float(math.exp(logk))


def frontier(flops, losses, budget_tol: float = 0.05):
    """(C, best loss) per budget: the compute-optimal frontier of the sweep."""
    flops, losses = np.asarray(flops, float), np.asarray(losses, float)
    pts = []
    for c in _budgets(flops, budget_tol):
        at = np.abs(flops / c - 1) <= budget_tol
        pts.append((c, float(losses[at].min())))
    return pts


def fit_loss_vs_compute(flops, losses) -> tuple[float, float, float]:
    """(A, alpha, L_inf) of L = A (C / C_0)^-alpha + L_inf, C_0 the smallest budget."""
    c = np.asarray(flops, float)
    y = np.asarray(losses, float)
    c0 = c.min()

    def model(x, a, alpha, l_inf):
        return a * np.power(x / c0, -alpha) + l_inf

    guess = (max(y.max() - y.min(), 1e-3), 0.3, max(y.min() * 0.9, 0.0))
    popt, _ = optimize.curve_fit(model, c, y, p0=guess, maxfev=20000,
                                 bounds=([0, 0, 0], [np.inf, 5, max(y.min(), 1e-9)]))
    return float(popt[0]), float(popt[1]), float(popt[2])


def fit_sweep(params, flops, tokens, losses, *, bootstrap: int = 500, seed: int = 0) -> dict:
    """All fits with 90% bootstrap intervals; see the module docstring."""
    params, flops, tokens, losses = (np.asarray(a, float) for a in (params, flops, tokens, losses))
    point = _fit_once(params, flops, losses)
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(np.abs(flops / c - 1) <= 0.05) for c in _budgets(flops, 0.05)]
    samples = []
    for _ in range(bootstrap):
        idx = np.concatenate([rng.choice(g, len(g)) for g in groups])
        try:
            samples.append(_fit_once(params[idx], flops[idx], losses[idx]))
        except (ValueError, RuntimeError, np.linalg.LinAlgError):
            continue  # a resample with too few distinct sizes at some budget
    result = {"points": len(losses), "bootstrap_samples": len(samples)}
    for key in ("a", "b", "alpha", "l_inf"):
        vals = np.array([s[key] for s in samples if np.isfinite(s[key])])
        lo, hi = (np.percentile(vals, [5, 95]) if len(vals) else (math.nan, math.nan))
        result[key] = Fit(point[key], float(lo), float(hi))
    result["minima"] = point["minima"]
    result["frontier"] = point["frontier"]
    result["n_opt_prefactor"] = point["n_opt_prefactor"]
    result["loss_fit"] = point["loss_fit"]
    return result


def _fit_once(params, flops, losses) -> dict:
    minima = isoflop_minima(params, flops, losses)
    if len(minima) < 2:
        raise ValueError("need >= 2 budgets with >= 3 model sizes each for IsoFLOP fits")
    c = np.array([m[0] for m in minima])
    n_opt = np.array([m[1] for m in minima])
    a, k = power_law(c, n_opt)
    # D = C / (6 N): its exponent follows from N's, b = 1 - a (the same fit, stated both ways).
    b, _ = power_law(c, c / (6 * n_opt))
    front = frontier(flops, losses)
    try:
        amp, alpha, l_inf = fit_loss_vs_compute([f[0] for f in front], [f[1] for f in front])
    except (RuntimeError, ValueError):
        amp, alpha, l_inf = math.nan, math.nan, math.nan
    return {"a": a, "b": b, "alpha": alpha, "l_inf": l_inf, "minima": minima,
            "frontier": front, "n_opt_prefactor": k, "loss_fit": (amp, alpha, l_inf)}


def predict(fit: dict, flops: float, min_flops: float) -> dict:
    """Optimal model size, tokens and loss the fitted laws give for a compute budget."""
    n_opt = fit["n_opt_prefactor"] * flops ** fit["a"].value
    amp, alpha, l_inf = fit["loss_fit"]
    loss = amp * (flops / min_flops) ** -alpha + l_inf
    return {"flops": flops, "n_opt": n_opt, "tokens_opt": flops / (6 * n_opt), "loss": loss}
