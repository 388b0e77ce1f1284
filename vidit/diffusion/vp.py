"""Variance-preserving diffusion, the DiT paper's objective (DDPM training, DDIM sampling).

    x_k = sqrt(abar_k) x0 + sqrt(1 - abar_k) eps,  k = 0 .. N (N = num_train_steps)

Time convention: k is the 1-based DDPM step (k = 0 is the clean data, abar_0 = 1; k = N is the
most noise). The model's time input is t = k / N, so it lies in [1/N, 1] during training and
1 = most noise, as for flow. ``corrupt`` accepts any t in [0, 1] and snaps it to the nearest
step k = round(t N), which is what makes the shared ``eval_times`` work here.

Targets: 'eps' (the noise) or 'v' = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho). With
``zero_terminal_snr`` the schedule is rescaled so abar_N = 0 exactly (Lin et al. 2023): training
then sees pure noise at the last step, as sampling does; it needs v-prediction, because an
eps-predictor cannot recover x0 from pure noise (x0 = (x - sqrt(1-abar) eps) / sqrt(abar)
divides by 0), so that combination is rejected.
"""
import dataclasses
import functools
import math
from typing import Any, ClassVar, Optional

import jax
import jax.numpy as jnp
import numpy as np

from vidit.diffusion import samplers
from vidit.diffusion.objective import ModelFn, Objective, per_example_mse

SCHEDULES = ("linear", "cosine")
PREDICTIONS = ("eps", "v")
VP_SAMPLERS = ("ddim",)


@functools.lru_cache(maxsize=None)
def alphas_cumprod(schedule: str, num_train_steps: int, beta_start: float = 1e-4,
                   beta_end: float = 0.02, zero_terminal_snr: bool = False) -> np.ndarray:
    """abar_k for k = 0 .. N as a read-only float64 array [N + 1], with abar_0 = 1.

    linear: betas evenly spaced in [beta_start, beta_end] (DDPM, DiT).
    cosine: abar(s) = f(s) / f(0), f(s) = cos((s + 0.008) / 1.008 * pi / 2)^2 (Nichol &
    Dhariwal), via betas clipped at 0.999 so the last step stays finite.
    """
    n = num_train_steps
    if schedule == "linear":
        betas = np.linspace(beta_start, beta_end, n, dtype=np.float64)
    elif schedule == "cosine":
        s = np.arange(n + 1, dtype=np.float64) / n
        f = np.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = np.clip(1.0 - f[1:] / f[:-1], 0.0, 0.999)
    else:
        raise ValueError(f"unknown schedule {schedule!r}; valid: {list(SCHEDULES)}")
    abar = np.cumprod(1.0 - betas)
    if zero_terminal_snr:
        # Shift sqrt(abar) so its last value is 0 and rescale so its first is unchanged: the
        # rest of the schedule barely moves, but the final step becomes pure noise.
        r = np.sqrt(abar)
        first, last = r[0], r[-1]
        r = (r - last) * first / (first - last)
        abar = r**2
        abar[-1] = 0.0  # exact, not 1e-40 from rounding
    out = np.concatenate([[1.0], abar])
    out.flags.writeable = False
    return out


def _expand(a: jax.Array, x: jax.Array) -> jax.Array:
    """Scalar or [B] -> broadcastable against x [B, ...]."""
    a = jnp.asarray(a, jnp.float32)
    return a if a.ndim == 0 else a.reshape((-1,) + (1,) * (x.ndim - 1))


