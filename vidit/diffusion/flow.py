"""Rectified flow: the objective of SD3, Wan, Open-Sora 2.0, HunyuanVideo and Movie Gen.

    x_t = (1 - t) x0 + t eps,   t in [0, 1], t = 1 is pure noise,
    target v = eps - x0 = dx_t/dt,

and sampling integrates dx/dt = v from t = 1 down to t = 0. Training times are logit-normal
(SD3's best of its ablation) or uniform, then pushed towards noise by the shift
t' = a t / (1 + (a - 1) t); the same shift warps the sampling grid, so a model trained at a
shift samples on the times it saw most.
"""
import dataclasses
import math
from typing import Any, ClassVar, Optional

import jax
import jax.numpy as jnp
import numpy as np

from vidit.diffusion import samplers
from vidit.diffusion.objective import ModelFn, Objective, per_example_mse

TIME_SAMPLINGS = ("logit_normal", "uniform")
FLOW_SAMPLERS = ("euler", "heun")


def shift_time(t, shift: float):
    """t' = a t / (1 + (a - 1) t). Maps 0 -> 0 and 1 -> 1, monotone; a > 1 moves time towards
    noise (more tokens carry more redundant signal, so they need more noise to be destroyed)."""
    if shift == 1.0:
        return t
    return shift * t / (1.0 + (shift - 1.0) * t)


def shift_for_tokens(num_tokens: int, reference_tokens: int,
                     num_latent_frames: Optional[int] = None) -> float:
    """The resolution/length shift a = sqrt(num_tokens / reference_tokens), times
    sqrt(num_latent_frames) when that is given (Open-Sora's rule, where num_tokens counts the
    tokens of one frame). Use with ``dataclasses.replace(objective, shift=a)``."""
    a = math.sqrt(num_tokens / reference_tokens)
    if num_latent_frames is not None:
        a *= math.sqrt(num_latent_frames)
    return a


def _stratified_uniforms(rng: jax.Array, n: int) -> jax.Array:
    """[n] uniforms, one in each of [i/n, (i+1)/n), in random order (kept off 0 and 1)."""
    bin_rng, order_rng = jax.random.split(rng)
    u = (jnp.arange(n) + jax.random.uniform(bin_rng, (n,))) / n
    return jax.random.permutation(order_rng, jnp.clip(u, 1e-7, 1.0 - 1e-7))


def _expand(t: jax.Array, x: jax.Array) -> jax.Array:
    """[B] -> [B, 1, ..., 1] so per-example times broadcast against x."""
    return jnp.asarray(t, jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))


