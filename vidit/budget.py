"""What a compute budget needs: L(N, D), optimal learning rate and batch size laws, predictions.

Pure functions over a sweep's points (N parameters, D training tokens, C training FLOPs, the
learning rate and batch size each ran with, its validation loss):

- Hyperparameter optima. Points that share (N, D) form a group; the group's optimum of a
  hyperparameter is the vertex of a parabola of loss against its log through the best grid
  value and its neighbours (the best grid value itself where it sits at an edge of the grid,
  which the fit reports).
- Loss: L(N, D) = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022, "Training
  Compute-Optimal Large Language Models", approach 3), fitted to each group's best loss by a
  Huber loss on log L in the log-sum-exp form, from a grid of starting points.
- Optimal hyperparameters as power laws in N and D, eta_opt = k N^a D^b and
  B_opt = k N^a D^b: the form Yin et al. 2025 ("Towards Precise Scaling Laws for Video
  Diffusion Transformers", CVPR) fit for video DiTs. A grid that does not vary D fits a = the
  N exponent alone (b = 0) and says so.
- Intervals: 90% percentiles over a bootstrap of the groups (all laws refitted per resample).
- A budget C: N_opt minimises L(N, C / (k_C N)), where k_C = C / (N D) is the sweep's own FLOPs
  per parameter-token (6 for a dense transformer without attention; a small DiT has more), and
  D_opt = C / (k_C N_opt); its learning rate and batch size come from the laws at
  (N_opt, D_opt). Each prediction says how far it lies beyond the grid.
"""
from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
from scipy import optimize, special


@dataclasses.dataclass
class Group:
    """Points at one (N, D): their best loss and the hyperparameters that reached it."""

    params: float
    tokens: float
    flops: float
    loss: float
    lr: float | None  # None: fewer than 3 learning rates in this group
    batch: float | None
    lr_at_edge: bool = False
    batch_at_edge: bool = False


def optimum(values, losses) -> tuple[float, bool]:
    """(value minimising the loss, whether it is at the grid's edge): the vertex of a parabola
    in log(value) through the best point and its neighbours."""
    order = np.argsort(values)
    x, y = np.log(np.asarray(values, float)[order]), np.asarray(losses, float)[order]
    i = int(np.argmin(y))
    if i in (0, len(x) - 1):
        return float(math.exp(x[i])), True
    a2, a1, _ = np.polyfit(x[i - 1:i + 2], y[i - 1:i + 2], 2)
    vertex = -a1 / (2 * a2) if a2 > 0 else x[i]
    return float(math.exp(np.clip(vertex, x[i - 1], x[i + 1]))), False


def groups(params, tokens, flops, lrs, batches, losses) -> list[Group]:
    """One Group per distinct (N, D) (D to 3 significant digits)."""
    rows = list(zip(*(np.asarray(a, float) for a in (params, tokens, flops, lrs, batches,
                                                      losses))))
    key = lambda r: (r[0], float(f"{r[1]:.3g}"))  # noqa: E731
    out = []
    for (n, d), members in itertools.groupby(sorted(rows, key=key), key=key):
        members = list(members)
        best = min(members, key=lambda r: r[5])
        group = Group(n, d, best[2], best[5], None, None)
        # The lr curve at the best batch size, the batch curve at the best lr (NaN: not given).
        same_batch = [r for r in members if r[4] == best[4] or np.isnan(best[4])]
        if len({r[3] for r in same_batch if np.isfinite(r[3])}) >= 3:
            group.lr, group.lr_at_edge = optimum([r[3] for r in same_batch],
                                                 [r[5] for r in same_batch])
        same_lr = [r for r in members if r[3] == best[3] or np.isnan(best[3])]
        if len({r[4] for r in same_lr if np.isfinite(r[4])}) >= 3:
            group.batch, group.batch_at_edge = optimum([r[4] for r in same_lr],
                                                       [r[5] for r in same_lr])
        out.append(group)
    return out


# ------------------------------------------------------------------------------- L(N, D)
def fit_loss(params, tokens, losses, start=None) -> tuple[float, ...]:
    """(E, A, alpha, B, beta) of L = E + A N^-alpha + B D^-beta."""
    log_n, log_d = np.log(np.asarray(params, float)), np.log(np.asarray(tokens, float))
    log_l = np.log(np.asarray(losses, float))

    def objective(theta):
        a, alpha, b, beta, e = theta
        pred = special.logsumexp([a - alpha * log_n, b - beta * log_d,
                                  np.full_like(log_n, e)], axis=0)
        r = pred - log_l
        return np.sum(np.where(np.abs(r) < 1e-3, 0.5 * r**2, 1e-3 * (np.abs(r) - 0.5e-3)))

    e0 = math.log(max(min(losses) * 0.5, 1e-12))
    starts = [start] if start is not None else itertools.product(
        (0.0, 5.0, 10.0), (0.2, 0.5, 1.0), (0.0, 5.0, 10.0), (0.2, 0.5, 1.0), (e0,))
    bounds = [(-20, 60), (0.0, 3.0), (-20, 60), (0.0, 3.0), (-30, 5)]
    best = min((optimize.minimize(objective, np.array(s, float), method="L-BFGS-B",
                                  bounds=bounds) for s in starts), key=lambda r: r.fun)
    a, alpha, b, beta, e = best.x
    return math.exp(e), math.exp(a), alpha, math.exp(b), beta


def loss_at(fit, n, d):
    e, a, alpha, b, beta = fit
    return e + a * np.power(n, -alpha) + b * np.power(d, -beta)