@dataclasses.dataclass(frozen=True)
class VPObjective(Objective):
    """Variance-preserving diffusion. Fields are the config fields (``default_config('vp')``)."""

    schedule: str = "linear"  # 'linear' | 'cosine'
    num_train_steps: int = 1000
    beta_start: float = 1e-4  # linear schedule only
    beta_end: float = 0.02
    prediction: str = "eps"  # 'eps' | 'v'
    zero_terminal_snr: bool = False  # rescale so abar_N = 0; requires prediction='v'
    sampler: str = "ddim"  # only 'ddim' (eta = 0)

    name: ClassVar[str] = "vp"

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; valid: {list(SCHEDULES)}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {self.prediction!r}; valid: {list(PREDICTIONS)}")
        if self.sampler not in VP_SAMPLERS:
            raise ValueError(f"unknown vp sampler {self.sampler!r}; valid: {list(VP_SAMPLERS)}")
        if self.num_train_steps < 1:
            raise ValueError("num_train_steps must be >= 1")
        if self.zero_terminal_snr and self.prediction != "v":
            raise ValueError("zero_terminal_snr needs prediction='v' (eps cannot give x0 at abar=0)")

    # -- schedule ---------------------------------------------------------------------------
    def alphas_cumprod(self) -> np.ndarray:
        """abar_k, k = 0 .. N, float64 [N + 1] (abar_0 = 1)."""
        return alphas_cumprod(self.schedule, self.num_train_steps, self.beta_start,
                              self.beta_end, self.zero_terminal_snr)

    def step_index(self, t: jax.Array) -> jax.Array:
        """Model time t in [0, 1] -> nearest step k = round(t N), int32."""
        n = self.num_train_steps
        return jnp.clip(jnp.round(jnp.asarray(t, jnp.float32) * n), 0, n).astype(jnp.int32)

    def alpha_bar(self, t: jax.Array) -> jax.Array:
        """abar at model time t (snapped to the step grid), float32, same shape as t."""
        return jnp.asarray(self.alphas_cumprod(), jnp.float32)[self.step_index(t)]

    # -- training ---------------------------------------------------------------------------
    def sample_t(self, rng: jax.Array, batch_size: int) -> jax.Array:
        """k uniform in {1, ..., N}, returned as t = k / N (float32 [B])."""
        k = jax.random.randint(rng, (batch_size,), 1, self.num_train_steps + 1)
        return k.astype(jnp.float32) / self.num_train_steps

    def corrupt(self, x0: jax.Array, noise: jax.Array, t: jax.Array):
        """x_t (x0's dtype) and the target (float32): eps, or v = sqrt(abar) eps - sqrt(1-abar) x0."""
        x0f, noise = x0.astype(jnp.float32), noise.astype(jnp.float32)
        abar = _expand(self.alpha_bar(t), x0)
        sa, sn = jnp.sqrt(abar), jnp.sqrt(1.0 - abar)
        x_t = sa * x0f + sn * noise
        target = noise if self.prediction == "eps" else sa * noise - sn * x0f
        return x_t.astype(x0.dtype), target

    def loss_at(self, model_fn: ModelFn, x0: jax.Array, cond: Any, t: jax.Array,
                noise: jax.Array):
        """(mean, per-example [B]) squared error of the eps or v prediction, in float32."""
        x_t, target = self.corrupt(x0, noise, t)
        return per_example_mse(model_fn(x_t, jnp.asarray(t, jnp.float32), cond), target)

    def loss(self, model_fn: ModelFn, x0: jax.Array, cond: Any, rng: jax.Array, *,
             null_cond: Any = None):
        """The training loss: a uniform step k, Gaussian noise, then ``loss_at``."""
        del null_cond
        t_rng, noise_rng = jax.random.split(rng)
        t = self.sample_t(t_rng, x0.shape[0])
        noise = jax.random.normal(noise_rng, x0.shape, jnp.float32)
        return self.loss_at(model_fn, x0, cond, t, noise)

    # -- prediction -> (x0, eps) ------------------------------------------------------------
    def _to_x0_eps(self, output: jax.Array, x_t: jax.Array, abar: jax.Array):
        """Network output at noise level abar (scalar or broadcastable) -> (x0_hat, eps_hat)."""
        x_t = x_t.astype(jnp.float32)
        output = output.astype(jnp.float32)
        sa, sn = jnp.sqrt(abar), jnp.sqrt(1.0 - abar)
        if self.prediction == "v":
            # Inverse of the rotation (x, v) = R(x0, eps): no division, fine at abar = 0.
            return sa * x_t - sn * output, sn * x_t + sa * output
        return (x_t - sn * output) / sa, output

    def predict_x0_eps(self, output: jax.Array, x_t: jax.Array, t: jax.Array):
        """Network output at model times t [B] -> (x0_hat, eps_hat), float32."""
        return self._to_x0_eps(output, x_t, _expand(self.alpha_bar(t), x_t))

    # -- sampling ---------------------------------------------------------------------------
    def sample_steps(self, steps: int) -> np.ndarray:
        """DDIM step indices [steps + 1]: evenly spaced from N down to 0 ("trailing" spacing,
        so the first step starts at the most-noise level the model was trained on)."""
        return np.round(np.linspace(self.num_train_steps, 0, steps + 1)).astype(np.int64)

    def sample(self, model_fn: ModelFn, noise: jax.Array, cond: Any, *, steps: int,
               null_cond: Any = None, guidance=1.0, sampler: Optional[str] = None) -> jax.Array:
        """DDIM (eta = 0) from x_N = noise to x_0, in float32; returns x0 (float32).

        Without zero-terminal SNR, abar_N is small but not 0 and noise stands in for x_N, as in
        DDPM/DiT. Guidance combines the eps or v outputs, which are linear in the score.
        """
        sampler = sampler or self.sampler
        if sampler not in VP_SAMPLERS:
            raise ValueError(f"unknown vp sampler {sampler!r}; valid: {list(VP_SAMPLERS)}")
        if not 1 <= steps <= self.num_train_steps:
            raise ValueError(f"steps must be in [1, {self.num_train_steps}], got {steps}")
        ks = self.sample_steps(steps)
        fn = samplers.guided(model_fn, cond, null_cond, guidance)
        return samplers.ddim(fn, self._to_x0_eps, noise.astype(jnp.float32),
                             ks / self.num_train_steps, self.alphas_cumprod()[ks])
