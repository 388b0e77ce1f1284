"""Shortcut models (Frans et al. 2024): a flow model that also takes the step size d, so that
one call jumps from noise to data, with no jvp.

    z_t = (1 - t) x + t eps,  v = eps - x   (rectified flow, as in flow.py; t = 1 is noise)
    s(z, t, d): the average velocity over [t - d, t], so z_{t-d} = z_t - d s(z_t, t, d)
    d = 0:   s(z, t, 0) = v (flow matching, on most of the batch)
    d > 0:   s(z_t, t, d) = sg((s1 + s2) / 2),  s1 = s_ema(z_t, t, d/2),
             s2 = s_ema(z_t - d/2 s1, t - d/2, d/2)   (two chained half steps, EMA parameters)

The self-consistency part uses ``consistency_fraction`` of the batch (the first rows; the paper
uses 1/8) with full steps d = 1, 1/2, ..., 2/max_steps drawn uniformly over that power-of-two
grid and t on the grid of multiples of d in (0, 1] (the times the d-step sampler visits). The
finest step 1/max_steps is the flow model itself: the model's step input is 0 there
(``step_input``), so the smallest half steps are targets from the d = 0 velocity.

The step size is the model's second time input h (config.model.interval_input), exactly the
h = t - r of MeanFlow: a shortcut model is an average-velocity model and samples with the same
jumps, d = 1/steps. Targets come from ``target_fn`` (the train step binds it to the EMA
parameters: ``needs.target`` = 'ema'); without one the online model is used.
"""
import dataclasses
import math
from typing import Any, ClassVar, Optional

import jax
import jax.numpy as jnp
import numpy as np

from vidit.diffusion import samplers
from vidit.diffusion.flow import FlowObjective
from vidit.diffusion.objective import ModelFn, Needs


@dataclasses.dataclass(frozen=True)
class ShortcutObjective(FlowObjective):
    """Fields are config fields (``default_config('shortcut')``); the flow fields set the
    distribution of t on the flow-matching rows and the validation loss (at d = 0)."""

    time_sampling: str = "uniform"  # the paper's flow rows draw t uniformly
    consistency_fraction: float = 0.125  # share of each batch trained for self-consistency
    max_steps: int = 128  # finest step 1/max_steps (a power of two) is plain flow

    name: ClassVar[str] = "shortcut"

    @property
    def needs(self) -> Needs:
        return Needs(interval_input=True, target="ema")

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.consistency_fraction <= 1.0:
            raise ValueError("consistency_fraction must lie in [0, 1]")
        if self.max_steps < 2 or self.max_steps & (self.max_steps - 1):
            raise ValueError(f"max_steps must be a power of two >= 2, got {self.max_steps}")

    def num_consistency(self, batch_size: int) -> int:
        """Rows of a batch of this size that train self-consistency (static)."""
        return int(round(self.consistency_fraction * batch_size))

    def step_input(self, d: jax.Array) -> jax.Array:
        """The model's step-size input for step d: 0 (the flow model) at d <= 1/max_steps."""
        d = jnp.asarray(d)
        d = d.astype(jnp.promote_types(d.dtype, jnp.float32))
        return jnp.where(d <= 1.0 / self.max_steps, jnp.zeros_like(d), d)

    def sample_t_d(self, rng: jax.Array, n: int):
        """(t, d) [n] for self-consistency: d = 2^-k, k uniform in 0 .. log2(max_steps) - 1, and
        t = j d with j uniform in 1 .. 1/d, so that t - d >= 0 lies on the d-step grid."""
        k_rng, j_rng = jax.random.split(rng)
        levels = int(math.log2(self.max_steps))
        k = jax.random.randint(k_rng, (n,), 0, levels)
        sections = jnp.exp2(k.astype(jnp.float32))  # 1/d
        j = jnp.floor(jax.random.uniform(j_rng, (n,)) * sections) + 1.0
        j = jnp.minimum(j, sections)  # uniform() < 1, but guard the float edge
        return (j / sections).astype(jnp.float32), (1.0 / sections).astype(jnp.float32)

    def consistency_target(self, target_fn: ModelFn, z, t, d, cond):
        """sg of the mean of two chained half steps of size d/2 (float32, or float64 inputs'
        precision)."""
        acc = jnp.promote_types(z.dtype, jnp.float32)
        half = jnp.asarray(d, acc) / 2
        h = self.step_input(half)
        s1 = target_fn(z, t, cond, h=h).astype(acc)
        z_mid = z.astype(acc) - half.reshape((-1,) + (1,) * (z.ndim - 1)) * s1
        s2 = target_fn(z_mid.astype(z.dtype), t - half, cond, h=h).astype(acc)
        return jax.lax.stop_gradient((s1 + s2) / 2)

    def loss(self, model_fn: ModelFn, x0: jax.Array, cond: Any, rng: jax.Array, *,
             null_cond: Any = None, target_fn: Optional[ModelFn] = None):
        del null_cond
        t_rng, td_rng, noise_rng = jax.random.split(rng, 3)
        batch = x0.shape[0]
        n = self.num_consistency(batch)
        t, d = self.sample_t(t_rng, batch), jnp.zeros((batch,), jnp.float32)
        if n:
            t_c, d_c = self.sample_t_d(td_rng, n)
            t, d = t.at[:n].set(t_c), d.at[:n].set(d_c)
        noise = jax.random.normal(noise_rng, x0.shape, jnp.float32)
        return self.loss_td(model_fn, x0, cond, t, d, noise, n, target_fn=target_fn)

    def loss_td(self, model_fn: ModelFn, x0, cond, t, d, noise, num_consistency: int, *,
                target_fn: Optional[ModelFn] = None):
        """Loss at given times, steps and noise: rows [:num_consistency] are self-consistency at
        step d, the rest flow matching (d = 0). Returns (mean, per-example [B])."""
        z, v = self.corrupt(x0, noise, t)
        target = v
        n = num_consistency
        if n:
            first = lambda a: a[:n]  # noqa: E731
            s_target = self.consistency_target(target_fn or model_fn, z[:n], t[:n], d[:n],
                                               jax.tree.map(first, cond))
            target = jnp.concatenate([s_target, v[n:]], axis=0)
        out = model_fn(z, jnp.asarray(t, jnp.float32), cond, h=self.step_input(d))
        err = jnp.square(out.astype(jnp.float32) - target)
        per_example = jnp.mean(err.reshape(err.shape[0], -1), axis=1)
        return jnp.mean(per_example), per_example

    def sample_times(self, steps: int) -> np.ndarray:
        """Uniform grid from 1 to 0: steps of d = 1/steps (no shift)."""
        return np.linspace(1.0, 0.0, steps + 1)

    def sample(self, model_fn: ModelFn, noise: jax.Array, cond: Any, *, steps: int,
               null_cond: Any = None, guidance=1.0, sampler: Optional[str] = None) -> jax.Array:
        """z_{t-d} = z_t - d s(z_t, t, d) with d = 1/steps: 1, 2, 4, ... up to max_steps steps
        are the trained step sizes (more steps than max_steps is Euler on the flow model)."""
        del sampler  # the shortcut jump is the only sampler
        if steps < 1:
            raise ValueError("steps must be >= 1")
        times = jnp.asarray(self.sample_times(steps), jnp.float32)
        return samplers.jump(model_fn, noise.astype(jnp.float32), times, cond, null_cond,
                             guidance, interval=self.step_input)
