"""The VAE's training objective ('vae'): reconstruction + KL, with an optional patch-GAN term.

It has the objectives' interface, so `vidit.train` trains a VAE (config.model.kind = 'vae')
with the same loop, checkpoints, sharding and metrics as a DiT:

    loss(model_fn, x0, cond, rng, *, null_cond=None, step=None) -> (loss, per_example [B])
    eval_metrics(model_fn, x0, ...) -> {'loss', 'l1', 'psnr', 'ssim'} (posterior mean, no noise)
    sample(model_fn, x0, cond, **_) -> [B, T, H, 2W, C]: input | reconstruction, side by side

``model_fn`` is bound to a `vae.VAEModel` (the VAE and its discriminator in one parameter tree
``{'vae': ..., 'disc': ...}``); ``model_fn(x, rng, gan=True)`` returns the reconstruction, the
posterior and the discriminator logits.

GAN term (``gan_weight > 0``, from step ``gan_start`` on). One loss and one optimizer update
both networks through a stop-gradient split:

    loss = L1 + beta * KL + w * g_hinge(D_sg(recon)) + w * d_hinge(D(x), D(sg(recon)))

where ``D_sg`` is the discriminator with stop-gradient parameters and ``sg(recon)`` a
stop-gradient reconstruction. The generator term's gradient therefore reaches only the VAE and
the hinge loss's only the discriminator (tests check both), so the sum is the two players' losses
optimised simultaneously. Before ``gan_start`` both GAN terms are multiplied by 0 (the
discriminator's gradients are zero and Adam leaves it where it is). There is no LDM-style
adaptive weight (ratio of last-layer gradient norms): ``gan_weight`` is used as given.
"""
import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from vidit.diffusion.objective import ModelFn, Needs, Objective
from vidit.eval import image_metrics
from vidit.models import discriminator


def kl_divergence(mean, logvar):
    """KL(N(mean, exp(logvar)) || N(0, 1)) per latent element (same shape as mean)."""
    mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
    return 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)


def vae_loss(recon, x, mean, logvar, beta: float = 1e-6):
    """loss = mean |recon - x| + beta * KL, both averaged per element (pixel / latent element).

    Note the normalisation: LDM-style "sum over pixels, beta=1e-6" is this loss with
    beta_here = 1e-6 * latent_elements / pixel_elements (even weaker).
    Returns (loss, metrics) with metrics l1, mse, kl (per latent element), kl_per_sample (summed
    over a sample's latent), loss.
    """
    recon, x = recon.astype(jnp.float32), x.astype(jnp.float32)
    diff = recon - x
    l1 = jnp.mean(jnp.abs(diff))
    kl_map = kl_divergence(mean, logvar)
    kl = jnp.mean(kl_map)
    loss = l1 + beta * kl
    metrics = dict(loss=loss, l1=l1, mse=jnp.mean(jnp.square(diff)), kl=kl,
                   kl_per_sample=jnp.mean(jnp.sum(kl_map.reshape(kl_map.shape[0], -1), axis=1)))
    return loss, metrics


@dataclasses.dataclass(frozen=True)
class VAEObjective(Objective):
    """L1 + beta * KL (per element means, see `vae_loss`) + the optional hinge GAN."""

    beta: float = 1e-6
    gan_weight: float = 0.0  # 0: no GAN term (the discriminator is never run)
    gan_start: int = 0  # first train step with the GAN term
    # + l2_weight * MSE. L1 alone pulls each pixel to its median, which on sparse strokes over
    # black is black: a VAE can sit at the all-black reconstruction (docs/latent).
    l2_weight: float = 0.0

    name: ClassVar[str] = "vae"

    @property
    def needs(self) -> Needs:
        return Needs(model="vae", step=True)  # step: for gan_start

    def __post_init__(self):
        if min(self.beta, self.gan_weight, self.gan_start, self.l2_weight) < 0:
            raise ValueError("vae objective: beta, gan_weight, gan_start, l2_weight must be >= 0")

    def loss(self, model_fn: ModelFn, x0: jax.Array, cond: Any, rng: jax.Array, *,
             null_cond: Any = None, step=None):
        del cond, null_cond
        gan = self.gan_weight > 0
        out = model_fn(x0, rng, gan=gan)
        loss, terms = vae_loss(out["recon"], x0, out["mean"], out["logvar"], self.beta)
        diff = jnp.abs(out["recon"].astype(jnp.float32) - x0.astype(jnp.float32))
        per_example = jnp.mean(diff.reshape(diff.shape[0], -1), axis=1)
        if self.l2_weight:
            loss = loss + self.l2_weight * terms["mse"]
        if gan:
            on = jnp.asarray(1.0 if step is None else step >= self.gan_start, jnp.float32)
            g = discriminator.g_hinge_loss(out["g_logits"])
            d = discriminator.d_hinge_loss(out["d_real"], out["d_fake"])
            loss = loss + on * self.gan_weight * (g + d)
        return loss, per_example

    def eval_metrics(self, model_fn: ModelFn, x0: jax.Array, cond: Any = None, rng=None,
                     num_times: int = 0) -> dict:
        """Reconstruction metrics of the posterior mean: loss (= L1), PSNR (dB), SSIM."""
        del cond, rng, num_times  # no noise levels
        recon = jnp.clip(model_fn(x0, None)["recon"], -1.0, 1.0)
        l1 = jnp.mean(jnp.abs(recon - x0.astype(jnp.float32)))
        return {"loss": l1, "l1": l1, "psnr": image_metrics.psnr(recon, x0),
                "ssim": image_metrics.ssim(recon, x0)}

    def sample(self, model_fn: ModelFn, x0: jax.Array, cond: Any = None, **_):
        """Input and reconstruction (posterior mean) side by side along the width."""
        recon = jnp.clip(model_fn(x0, None)["recon"], -1.0, 1.0)
        return jnp.concatenate([x0.astype(jnp.float32), recon], axis=3)
