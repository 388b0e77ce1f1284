"""The jitted functions of a run: train step, fixed-t eval loss, sampling.

They are pure: (state, batch) in, (state, metrics) out. `vidit/train.py` compiles them once with
explicit shardings; `vidit/compile.py`-style AOT tools can lower the very same functions.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from vidit import sharding
from vidit.train_state import Setup, TrainState, ema_update


def condition(batch: dict, cond_kind: str) -> dict:
    """The part of a batch the model is conditioned on."""
    if cond_kind == "class":
        return {"label": batch["label"]}
    if cond_kind == "text":
        return {"text": batch["text"]}
    return {}


def _split_micro(batch: dict, n: int) -> dict:
    """[B, ...] -> [n, B/n, ...] for gradient accumulation."""
    return jax.tree.map(lambda x: x.reshape((n, x.shape[0] // n) + x.shape[1:]), batch)


def bind(setup: Setup, params: Any):
    """model_fn(x, t, cond, h=None) for these params, merged per call: objectives may call it
    inside jax.jvp, and nnx modules belong to one trace."""
    def model_fn(*args, **kw):
        return setup.model(params)(*args, **kw)
    return model_fn


def target_params(objective: Any, state: TrainState, teacher_params: Any = None) -> Any:
    """The frozen parameters an objective's targets come from (objective.target_model):
    None, the run's EMA parameters, or the teacher's."""
    kind = getattr(objective, "target_model", None)
    if kind is None:
        return None
    if kind == "ema":
        return state.ema_params
    if teacher_params is None:
        raise ValueError(f"objective {objective.name!r} needs teacher parameters: pass them to "
                         "the train step (vidit.train loads config.objective.teacher_workdir)")
    return teacher_params


def train_step(setup: Setup, objective: Any, state: TrainState, batch: dict,
               teacher_params: Any = None, ae_params: Any = None):
    """One optimizer update. ``teacher_params`` (distillation only) and ``ae_params`` (a latent
    DiT's online encoder, vidit/autoencoder.py) are frozen, not part of the state."""
    config = setup.config
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    accum = int(config.optim.grad_accum)
    frozen = target_params(objective, state, teacher_params)  # never differentiated
    target_fn = None if frozen is None else bind(setup, frozen)

    def loss_fn(params, micro, rng):
        drop_rng, loss_rng = jax.random.split(rng)
        model = setup.model(params)
        cond = model.drop_cond(condition(micro, config.model.cond), drop_rng,
                               config.train.cond_drop_prob)
        extra = {"step": state.step} if getattr(objective, "needs_step", False) else {}
        if getattr(objective, "adversarial", False):  # the DiT's discriminator (model.disc_width)
            extra["disc_fn"] = lambda x, c, frozen=False: setup.model(params).discriminate(
                x, c, frozen=frozen)
        loss, _ = objective.loss(bind(setup, params), setup.model_input(micro, ae_params), cond,
                                 loss_rng, target_fn=target_fn,
                                 null_cond=model.null_cond(cond) or None, **extra)
        return loss

    grad_fn = jax.value_and_grad(loss_fn)
    if accum == 1:
        loss, grads = grad_fn(state.params, batch, rng)
    else:  # one optimizer update from `accum` sequential micro-batches (bounded activations)
        def body(carry, xs):
            micro, i = xs
            loss, grads = grad_fn(state.params, micro, jax.random.fold_in(rng, i))
            return jax.tree.map(jnp.add, carry, (loss, grads)), None

        zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
        (loss, grads), _ = jax.lax.scan(body, zeros, (_split_micro(batch, accum), jnp.arange(accum)))
        loss, grads = jax.tree.map(lambda x: x / accum, (loss, grads))

    grad_norm = optax.global_norm(grads)
    updates, opt_state = setup.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new = TrainState(step=state.step + 1, params=params,
                     ema_params=ema_update(state.ema_params, params, config.ema_decay, state.step),
                     opt_state=opt_state, rng=state.rng)
    # A non-finite loss or gradient never reaches the weights: the update is dropped (the host
    # then skips on, or stops, as config.train.nonfinite says).
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, state)
    new = new.replace(step=state.step + 1)
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": setup.lr_schedule(state.step),
               "finite": finite}
    return new, metrics


def jit_train_step(setup: Setup, objective: Any):
    """train_step jitted with the state's shardings in and out, and the old state donated
    (not the frozen params: called as step(state, batch), step(state, batch, teacher) or
    step(state, batch, teacher_or_None, autoencoder_params))."""
    return jax.jit(functools.partial(train_step, setup, objective),
                   out_shardings=(setup.shardings, sharding.replicated(setup.mesh)),
                   donate_argnums=0)


def abstract_batch(config: Any, mesh) -> dict:
    """Shapes, dtypes and shardings of one global training batch (for AOT lowering)."""
    d = config.data
    shapes = {"video": ((d.batch_size, d.num_frames, d.height, d.width, d.channels), jnp.float32),
              "label": ((d.batch_size,), jnp.int32),
              "text": ((d.batch_size, config.model.text_len), jnp.int32)}
    return {k: jax.ShapeDtypeStruct(shape, dtype,
                                    sharding=sharding.batch_sharding(mesh, len(shape)))
            for k, (shape, dtype) in shapes.items()}


def eval_step(setup: Setup, objective: Any, params: Any, batch: dict, rng: jax.Array,
              ae_params: Any = None) -> dict:
    """Validation metrics of one batch, a dict of arrays the caller averages over batches.

    Diffusion objectives: {'loss_t': [num_times]}, the loss at `config.train.eval_times` evenly
    spaced t with fixed noise. Fixed t and noise remove the sampling variance of t from the
    comparison, which is why this metric tracks sample quality across a sweep (SD3, Open-Sora).
    Objectives with `eval_metrics` (the VAE's: loss, psnr, ssim) give their own.
    """
    config = setup.config
    cond = condition(batch, config.model.cond)
    x0 = setup.model_input(batch, ae_params)
    if hasattr(objective, "eval_metrics"):
        return objective.eval_metrics(bind(setup, params), x0)
    times = objective.eval_times(int(config.train.eval_times))

    def at(args):
        i, t = args
        noise = jax.random.normal(jax.random.fold_in(rng, i), x0.shape, x0.dtype)
        model = setup.model(params)
        loss, _ = objective.loss_at(model, x0, cond, jnp.full((x0.shape[0],), t), noise)
        return loss

    times = jnp.asarray(times, jnp.float32)
    return {"loss_t": jax.lax.map(at, (jnp.arange(times.shape[0]), times))}


def sample(setup: Setup, objective: Any, params: Any, noise: jax.Array, cond: dict,
           ae_params: Any = None, *, steps: int, guidance: float):
    """Videos from noise (a VAE: reconstructions of the clips passed as `noise`, beside them).
    A latent DiT's latents are decoded to pixels with the autoencoder's decoder."""
    null = setup.model(params).null_cond(cond) if cond else None
    # merged inside the sampler's loop body: nnx modules are per-trace
    out = objective.sample(bind(setup, params), noise, cond, steps=steps, null_cond=null,
                           guidance=guidance if cond else 1.0)
    if setup.autoencoder is not None:
        out = setup.autoencoder.decode(ae_params, out)
    return out