def fit_power_law(params, tokens, values) -> tuple[float, float, float]:
    """(k, a, b) of value = k N^a D^b by least squares on logs (b = 0 when D does not vary)."""
    log_n, log_d = np.log(np.asarray(params, float)), np.log(np.asarray(tokens, float))
    y = np.log(np.asarray(values, float))
    if np.ptp(log_d) < 1e-6:
        a, log_k = np.polyfit(log_n, y, 1)
        return float(math.exp(log_k)), float(a), 0.0
    design = np.stack([np.ones_like(log_n), log_n, log_d], axis=1)
    (log_k, a, b), *_ = np.linalg.lstsq(design, y, rcond=None)
    return float(math.exp(log_k)), float(a), float(b)


# ------------------------------------------------------------------------------- all laws
def fit_laws(gs: list[Group], *, bootstrap: int = 200, seed: int = 0) -> dict:
    """Every law the groups support, with bootstrap samples for intervals."""
    def once(sample, start=None):
        out = {"flops_per_param_token": float(np.median(
            [g.flops / (g.params * g.tokens) for g in sample]))}
        if len({g.params for g in sample}) >= 2 and len({g.tokens for g in sample}) >= 2 \
                and len(sample) >= 5:
            out["loss"] = fit_loss([g.params for g in sample], [g.tokens for g in sample],
                                   [g.loss for g in sample], start)
        for name in ("lr", "batch"):
            have = [g for g in sample if getattr(g, name) is not None]
            if len({g.params for g in have}) >= 2:
                out[name] = fit_power_law([g.params for g in have], [g.tokens for g in have],
                                          [getattr(g, name) for g in have])
        return out

    point = once(gs)
    start = _loss_start(point.get("loss"))
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(bootstrap):
        sample = [gs[i] for i in rng.integers(0, len(gs), len(gs))]
        try:
            samples.append(once(sample, start))
        except (ValueError, np.linalg.LinAlgError, TypeError):
            continue  # a resample with too few distinct sizes
    return {"point": point, "samples": samples, "groups": gs}


def _loss_start(fit):
    if fit is None:
        return None
    e, a, alpha, b, beta = fit
    return (math.log(a), alpha, math.log(b), beta, math.log(max(e, 1e-12)))


def interval(values) -> tuple[float, float]:
    values = np.asarray([v for v in values if v is not None and np.isfinite(v)], float)
    if not len(values):
        return math.nan, math.nan
    lo, hi = np.percentile(values, [5, 95])
    return float(lo), float(hi)


def predict(laws: dict, flops: float) -> dict:
    """N, D, loss, learning rate and batch size for budget C, each as (value, low, high), and
    the warnings for whatever lies beyond the grid."""
    def at(fit):
        out = {}
        if "loss" in fit:
            n = optimal_size(fit["loss"], flops, fit["flops_per_param_token"])
            d = flops / (fit["flops_per_param_token"] * n)
            out.update(params=n, tokens=d, loss=float(loss_at(fit["loss"], n, d)))
            for name in ("lr", "batch"):
                if name in fit:
                    k, a, b = fit[name]
                    out[name] = k * n**a * d**b
        return out

    point = at(laws["point"])
    if "params" not in point:
        raise ValueError("predicting for a budget needs L(N, D): the grid must vary both the "
                         "model size and the training tokens (several budgets or step counts)")
    draws = [at(s) for s in laws["samples"]]
    result = {"flops": flops}
    for key, value in point.items():
        result[key] = (value, *interval([d.get(key) for d in draws]))
    result["warnings"] = extrapolation(laws["groups"], result)
    return result


def optimal_size(loss_fit, flops: float, k: float) -> float:
    """argmin over N of L(N, C / (k N)): G (C / k)^(beta / (alpha + beta)) in closed form."""
    e, a, alpha, b, beta = loss_fit
    if alpha <= 0 or beta <= 0:
        raise ValueError(f"the fitted L(N, D) has a non-positive exponent (alpha={alpha:.3g}, "
                         f"beta={beta:.3g}): no interior optimum")
    g = (alpha * a / (beta * b)) ** (1 / (alpha + beta))
    return g * (flops / k) ** (beta / (alpha + beta))


def extrapolation(gs: list[Group], prediction: dict) -> list[str]:
    """One line per predicted quantity outside the range the grid covered, with the factor."""
    ranges = {"flops": [g.flops for g in gs], "params": [g.params for g in gs],
              "tokens": [g.tokens for g in gs],
              "lr": [g.lr for g in gs if g.lr is not None],
              "batch": [g.batch for g in gs if g.batch is not None]}
    names = {"flops": "the budget", "params": "the model size", "tokens": "the training tokens",
             "lr": "the learning rate", "batch": "the batch size"}
    # lr and batch: against the range of the optima the grid measured (the groups' vertices)
    out = []
    for key, seen in ranges.items():
        if key not in prediction or not seen:
            continue
        value = prediction[key][0] if isinstance(prediction[key], tuple) else prediction[key]
        lo, hi = min(seen), max(seen)
        if value > hi * 1.001:
            out.append(f"{names[key]} {value:.3g} is extrapolated {value / hi:.3g}x beyond the "
                       f"largest in the grid ({hi:.3g})")
        elif value < lo / 1.001:
            out.append(f"{names[key]} {value:.3g} is extrapolated {lo / value:.3g}x below the "
                       f"smallest in the grid ({lo:.3g})")
    return out
