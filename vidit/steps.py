"""The jitted functions of a run: train step, validation metrics, sampling.

They are pure: (state, batch) in, (state, metrics) out. `vidit/train.py` compiles them once with
explicit shardings; `vidit/compile.py` lowers the very same train step for a TPU slice.

`frozen` is a dict of parameters of networks the run uses but never trains, passed as an
argument (so jit does not bake them in, the optimizer never sees them and checkpoints do not
hold them): 'teacher' when the objective's targets come from a teacher
(`objective.needs.target == 'teacher'`), 'autoencoder' for a latent DiT's VAE
(vidit/autoencoder.py), 'text_encoder' for a frozen caption encoder run in the step and
'null_text' for its empty caption (vidit/text_encoders.py).
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from vidit import autoencoder as autoencoder_lib, flops, sharding
from vidit.models import lora
from vidit.train_state import Setup, TrainState, ema_update


def condition(setup: Setup, batch: dict, frozen: dict) -> dict:
    """The part of a batch the model is conditioned on: labels, the byte encoder's tokens, or a
    frozen text encoder's output (cached in the batch, or computed here from its tokens)."""
    kind = setup.config.model.cond
    if kind == "class":
        return {"label": batch["label"]}
    if kind != "text":
        return {}
    if "text_embedding" in batch:
        return {"text_embedding": batch["text_embedding"], "text_mask": batch["text_mask"]}
    if setup.text_encoder is None:
        return {"text": batch["text"]}
    return {"text_embedding": setup.text_encoder.encode(frozen["text_encoder"], batch["text"],
                                                        batch["text_mask"]),
            "text_mask": batch["text_mask"]}


def null_condition(model, cond: dict, frozen: dict) -> dict:
    """The unconditional input for classifier-free guidance, shaped like `cond` (a leading
    dimension of 1 broadcasts): the model's own null label or tokens, or a frozen text
    encoder's embedding of the empty caption (frozen['null_text'])."""
    null = model.null_cond(cond)
    if "text_embedding" in cond:
        null.update(frozen["null_text"])
    return null


def drop_condition(cond: dict, null: dict, rng, prob: float) -> dict:
    """Replaces each example's condition by the null one with probability `prob` (CFG)."""
    if prob <= 0 or not cond:
        return cond
    batch = jax.tree.leaves(cond)[0].shape[0]
    drop = jax.random.bernoulli(rng, prob, (batch,))
    return jax.tree.map(
        lambda a, b: jnp.where(drop.reshape((-1,) + (1,) * (a.ndim - 1)), b, a), cond, null)


def at_size(setup: Setup, objective: Any, shape) -> Any:
    """The objective for model inputs of `shape` [B, T, H, W, C] (a bucket's, a sample's):
    objectives whose time shift follows the token count (flow's shift_with_tokens) get the
    shift for these tokens; the shift as configured holds at config.data's clip size."""
    if not hasattr(objective, "at_tokens"):
        return objective
    model = setup.config.model
    reference = autoencoder_lib.input_shape(setup.config, setup.autoencoder)
    return objective.at_tokens(flops.tokens(model, *shape[1:4]),
                               flops.tokens(model, *reference[:3]))


def _split_micro(batch: dict, n: int) -> dict:
    """[B, ...] -> [n, B/n, ...] for gradient accumulation."""
    return jax.tree.map(lambda x: x.reshape((n, x.shape[0] // n) + x.shape[1:]), batch)


def bind(setup: Setup, params: Any):
    """model_fn(x, t, cond, h=None) for these params, merged per call: objectives may call it
    inside jax.jvp, and nnx modules belong to one trace."""
    def model_fn(*args, **kw):
        return setup.model(params)(*args, **kw)
    return model_fn


def target_params(objective: Any, state: TrainState, frozen: dict) -> Any:
    """The frozen parameters an objective's targets come from (objective.needs.target): None,
    the run's EMA parameters, or the teacher's."""
    target = objective.needs.target
    if target is None:
        return None
    if target == "ema":
        return state.ema_params
    if "teacher" not in frozen:
        raise ValueError(f"objective {objective.name!r} needs teacher parameters: pass "
                         "frozen={'teacher': ...} (vidit.train loads "
                         "config.objective.teacher_workdir)")
    return frozen["teacher"]


def train_step(setup: Setup, objective: Any, state: TrainState, batch: dict,
               frozen: dict | None = None):
    """One optimizer update: the objective's loss (given what `objective.needs` declares),
    gradients (accumulated over micro-batches), AdamW, EMA."""
    config, needs, frozen = setup.config, objective.needs, frozen or {}
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    accum = int(config.optim.grad_accum)
    targets = target_params(objective, state, frozen)  # never differentiated

    def loss_fn(params, micro, rng):
        drop_rng, loss_rng = jax.random.split(rng)
        model = setup.model(params)
        x0 = setup.model_input(micro, frozen.get("autoencoder"))
        cond = condition(setup, micro, frozen)
        if config.model.get("first_frame", False):  # image-to-video: some examples get frame 0
            given = jax.random.bernoulli(jax.random.fold_in(rng, 7),
                                         config.train.first_frame_prob, (x0.shape[0],))
            cond.update(first_frame=x0, first_frame_mask=given)
        cond = drop_condition(cond, null_condition(model, cond, frozen), drop_rng,
                              config.train.cond_drop_prob)
        extra = {}
        if targets is not None:
            extra["target_fn"] = bind(setup, targets)
        if needs.step:
            extra["step"] = state.step
        if needs.discriminator:  # the DiT's discriminator (model.disc_width)
            extra["disc_fn"] = lambda x, c, frozen=False: setup.model(params).discriminate(
                x, c, frozen=frozen)
        loss, _ = at_size(setup, objective, x0.shape).loss(
            bind(setup, params), x0, cond, loss_rng,
            null_cond=null_condition(model, cond, frozen) or None, **extra)
        return loss

    grad_fn = jax.value_and_grad(loss_fn)
    if lora.enabled(config.model):  # only the adapters are differentiated (see _adapter_grads)
        grad_fn = _adapter_grads(loss_fn, state.params)
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
                     ema_params=ema_update(state.ema_params, params, config.ema_decay, state.step,
                                            config.get("ema_power", 0.0)),
                     opt_state=opt_state, rng=state.rng)
    # A non-finite loss, gradient or updated weight never reaches the state: the update is
    # dropped (the host then skips on, or stops, as config.train.nonfinite says).
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jax.tree.reduce(
        jnp.logical_and, jax.tree.map(lambda p: jnp.all(jnp.isfinite(p)), params))
    new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, state)
    new = new.replace(step=state.step + 1)
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": setup.lr_schedule(state.step),
               "finite": finite,
               # rows the pipeline had to replace because their record was unreadable
               "bad_examples": jnp.sum(batch["bad"]) if "bad" in batch else jnp.int32(0)}
    return new, metrics


