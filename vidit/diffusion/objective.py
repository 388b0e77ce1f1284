"""The training objective as one object, so the trainer never knows which one it trains.

``make_objective(cfg)`` builds a frozen (hashable) dataclass from an ``ml_collections``
ConfigDict whose ``name`` picks the kind: ``'flow'`` (rectified flow, the default of the big
video systems), ``'vp'`` (the DiT paper's variance-preserving diffusion), or one of the few-step
objectives, which need a model with config.model.interval_input: ``'meanflow'`` (average
velocity, one jvp per step), ``'shortcut'`` (step-size-conditioned, self-consistency targets
from the EMA model, no jvp) and ``'distill'`` (MeanFlow with a frozen flow teacher's velocity).
All expose the same methods:

    sample_t(rng, batch_size) -> t [B]
    corrupt(x0, noise, t) -> (x_t, target)
    loss(model_fn, x0, cond, rng, *, target_fn=None, null_cond=None) -> (loss, per_example [B])
    loss_at(model_fn, x0, cond, t, noise) -> (loss, per_example_loss [B])
    eval_times(n) -> t [n]
    predict_x0_eps(output, x_t, t) -> (x0_hat, eps_hat)
    sample(model_fn, noise, cond, *, steps, null_cond=None, guidance=1.0, sampler=None) -> x0

``model_fn(x_t, t, cond)`` takes x_t [B, T, H, W, C], t float32 [B] in [0, 1] (1 = most noise)
and any pytree ``cond`` with a leading batch dimension, and returns an array shaped like x_t.

Frozen targets. An objective whose targets come from another network says so in the class
attribute ``target_model``: ``None`` (flow, vp, meanflow), ``'ema'`` (shortcut: the run's own
EMA parameters) or ``'teacher'`` (distill: a frozen model loaded at start-up). The train step
then passes that network to ``loss`` as ``target_fn`` (a model_fn bound to those parameters,
never differentiated); it also passes ``null_cond``, the unconditional input shaped like
``cond``, which objectives with trained-in guidance use. Objectives ignore what they do not
need, so the train step calls every objective the same way. ``needs_jvp`` marks objectives that
differentiate the model forward (attention backends without a JVP rule cannot train them).
"""
import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

ModelFn = Callable[[jax.Array, jax.Array, Any], jax.Array]


class Objective:
    """Shared part of every objective. Subclasses are frozen dataclasses and define
    ``sample_t``, ``corrupt``, ``predict_x0_eps`` and ``sample``."""

    name: str = ""
    target_model: Optional[str] = None  # None | 'ema' | 'teacher': where target_fn comes from
    needs_jvp: bool = False  # the loss takes jax.jvp through the model
    needs_interval: bool = False  # the model takes the second time input h (interval_input)
    needs_step: bool = False  # loss() takes step= (the train step's index)

    def sample_t(self, rng: jax.Array, batch_size: int) -> jax.Array:
        raise NotImplementedError

    def corrupt(self, x0: jax.Array, noise: jax.Array, t: jax.Array):
        raise NotImplementedError

    def loss_at(self, model_fn: ModelFn, x0: jax.Array, cond: Any, t: jax.Array,
                noise: jax.Array):
        """Loss at given times and noise (fixed-t validation uses this).

        Returns (mean loss, per-example loss [B]); the per-example loss is the mean squared
        error over all non-batch dimensions, computed in float32 whatever the model's dtype.
        """
        x_t, target = self.corrupt(x0, noise, t)
        out = model_fn(x_t, jnp.asarray(t, jnp.float32), cond)
        err = jnp.square(out.astype(jnp.float32) - target)
        per_example = jnp.mean(err.reshape(err.shape[0], -1), axis=1)
        return jnp.mean(per_example), per_example

    def loss(self, model_fn: ModelFn, x0: jax.Array, cond: Any, rng: jax.Array, *,
             target_fn: Optional[ModelFn] = None, null_cond: Any = None):
        """Training loss: draws t with ``sample_t`` and Gaussian noise, then ``loss_at``.

        ``target_fn`` and ``null_cond`` (see the module docstring) are unused here."""
        del target_fn, null_cond
        t_rng, noise_rng = jax.random.split(rng)
        t = self.sample_t(t_rng, x0.shape[0])
        noise = jax.random.normal(noise_rng, x0.shape, jnp.float32)
        return self.loss_at(model_fn, x0, cond, t, noise)

    def eval_times(self, n: int) -> jax.Array:
        """n evenly spaced validation times strictly inside (0, 1): (i + 0.5) / n.

        Validation loss at these fixed times tracks sample quality (SD3, Open-Sora) and, unlike
        the training loss, has no variance from drawing t.
        """
        return jnp.asarray((np.arange(n) + 0.5) / n, jnp.float32)


def _objective_classes() -> dict:
    # Imported here because flow.py and vp.py import ``Objective`` from this module.
    from vidit.diffusion.autoencoding import VAEObjective
    from vidit.diffusion.distill import DistillObjective
    from vidit.diffusion.flow import FlowObjective
    from vidit.diffusion.meanflow import MeanFlowObjective
    from vidit.diffusion.shortcut import ShortcutObjective
    from vidit.diffusion.vp import VPObjective

    return {"flow": FlowObjective, "vp": VPObjective, "meanflow": MeanFlowObjective,
            "shortcut": ShortcutObjective, "distill": DistillObjective, "vae": VAEObjective}


def _fields(cls) -> dict:
    return {f.name: f.default for f in dataclasses.fields(cls)}


def default_config(name: str = "flow") -> ml_collections.ConfigDict:
    """ConfigDict with ``name`` and every field of that objective at its default."""
    classes = _objective_classes()
    if name not in classes:
        raise ValueError(f"unknown objective {name!r}; valid: {sorted(classes)}")
    return ml_collections.ConfigDict({"name": name, **_fields(classes[name])})


def make_objective(cfg) -> Objective:
    """Builds the objective named by ``cfg.name`` from a ConfigDict (or a plain dict).

    Missing fields take their defaults; unknown names or fields raise ValueError (a typo in a
    config file should fail loudly, not silently train with the default). Values are coerced to
    the type of the default, so ``shift: 3`` in a config becomes 3.0.
    """
    cfg = dict(cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else cfg)
    name = cfg.pop("name", "flow")
    classes = _objective_classes()
    if name not in classes:
        raise ValueError(f"unknown objective {name!r}; valid: {sorted(classes)}")
    defaults = _fields(classes[name])
    unknown = sorted(set(cfg) - set(defaults))
    if unknown:
        raise ValueError(f"unknown fields {unknown} for objective {name!r}; valid: {sorted(defaults)}")
    kwargs = {k: type(defaults[k])(v) for k, v in cfg.items()}
    return classes[name](**kwargs)
