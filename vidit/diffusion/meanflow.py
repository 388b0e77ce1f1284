"""MeanFlow (Geng et al. 2025): a flow model that predicts the AVERAGE velocity over [r, t], so
one network call jumps from noise (t = 1) to data (r = 0).

    z_t = (1 - t) x + t eps,  v = eps - x  (rectified flow, as in flow.py)
    u(z, t, r) = 1/(t - r) * integral_r^t v(z_s, s) ds,   z_r = z_t - (t - r) u(z_t, t, r)
    identity:  u = v - (t - r) du/dt,  du/dt = (du/dz) v + du/dt  (total derivative along the flow)

Training regresses u on sg(v - (t - r) du/dt), where one `jax.jvp` of u over (z, t, r) with
tangents (v, 1, 0) gives u and du/dt together; the per-example error is reweighted by
1 / sg(error + c)^p. For a fraction of the batch r = t, which is plain flow matching.

The network sees h = t - r as a second time input (models with config.model.interval_input);
its embedder is zero-initialised, so a flow checkpoint loads and starts as the same model, and
a call without h is the instantaneous velocity u(z, t, t) = v.

Trained-in guidance (``guidance`` = w != 1): on the examples that kept their condition, the
velocity v (the jvp tangent and the target) becomes w v + (1 - w) sg(u(z, t, t | null)), the
model's own unconditional velocity; examples whose condition was dropped keep v, so the
unconditional model stays the plain one. A model trained so samples with sampling guidance 1.
With ``guidance_mix`` = k > 0 the mixture also takes the model's own guided velocity (Geng et
al. 2025, eq. 21):
w (1 - k) v + k sg(u(z, t, t | c)) + (1 - w (1 - k) - k) sg(u(z, t, t | null)). Its fixed point
is the same guided velocity, but the noisy data velocity v enters at w (1 - k) instead of w, so
that part of the target's variance falls by (1 - k)^2.

Endpoint self-distillation (``endpoint_fraction`` > 0, not in the paper): that many extra rows
(a share of the batch, with fresh noise and the first rows' conditions) train the one-step jump
itself, u(eps, 1, 0 | c), toward sg of the model's own ``endpoint_steps``-step jump (default 2:
over the grid 1, 1/2, 0, two forward passes; no jvp, no data), from train step
``endpoint_start`` on, their plain-MSE loss scaled by ``endpoint_weight``. Logit-normal (t, r)
almost never draw the full interval, and at small budgets the two-step samples are much better
than the one-step ones; this moves what the model does in two steps into one.

Adversarial term (``adversarial_weight`` > 0, not in the paper; needs ``endpoint_fraction`` > 0
and a model with config.model.disc_width > 0): the endpoint rows' one-step samples
x = eps - u(eps, 1, 0 | c) also meet a class-conditional patch discriminator D, against the
first rows' data clips (whose conditions the rows share), in the VAE's hinge form
(autoencoding.py): g = -mean D_sg(x) trains the DiT only, from ``adversarial_start`` on (D can
learn first), and d = hinge(D(data), D(sg(x))) the discriminator only, from ``endpoint_start``.
The one-step error is a smear of the digits the noise could lead to (docs/few_step): MSE to any
target rewards that average, D does not (docs/few_step has what it did).

Score distillation (``score_weight`` > 0, not in the paper; needs ``endpoint_fraction`` > 0):
the endpoint rows' one-step samples x, re-noised to a uniform t in [score_t_min, score_t_max],
are denoised by the model's own instantaneous velocity u(z, t, t | c) (guided: trained-in
guidance, times ``score_guidance``), and x regresses on that sg estimate (SDS, Poole et al.
2022). The regression on the two-step jump from the same noise rewards the average of the
digits a noise could lead to; the denoiser's estimate of a re-noised smear leans toward one of
them, so this term can pull a smear apart (docs/few_step has what it did).
"""
import dataclasses
import functools
from typing import Any, ClassVar, Optional

import jax
import jax.numpy as jnp
import numpy as np

from vidit.diffusion import samplers
from vidit.diffusion.flow import FlowObjective
from vidit.diffusion.objective import ModelFn, Needs, per_example_mse
from vidit.errors import ConfigError
from vidit.models import discriminator