def _adapter_grads(loss_fn, params):
    """value_and_grad of loss_fn(params, ...) with respect to the LoRA adapters alone: the base
    weights enter as constants, so the backward pass forms no weight gradient for them (a
    third of the backward matmuls, and no gradient buffers the size of the model). The other
    gradients come back as zeros, which the optimizer's mask ignores."""
    treedef = jax.tree.structure(params)
    flags = jax.tree.leaves(lora.trainable(params))

    def full(adapters, base):
        it = iter(adapters)
        return treedef.unflatten([next(it) if f else p for f, p in zip(flags, base)])

    def value_and_grad(params, *args):
        base = jax.tree.leaves(params)
        adapters = [p for f, p in zip(flags, base) if f]
        loss, g = jax.value_and_grad(lambda a: loss_fn(full(a, base), *args))(adapters)
        return loss, full(g, [jnp.zeros_like(p) for p in base])

    return value_and_grad


def jit_train_step(setup: Setup, objective: Any):
    """train_step jitted with the state's shardings in and out and the old state donated (not
    the frozen params): called as step(state, batch, frozen)."""
    return jax.jit(functools.partial(train_step, setup, objective),
                   out_shardings=(setup.shardings, sharding.replicated(setup.mesh)),
                   donate_argnums=0)


def eval_step(setup: Setup, objective: Any, params: Any, batch: dict, rng: jax.Array,
              frozen: dict | None = None) -> dict:
    """Validation metrics of one batch (the objective's `eval_metrics`), a dict of scalars the
    caller averages over batches. Diffusion objectives: the loss at `config.train.eval_times`
    evenly spaced t with fixed noise, which tracks sample quality across a sweep (SD3,
    Open-Sora); the VAE's: L1, PSNR, SSIM."""
    config, frozen = setup.config, frozen or {}
    x0 = setup.model_input(batch, frozen.get("autoencoder"))
    return at_size(setup, objective, x0.shape).eval_metrics(bind(setup, params), x0, condition(setup, batch, frozen),
                                  rng, int(config.train.eval_times))


def sample(setup: Setup, objective: Any, params: Any, noise: jax.Array, cond: dict,
           frozen: dict | None = None, *, steps: int, guidance: float):
    """Videos from noise (a VAE: reconstructions of the clips passed as `noise`, beside them).
    `cond` holds a batch's conditioning fields (labels, or caption tokens and mask, or cached
    embeddings; with model.first_frame, 'first_frame': pixel frames [B, F, H, W, C] whose frame
    0 starts every sample); a frozen text encoder runs here, compiled with the sampler. A latent DiT's
    latents are decoded to pixels with the autoencoder's decoder."""
    frozen = frozen or {}
    image = cond.get("first_frame")  # image-to-video: pixel frames [B, F, H, W, C], frame 0 used
    cond = condition(setup, cond, frozen)
    guided = bool(cond)
    if image is not None:
        # The given frame in the model's input space: pixels, or a latent DiT's normalised
        # latent of it as a 1-frame clip (the causal VAE's first-frame path).
        first = setup.model_input({"video": image[:, :1]}, frozen.get("autoencoder"))
        cond.update(first_frame=jnp.zeros(noise.shape, noise.dtype).at[:, :1].set(first),
                    first_frame_mask=jnp.ones((noise.shape[0],), bool))
    null = null_condition(setup.model(params), cond, frozen) if guided else None
    # merged inside the sampler's loop body: nnx modules are per-trace
    out = at_size(setup, objective, noise.shape).sample(
        bind(setup, params), noise, cond, steps=steps, null_cond=null,
        guidance=guidance if guided else 1.0)
    if image is not None:  # the given frame is the first frame, exactly
        out = out.at[:, :1].set(first.astype(out.dtype))
    if setup.autoencoder is not None:
        out = setup.autoencoder.decode(frozen["autoencoder"], out)
    return out
