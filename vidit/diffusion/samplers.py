"""Deterministic samplers shared by the objectives, plus classifier-free guidance.

Every sampler walks a fixed, decreasing grid of times with ``jax.lax.fori_loop``, so the
compiled program holds one copy of the loop body whatever the number of steps. The grids are
built by the objectives (with numpy, since ``steps`` is static) and passed in as arrays.

Conventions: ``fn(x, t)`` is a denoiser already bound to its condition (see ``guided``), with x
of shape [B, ...] and t a float32 vector [B] in [0, 1], 1 = most noise.
"""
from typing import Any, Callable

import jax
import jax.numpy as jnp

# A model bound to its condition: (x_t [B, ...], t [B]) -> output, same shape as x_t.
BoundFn = Callable[[jax.Array, jax.Array], jax.Array]


def guided(model_fn: Callable, cond: Any, null_cond: Any = None, guidance=1.0) -> BoundFn:
    """Binds ``cond`` to ``model_fn`` and applies classifier-free guidance.

    Returns ``fn(x, t)``. With guidance (``null_cond`` given and ``guidance != 1``) the
    conditional and unconditional passes are ONE model call on a doubled batch, cond first and
    null_cond second, combined as ``out_uncond + guidance * (out_cond - out_uncond)``: one big
    call keeps the accelerator busy and compiles one network, not two.

    ``null_cond`` must have the same tree structure as ``cond``; a leaf with leading dimension 1
    is broadcast to the batch (a single "empty caption" embedding, say). ``guidance`` may be a
    Python number or a traced scalar; only a Python 1 (or 1.0) skips the doubled batch.
    """
    if null_cond is None or (isinstance(guidance, (int, float)) and guidance == 1):
        return lambda x, t: model_fn(x, t, cond)

    def _stack(c, u):
        c, u = jnp.asarray(c), jnp.asarray(u)
        u = jnp.broadcast_to(u, c.shape).astype(c.dtype)
        return jnp.concatenate([c, u], axis=0)

    both = jax.tree.map(_stack, cond, null_cond)

    def fn(x, t):
        out = model_fn(jnp.concatenate([x, x], 0), jnp.concatenate([t, t], 0), both)
        out_cond, out_uncond = jnp.split(out, 2, axis=0)
        return out_uncond + guidance * (out_cond - out_uncond)

    return fn


def _tvec(t: jax.Array, x: jax.Array) -> jax.Array:
    """The scalar time of the current step as the model's [B] float32 input."""
    return jnp.full((x.shape[0],), t, jnp.float32)


def euler(velocity_fn: BoundFn, x: jax.Array, ts: jax.Array) -> jax.Array:
    """Euler integration of dx/dt = velocity_fn(x, t) along the grid ``ts`` (len steps + 1).

    One model evaluation per step. ``ts`` normally runs from 1 down to 0.
    """
    ts = jnp.asarray(ts, jnp.float32)

    def body(i, x):
        t, t_next = ts[i], ts[i + 1]
        return x + (t_next - t) * velocity_fn(x, _tvec(t, x)).astype(x.dtype)

    return jax.lax.fori_loop(0, ts.shape[0] - 1, body, x)


def heun(velocity_fn: BoundFn, x: jax.Array, ts: jax.Array) -> jax.Array:
    """Heun's (explicit trapezoid, 2nd order) integration of dx/dt = v along ``ts``.

    Two model evaluations per step, including the last one: a rectified-flow velocity is well
    defined at t = 0 (unlike a score at sigma = 0), so no Euler fallback is needed.
    """
    ts = jnp.asarray(ts, jnp.float32)

    def body(i, x):
        t, t_next = ts[i], ts[i + 1]
        dt = t_next - t
        d1 = velocity_fn(x, _tvec(t, x)).astype(x.dtype)
        x_pred = x + dt * d1
        d2 = velocity_fn(x_pred, _tvec(t_next, x)).astype(x.dtype)
        return x + dt * 0.5 * (d1 + d2)

    return jax.lax.fori_loop(0, ts.shape[0] - 1, body, x)


def ddim(
    fn: BoundFn,
    to_x0_eps: Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]],
    x: jax.Array,
    ts: jax.Array,
    alpha_bars: jax.Array,
) -> jax.Array:
    """Deterministic DDIM (eta = 0) for a variance-preserving process.

    ``ts`` [steps + 1] are the model's time inputs and ``alpha_bars`` [steps + 1] the matching
    cumulative alphas, from most noise to the clean end (alpha_bar = 1). Each step turns the
    network output into (x0_hat, eps_hat) with ``to_x0_eps(out, x, alpha_bar)`` and re-noises
    x0_hat to the next level: x' = sqrt(abar') x0_hat + sqrt(1 - abar') eps_hat. Because the
    conversion is the objective's, alpha_bar = 0 at the first step is fine for v-prediction
    (x0_hat = -v, eps_hat = x, no division).
    """
    ts = jnp.asarray(ts, jnp.float32)
    alpha_bars = jnp.asarray(alpha_bars, jnp.float32)

    def body(i, x):
        out = fn(x, _tvec(ts[i], x)).astype(x.dtype)
        x0_hat, eps_hat = to_x0_eps(out, x, alpha_bars[i])
        a_next = alpha_bars[i + 1]
        return jnp.sqrt(a_next) * x0_hat + jnp.sqrt(1.0 - a_next) * eps_hat

    return jax.lax.fori_loop(0, ts.shape[0] - 1, body, x)


def jump(model_fn, x, times, cond, null_cond=None, guidance=1.0, interval=None):
    """Average-velocity jumps x_r = x_t - (t - r) u(x_t, t, r) along the grid ``times`` (MeanFlow,
    shortcut models), guided like the other samplers.

    ``model_fn(x, t, cond, h=...)`` takes the interval h = t - r as its second time input, or
    ``interval(t - r)`` when given. A fori_loop: one compiled body whatever the steps."""
    interval = interval or (lambda h: h)

    def body(i, x):
        t, r = times[i], times[i + 1]

        def with_interval(x, t_vec, c):
            return model_fn(x, t_vec, c, h=interval(jnp.full((x.shape[0],), t - r)))

        fn = guided(with_interval, cond, null_cond, guidance)
        u = fn(x, jnp.full((x.shape[0],), t))
        return x - (t - r) * u.astype(jnp.float32)

    return jax.lax.fori_loop(0, times.shape[0] - 1, body, x)