@dataclasses.dataclass(frozen=True)
class MeanFlowObjective(FlowObjective):
    """Fields are config fields (see ``default_config('meanflow')``); the flow fields set the
    validation loss (at r = t) and the time distribution of t and r."""

    logit_mean: float = -0.4
    logit_std: float = 1.0
    equal_fraction: float = 0.75  # share of the batch with r = t (flow matching)
    adaptive_p: float = 1.0  # loss = err / sg(err + adaptive_c)^p; 0 = plain MSE
    adaptive_c: float = 0.01
    guidance: float = 1.0  # trained-in CFG scale w (module docstring); 1 = off
    guidance_mix: float = 0.0  # k: share of the guided target from the model's own u(z, t, t | c)
    endpoint_fraction: float = 0.0  # extra rows (share of the batch): u(eps, 1, 0) -> its k steps
    endpoint_start: int = 0  # the train step from which those rows count
    endpoint_steps: int = 2  # their target: the model's own jump in this many steps
    endpoint_weight: float = 1.0  # multiplies their plain-MSE loss (the rows' share is separate)
    adversarial_weight: float = 0.0  # hinge GAN on those rows' one-step samples (docstring)
    adversarial_start: int = 0  # the generator's term counts from here (D from endpoint_start)
    score_weight: float = 0.0  # score distillation on those rows' one-step samples (docstring)
    score_t_min: float = 0.2  # the re-noising time of that term is uniform in [min, max]
    score_t_max: float = 0.6
    score_guidance: float = 1.0  # sampling guidance on top of the model's own (trained-in) one

    name: ClassVar[str] = "meanflow"

    @property
    def needs(self) -> Needs:
        # step: the endpoint rows (and the adversarial term) start at a train step.
        return Needs(interval_input=True, jvp=True, step=self.endpoint_fraction > 0,
                     discriminator=self.adversarial)

    def check(self, config) -> None:
        """Trained-in guidance mixes in the model's own unconditional velocity."""
        if self.guidance == 1.0:
            return
        if config.model.cond == "none":
            raise ConfigError(
                f"config.objective.guidance={self.guidance} trains guidance in, which needs a "
                "conditional model (config.model.cond='class' or 'text'), or set it to 1")
        if self.needs.target is None and not config.train.cond_drop_prob > 0:
            raise ConfigError(
                f"config.objective.guidance={self.guidance} mixes in the model's own "
                "unconditional velocity, which it learns only from dropped conditions: set "
                "config.train.cond_drop_prob > 0")

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.equal_fraction <= 1.0:
            raise ValueError("equal_fraction must lie in [0, 1]")
        if not 0.0 <= self.guidance_mix < 1.0:
            raise ValueError("guidance_mix must lie in [0, 1)")
        if not 0.0 <= self.endpoint_fraction <= 1.0:
            raise ValueError("endpoint_fraction must lie in [0, 1]")
        if self.endpoint_weight < 0:
            raise ValueError("endpoint_weight must be >= 0")
        if self.adversarial_weight < 0:
            raise ValueError("adversarial_weight must be >= 0")
        if self.adversarial_weight and not self.endpoint_fraction:
            raise ValueError("adversarial_weight > 0 judges the endpoint rows' one-step samples: "
                             "set endpoint_fraction > 0")
        if self.score_weight < 0:
            raise ValueError("score_weight must be >= 0")
        if self.score_weight and not self.endpoint_fraction:
            raise ValueError("score_weight > 0 judges the endpoint rows' one-step samples: "
                             "set endpoint_fraction > 0")
        if not 0.0 <= self.score_t_min < self.score_t_max <= 1.0:
            raise ValueError("score_t_min and score_t_max need 0 <= min < max <= 1")
        if self.endpoint_steps < 2:
            raise ValueError("endpoint_steps must be >= 2 (the one-step jump is what it trains)")

    @property
    def adversarial(self) -> bool:
        """The adversarial term is on: the loss takes disc_fn= (the model's discriminator)."""
        return self.adversarial_weight > 0

    def num_endpoint(self, batch_size: int) -> int:
        """Extra rows per batch of this size that train the one-step jump (static)."""
        return int(round(self.endpoint_fraction * batch_size))

    def sample_t_r(self, rng: jax.Array, batch_size: int):
        """(t, r) [B] with t >= r, both logit-normal; r = t for `equal_fraction` of the batch."""
        a_rng, b_rng, eq_rng = jax.random.split(rng, 3)
        a, b = self.sample_t(a_rng, batch_size), self.sample_t(b_rng, batch_size)
        t, r = jnp.maximum(a, b), jnp.minimum(a, b)
        equal = jax.random.uniform(eq_rng, (batch_size,)) < self.equal_fraction
        return t, jnp.where(equal, t, r)

    def loss(self, model_fn: ModelFn, x0: jax.Array, cond: Any, rng: jax.Array, *,
             null_cond: Any = None, step=None, disc_fn=None, target_fn: Optional[ModelFn] = None):
        """``step``: the train step (the endpoint rows count from ``endpoint_start``; None, a
        direct call, counts them). ``disc_fn(x, cond, frozen=False)`` -> logits: the
        discriminator of the adversarial term. ``target_fn``: a distillation's teacher."""
        if self.adversarial and disc_fn is None:
            raise ValueError("adversarial_weight > 0 needs disc_fn (the model's discriminator)")
        tr_rng, noise_rng = jax.random.split(rng)
        t, r = self.sample_t_r(tr_rng, x0.shape[0])
        noise = jax.random.normal(noise_rng, x0.shape, jnp.float32)
        loss, per_example = self.loss_tr(model_fn, x0, cond, t, r, noise, target_fn=target_fn,
                                         null_cond=null_cond)
        n = self.num_endpoint(x0.shape[0])
        if not n:
            return loss, per_example
        # n extra rows on the one-step jump, with fresh noise and the first n rows' conditions.
        end_rng = jax.random.fold_in(rng, 0x656E64)  # leaves the MeanFlow rows' draws as they were
        end_noise = jax.random.normal(end_rng, (n,) + x0.shape[1:], jnp.float32)
        head = jax.tree.map(lambda a: a[:n], cond)
        null_head = None if null_cond is None else jax.tree.map(  # per-row nulls go with their rows
            lambda a: a[:n] if jnp.ndim(a) and a.shape[0] > 1 else a, null_cond)

        def end_loss():
            mse, _, u = self.endpoint_loss(model_fn, end_noise, head)
            total = self.endpoint_weight * mse
            one_step = end_noise - u  # the one-step sample: z_0 = z_1 - u(z_1, 1, 0)
            if self.score_weight:
                total = total + self.score_weight * self.score_loss(
                    model_fn, one_step, head, jax.random.fold_in(rng, 0x73636F),
                    null_cond=null_head)
            if self.adversarial:
                g_on = 1.0 if step is None else (step >= self.adversarial_start)
                total = total + self.adversarial_weight * adversarial_loss(
                    disc_fn, one_step, x0[:n].astype(jnp.float32), head, g_on)
            return total

        if step is None:  # a direct call, outside a training run: the rows count
            extra = end_loss()
        else:  # a branch, not a 0 weight, so the rows cost nothing before the start
            extra = jax.lax.cond(step >= self.endpoint_start, end_loss,
                                 lambda: jnp.zeros((), jnp.float32))
        return loss + (n / x0.shape[0]) * extra, per_example

    def endpoint_loss(self, model_fn: ModelFn, noise, cond):
        """u(eps, 1, 0 | c) against sg of the model's own ``endpoint_steps``-step jump from eps,
        plain MSE (unweighted): (mean, per-example [B], u in float32 for the adversarial term)."""
        ones = jnp.ones((noise.shape[0],), jnp.float32)
        x = noise.astype(jnp.float32)
        times = jnp.asarray(self.sample_times(self.endpoint_steps), jnp.float32)
        k_step = jax.lax.stop_gradient(samplers.jump(model_fn, x, times, cond, None, 1.0))  # the sampler's
        target = x - k_step  # the k-step jump's average velocity over [0, 1]
        u = model_fn(noise, ones, cond, h=ones).astype(jnp.float32)
        # Plain MSE, not the adaptive weight: the target is the model's own output, so at init
        # (a zero output) the error is ~0, and 1 / sg(err + c) would blow that up to full-size
        # gradients toward a self-consistent but flat field (the model collapsed; docs/few_step).
        mean, per_example = per_example_mse(u, target)
        return mean, per_example, u

    def score_loss(self, model_fn: ModelFn, x, cond, rng, *, null_cond=None):
        """Score distillation (Poole et al. 2022) on one-step samples x: re-noise sg(x) to a
        uniform t in [score_t_min, score_t_max], denoise it with the model's own instantaneous
        (guided) velocity, x_hat = z - t sg(u(z, t, t | c)), and regress x on sg(x_hat):
        the gradient x - x_hat reaches the DiT through x only."""
        t_rng, noise_rng = jax.random.split(rng)
        t = jax.random.uniform(t_rng, (x.shape[0],), jnp.float32, self.score_t_min,
                               self.score_t_max)
        noise = jax.random.normal(noise_rng, x.shape, jnp.float32)
        z, _ = self.corrupt(jax.lax.stop_gradient(x), noise, t)

        def velocity(z, t_vec, c):
            return model_fn(z, t_vec, c, h=jnp.zeros_like(t_vec))

        v = samplers.guided(velocity, cond, null_cond, self.score_guidance)(z, t)
        x_hat = jax.lax.stop_gradient(self.predict_x0_eps(v.astype(jnp.float32), z, t)[0])
        return jnp.mean(jnp.square(x - x_hat))

    def velocity(self, model_fn: ModelFn, z, v, t, cond, *, target_fn=None, null_cond=None):
        """The velocity field the average velocity is taken of: the data velocity v, or with
        trained-in guidance w v + (1 - w) sg(u(z, t, t | null)) where the condition was kept."""
        del target_fn
        if self.guidance == 1.0 or not null_cond:
            return v
        null = jax.tree.map(lambda c, n: jnp.broadcast_to(n, jnp.shape(c)).astype(c.dtype),
                            cond, null_cond)

        def u_tt(c):  # u(z, t, t | c), a constant of the loss
            return jax.lax.stop_gradient(model_fn(z, t, c, h=jnp.zeros_like(t)).astype(v.dtype))

        w, k = self.guidance, self.guidance_mix
        mixed = w * (1.0 - k) * v + (1.0 - w * (1.0 - k) - k) * u_tt(null)
        if k:
            mixed = mixed + k * u_tt(cond)
        dropped = is_null(cond, null).reshape((-1,) + (1,) * (v.ndim - 1))
        return jnp.where(dropped, v, mixed)

    def loss_tr(self, model_fn: ModelFn, x0, cond, t, r, noise, *, target_fn=None,
                null_cond=None):
        """The MeanFlow loss at given (t, r, noise): (mean, per-example [B])."""
        z, v = self.corrupt(x0, noise, t)
        v = self.velocity(model_fn, z, v, t, cond, target_fn=target_fn, null_cond=null_cond)
        u, u_target = mean_flow_target(model_fn, z, v, t, r, cond)
        err = jnp.square(u.astype(jnp.float32) - u_target)
        per_example = jnp.mean(err.reshape(err.shape[0], -1), axis=1)
        if self.adaptive_p:
            weight = jax.lax.stop_gradient(1.0 / (per_example + self.adaptive_c) ** self.adaptive_p)
            return jnp.mean(weight * per_example), per_example
        return jnp.mean(per_example), per_example

    def sample_times(self, steps: int) -> np.ndarray:
        """Uniform grid from 1 to 0 (no shift: each step is one exact average-velocity jump)."""
        return np.linspace(1.0, 0.0, steps + 1)

    def sample(self, model_fn: ModelFn, noise: jax.Array, cond: Any, *, steps: int,
               null_cond: Any = None, guidance=1.0, sampler: Optional[str] = None) -> jax.Array:
        """z_r = z_t - (t - r) u(z_t, t, r) along the grid; `steps` = 1 is one network call."""
        del sampler  # the average-velocity jump is the only sampler
        if steps < 1:
            raise ValueError("steps must be >= 1")
        times = jnp.asarray(self.sample_times(steps), jnp.float32)
        return samplers.jump(model_fn, noise.astype(jnp.float32), times, cond, null_cond, guidance)