@dataclasses.dataclass(frozen=True)
class FlowObjective(Objective):
    """Rectified flow. Fields are the config fields (see ``default_config('flow')``)."""

    time_sampling: str = "logit_normal"  # 'logit_normal' | 'uniform'
    logit_mean: float = 0.0  # logit-normal: t = sigmoid(n), n ~ N(logit_mean, logit_std)
    logit_std: float = 1.0
    # True: the batch's times are stratified, one draw in each of B equal-probability bins of
    # the time distribution (in random order), instead of B independent draws. The same
    # distribution per example, less variance in each batch's mix of noise levels: the
    # low-discrepancy sampler of Kingma et al. 2021 (Variational Diffusion Models), which
    # matters most at small batches.
    stratified: bool = False
    shift: float = 1.0  # a in t' = a t / (1 + (a - 1) t); 1 = no shift
    # The shift is `shift` at config.data's clip size and grows with sqrt(tokens) elsewhere
    # (SD3's resolution-dependent shift, Esser et al. 2024 sec. 5.3.2): a bucket or a sample at
    # 4x the tokens trains/samples at 2x the shift. vidit/steps.py applies it per input shape.
    shift_with_tokens: bool = True
    sampler: str = "euler"  # 'euler' | 'heun'

    name: ClassVar[str] = "flow"

    def __post_init__(self):
        if self.time_sampling not in TIME_SAMPLINGS:
            raise ValueError(f"unknown time_sampling {self.time_sampling!r}; valid: {list(TIME_SAMPLINGS)}")
        if self.sampler not in FLOW_SAMPLERS:
            raise ValueError(f"unknown flow sampler {self.sampler!r}; valid: {list(FLOW_SAMPLERS)}")
        if not self.logit_std > 0 or not self.shift > 0:
            raise ValueError("logit_std and shift must be positive")

    def at_tokens(self, tokens: int, reference_tokens: int) -> "FlowObjective":
        """This objective for inputs of `tokens` tokens when `shift` holds at
        `reference_tokens` (see shift_with_tokens)."""
        if not self.shift_with_tokens or tokens == reference_tokens:
            return self
        return dataclasses.replace(
            self, shift=self.shift * shift_for_tokens(tokens, reference_tokens))

    def sample_t(self, rng: jax.Array, batch_size: int) -> jax.Array:
        """Training times [B], float32, drawn (independently or stratified) then shifted."""
        if self.time_sampling == "logit_normal":
            # Stratified: through the normal's inverse CDF, so each bin of u is a bin of t.
            n = (jax.scipy.special.ndtri(_stratified_uniforms(rng, batch_size)) if self.stratified
                 else jax.random.normal(rng, (batch_size,)))
            t = jax.nn.sigmoid(self.logit_mean + self.logit_std * n)
        else:
            t = (_stratified_uniforms(rng, batch_size) if self.stratified
                 else jax.random.uniform(rng, (batch_size,)))
        return shift_time(t, self.shift).astype(jnp.float32)

    def corrupt(self, x0: jax.Array, noise: jax.Array, t: jax.Array):
        """x_t = (1 - t) x0 + t eps (in x0's dtype) and target v = eps - x0 (float32)."""
        x0f, noise = x0.astype(jnp.float32), noise.astype(jnp.float32)
        tb = _expand(t, x0)
        x_t = (1.0 - tb) * x0f + tb * noise
        return x_t.astype(x0.dtype), noise - x0f

    def loss_at(self, model_fn: ModelFn, x0: jax.Array, cond: Any, t: jax.Array,
                noise: jax.Array):
        """(mean, per-example [B]) squared error of the predicted velocity at times t and noise,
        in float32 whatever the model's dtype."""
        x_t, target = self.corrupt(x0, noise, t)
        return per_example_mse(model_fn(x_t, jnp.asarray(t, jnp.float32), cond), target)

    def loss(self, model_fn: ModelFn, x0: jax.Array, cond: Any, rng: jax.Array, *,
             null_cond: Any = None):
        """The training loss: t from ``sample_t``, Gaussian noise, then ``loss_at``."""
        del null_cond  # the plain flow loss conditions each example on its own cond
        t_rng, noise_rng = jax.random.split(rng)
        t = self.sample_t(t_rng, x0.shape[0])
        noise = jax.random.normal(noise_rng, x0.shape, jnp.float32)
        return self.loss_at(model_fn, x0, cond, t, noise)

    def predict_x0_eps(self, output: jax.Array, x_t: jax.Array, t: jax.Array):
        """Velocity -> (x0_hat, eps_hat): x0 = x_t - t v, eps = x_t + (1 - t) v."""
        tb = _expand(t, x_t)
        return x_t - tb * output, x_t + (1.0 - tb) * output

    def sample_times(self, steps: int) -> np.ndarray:
        """The sampling grid [steps + 1] from 1 to 0: uniform, then shifted."""
        return shift_time(np.linspace(1.0, 0.0, steps + 1), self.shift)

    def sample(self, model_fn: ModelFn, noise: jax.Array, cond: Any, *, steps: int,
               null_cond: Any = None, guidance=1.0, sampler: Optional[str] = None) -> jax.Array:
        """Integrates dx/dt = v from x(1) = noise to t = 0, in float32; returns x0 (float32).

        ``steps`` is static; ``sampler`` overrides the configured one. Heun costs two model
        calls per step, Euler one (each a single batched call under guidance).
        """
        sampler = sampler or self.sampler
        if sampler not in FLOW_SAMPLERS:
            raise ValueError(f"unknown flow sampler {sampler!r}; valid: {list(FLOW_SAMPLERS)}")
        if steps < 1:
            raise ValueError("steps must be >= 1")
        fn = samplers.guided(model_fn, cond, null_cond, guidance)
        integrate = samplers.euler if sampler == "euler" else samplers.heun
        return integrate(fn, noise.astype(jnp.float32), self.sample_times(steps))
