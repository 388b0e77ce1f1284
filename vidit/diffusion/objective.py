"""What every training objective is: an interface the trainer calls without knowing which one
it trains, and a declaration of what the train step must supply to it.

An objective is a frozen (hashable) dataclass whose fields are its config fields (built by
``vidit.diffusion.make_objective`` from config.objective). It defines

    needs -> Needs                   what the train step supplies (below)
    check(config)                    config errors of its own fields against the run's config
    loss(model_fn, x0, cond, rng, *, null_cond=None, <what needs names>) -> (loss, per_example [B])
    eval_metrics(model_fn, x0, cond, rng, num_times) -> {name: scalar}, averaged over batches
    sample(model_fn, noise, cond, *, steps, null_cond=None, guidance=1.0) -> x0

``model_fn(x_t, t, cond, h=None)`` takes x_t [B, T, H, W, C], t float32 [B] in [0, 1] (1 = most
noise), any pytree ``cond`` with a leading batch dimension and, for average-velocity models,
the interval h; it returns an array shaped like x_t. ``null_cond`` is the unconditional input
shaped like ``cond`` (classifier-free guidance); objectives that do not use it ignore it.

The keyword arguments a loss takes beyond those are exactly what ``needs`` declares, and the
train step (vidit/steps.py) passes nothing else: ``target_fn`` (a model_fn bound to frozen
parameters: the run's EMA or a teacher), ``step`` (the train step's index), ``disc_fn`` (the
model's discriminator). Adding an objective is one file with its class and one line in
vidit/diffusion/registry.py.
"""
import dataclasses
from typing import Any, Callable, ClassVar, Optional

import jax
import jax.numpy as jnp
import numpy as np

ModelFn = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class Needs:
    """What an objective needs from the run; the trainer, the compiler and the start-up checks
    read this instead of probing the objective."""

    model: str = "dit"  # the config.model.kind it trains: 'dit' or 'vae'
    target: Optional[str] = None  # frozen params of ``target_fn``: None, 'ema' or 'teacher'
    step: bool = False  # loss(..., step=) gets the train step's index
    discriminator: bool = False  # loss(..., disc_fn=) gets the model's discriminator
    interval_input: bool = False  # the model takes h (config.model.interval_input)
    jvp: bool = False  # the loss takes jax.jvp through the model (attention needs a JVP rule)


def per_example_mse(out: jax.Array, target: jax.Array):
    """(mean, per-example [B]) squared error over all non-batch dimensions, in float32."""
    err = jnp.square(out.astype(jnp.float32) - target.astype(jnp.float32))
    per_example = jnp.mean(err.reshape(err.shape[0], -1), axis=1)
    return jnp.mean(per_example), per_example


class Objective:
    """Shared part of every objective; subclasses are frozen dataclasses."""

    name: ClassVar[str] = ""

    @property
    def needs(self) -> Needs:
        return Needs()

    def check(self, config: Any) -> None:
        """Raises vidit.errors.ConfigError where this objective's fields cannot work with the
        rest of `config` (the generic checks of `needs` are vidit/checks.py's)."""
        del config

    def loss(self, model_fn: ModelFn, x0: jax.Array, cond: Any, rng: jax.Array, *,
             null_cond: Any = None):
        raise NotImplementedError

    def loss_at(self, model_fn: ModelFn, x0: jax.Array, cond: Any, t: jax.Array,
                noise: jax.Array):
        """The loss at given times and noise (what the fixed-t validation loss measures)."""
        raise NotImplementedError

    def eval_times(self, n: int) -> np.ndarray:
        """n evenly spaced validation times strictly inside (0, 1): (i + 0.5) / n (float32).

        Validation loss at these fixed times tracks sample quality (SD3, Open-Sora) and, unlike
        the training loss, has no variance from drawing t.
        """
        return ((np.arange(n) + 0.5) / n).astype(np.float32)

    def eval_metrics(self, model_fn: ModelFn, x0: jax.Array, cond: Any, rng: jax.Array,
                     num_times: int) -> dict:
        """Validation metrics of one batch: the loss at `num_times` fixed times with fixed noise
        (``loss_t<time>``) and their mean (``loss``)."""
        times = self.eval_times(num_times)

        def at(args):
            i, t = args
            noise = jax.random.normal(jax.random.fold_in(rng, i), x0.shape, x0.dtype)
            return self.loss_at(model_fn, x0, cond, jnp.full((x0.shape[0],), t), noise)[0]

        per_t = jax.lax.map(at, (jnp.arange(len(times)), jnp.asarray(times)))
        out = {f"loss_t{t:.3f}": per_t[i] for i, t in enumerate(times)}
        return {"loss": jnp.mean(per_t), **out}

    def sample(self, model_fn: ModelFn, noise: jax.Array, cond: Any, *, steps: int,
               null_cond: Any = None, guidance=1.0, sampler: Optional[str] = None) -> jax.Array:
        raise NotImplementedError