def adversarial_loss(disc_fn, fake, real, cond, g_on=1.0):
    """g_on * g + d, the two players' hinge losses as one sum (the VAE's split,
    autoencoding.py): g on D with stop-gradient parameters reaches only the generator through
    ``fake``; d on data and sg(fake) reaches only the discriminator. g_on = 0 trains D alone.
    ``fake`` and ``real`` share the conditions ``cond`` row by row."""
    g = discriminator.g_hinge_loss(disc_fn(fake, cond, frozen=True))
    d = discriminator.d_hinge_loss(disc_fn(real, cond), disc_fn(jax.lax.stop_gradient(fake), cond))
    return jnp.asarray(g_on, jnp.float32) * g + d


def is_null(cond: Any, null_cond: Any) -> jax.Array:
    """[B] bool: which examples' condition equals the null (unconditional) one in every leaf."""
    def same(c, n):
        c = jnp.asarray(c)
        eq = c == jnp.broadcast_to(jnp.asarray(n, c.dtype), c.shape)
        return jnp.all(eq.reshape(c.shape[0], -1), axis=1)

    return functools.reduce(jnp.logical_and, jax.tree.leaves(jax.tree.map(same, cond, null_cond)))


def mean_flow_target(model_fn: ModelFn, z, v, t, r, cond):
    """(u(z, t, r), sg(v - (t - r) du/dt)) with du/dt from one jvp along tangents (v, 1, 0).

    Computed in float32 at least (float64 if the inputs are)."""
    acc = jnp.promote_types(v.dtype, jnp.float32)
    v = v.astype(acc)

    def u_fn(z, t, r):
        return model_fn(z, t, cond, h=t - r).astype(acc)

    u, du_dt = jax.jvp(u_fn, (z, t, r), (v.astype(z.dtype), jnp.ones_like(t), jnp.zeros_like(r)))
    target = v - (t - r).astype(acc).reshape((-1,) + (1,) * (v.ndim - 1)) * du_dt
    return u, jax.lax.stop_gradient(target)
