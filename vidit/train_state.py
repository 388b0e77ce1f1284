"""The one object that holds a run's state, its optimizer, and how both are laid out on the mesh.

Parameters are plain nested dicts of arrays (`nnx.to_pure_dict`); the model's static structure
(graphdef) stays outside the state, so the state is an ordinary pytree that jit, optax and Orbax
all take as is.
"""
from __future__ import annotations

from typing import Any

import flax
from flax import traverse_util
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from vidit import sharding
from vidit.errors import ConfigError
from vidit.models import dit, layers, lora, mup


def build_model(model_cfg: Any, seed: int) -> nnx.Module:
    """The module config.model.kind names: 'dit' (the default), 'wan' (Wan 2.1's DiT) or 'vae'
    (VAE + discriminator)."""
    kind = model_cfg.get("kind", "dit")
    if kind == "vae":
        from vidit.models import vae
        return vae.VAEModel(model_cfg, nnx.Rngs(params=seed))
    if kind == "wan":
        from vidit.models import wan
        model = wan.build(model_cfg, seed)
        if lora.enabled(model_cfg):  # adapters drawn from their own stream: same base weights
            lora.attach(model, model_cfg, nnx.Rngs(params=seed + 1))
        return model
    if kind != "dit":
        raise ConfigError(f"config.model.kind='{kind}' is not one of ['dit', 'vae', 'wan']")
    return dit.build(model_cfg, seed)


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    rng: jax.Array  # raw uint32 key data: portable through checkpoints


def learning_rate_schedule(optim: Any, total_steps: int) -> optax.Schedule:
    """Linear warmup, then cosine decay to end_lr_fraction * lr, or constant."""
    warmup = max(int(optim.warmup_steps), 0)
    if optim.schedule == "constant":
        after = optax.constant_schedule(optim.lr)
    elif optim.schedule == "cosine":
        after = optax.cosine_decay_schedule(
            optim.lr, max(total_steps - warmup, 1), alpha=optim.end_lr_fraction)
    else:
        raise ConfigError(
            f"config.optim.schedule='{optim.schedule}' is not one of ['constant', 'cosine']")
    if not warmup:
        return after
    return optax.join_schedules(
        [optax.linear_schedule(optim.lr / warmup, optim.lr, warmup), after], [warmup])


def decay_mask(params: Any) -> Any:
    """Weight decay on weight matrices ('kernel') only: not on norms, biases or embedding tables."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) == "kernel", params)


OPTIMIZERS = ("adamw", "muon")
# Muon's updates are scaled to an RMS of 0.2, about AdamW's (Liu et al. 2025, "Muon is Scalable
# for LLM Training"), so a learning rate tuned for AdamW carries over.
MUON_RMS = 0.2


def muon_axes(model: nnx.Module, names: Any, exclude: Any = ()) -> Any:
    """Muon's matrix view of each parameter (a pure dict like the params): for every Dense
    kernel inside the transformer blocks, its input axes (reduction) and output axes; None
    (AdamW) for the rest - embeddings, the patch, time and output projections, norms, biases.
    Axes named None (qkv's 3, adaLN's 6 stacked projections) and a scan's 'layers' axis are
    batch axes: each projection is orthogonalised on its own. Dense modules whose attribute name
    is in `exclude` stay on AdamW."""
    axes = jax.tree.map(lambda _: None, names, is_leaf=lambda x: isinstance(x, tuple))
    block_dense = [(path, node) for path, node in nnx.iter_graph(model)
                   if isinstance(node, layers.Dense) and path[:1] == ("blocks",)]
    names_in_blocks = {path[-1] for path, _ in block_dense}
    if unknown := sorted(set(exclude) - names_in_blocks):
        raise ConfigError(f"config.optim.muon_exclude names {unknown}, not Dense modules of the "
                          f"blocks: {sorted(names_in_blocks)}")
    for path, node in block_dense:
        if path[-1] in exclude:
            continue
        parent, n = axes, names
        for k in path:
            parent, n = parent[k], n[k]
        n = n["kernel"]
        start = 1 if n[0] == "layers" else 0
        reduction = tuple(range(start, start + node.num_in))
        output = tuple(i for i in range(start + node.num_in, len(n)) if n[i] is not None)
        parent["kernel"] = optax.contrib.MuonDimensionNumbers(reduction, output)
    return axes


def make_optimizer(optim: Any, schedule: optax.Schedule, params: Any,
                   lr_multipliers: Any = None, trainable: Any = None,
                   matrix_axes: Any = None) -> optax.GradientTransformation:
    """Clipped AdamW, or with optim.name = 'muon' clipped Muon on the matrices `matrix_axes`
    names (muon_axes) and AdamW with Nesterov momentum (optax's Muon) on the rest. With
    per-parameter learning-rate factors (muP, vidit/models/mup.py), each parameter's update is
    scaled by its factor; with a `trainable` mask (LoRA), only the True parameters are clipped,
    updated and given optimizer state."""
    name = optim.get("name", "adamw")
    if name not in OPTIMIZERS:
        raise ConfigError(f"config.optim.name='{name}' is not one of {list(OPTIMIZERS)}")
    clip = optax.clip_by_global_norm(optim.clip_norm) if optim.clip_norm else optax.identity()
    if name == "muon":
        ns_steps = int(optim.get("muon_ns_steps", 5))
        if ns_steps < 1:
            raise ConfigError(f"config.optim.muon_ns_steps={ns_steps} must be >= 1")
        if matrix_axes is None or lr_multipliers is not None or trainable is not None:
            raise ConfigError("config.optim.name='muon' trains a DiT or Wan model's matrices; "
                              "it does not combine with muP or LoRA")
        return optax.chain(clip, optax.contrib.muon(
            schedule, beta=optim.get("muon_beta", 0.95), weight_decay=optim.weight_decay,
            weight_decay_mask=decay_mask(params), adam_b1=optim.b1, adam_b2=optim.b2,
            eps=optim.eps, adam_weight_decay=0.0, muon_weight_dimension_numbers=matrix_axes,
            consistent_rms=MUON_RMS, ns_steps=ns_steps))
    tx = [clip, optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                            weight_decay=optim.weight_decay, mask=decay_mask(params))]
    if lr_multipliers is not None:
        labels = jax.tree.map(repr, lr_multipliers)
        factors = {repr(f): f for f in jax.tree.leaves(lr_multipliers)}
        tx.append(optax.multi_transform({k: optax.scale(f) for k, f in factors.items()}, labels))
    if trainable is not None:  # LoRA: only the adapters have optimizer state and move
        labels = jax.tree.map(lambda t: "train" if t else "frozen", trainable)
        return optax.multi_transform({"train": optax.chain(*tx),
                                      "frozen": optax.set_to_zero()}, labels)
    return optax.chain(*tx)


def _optimizer_shardings(abstract_opt: Any, params: Any, param_shardings: Any, repl) -> Any:
    """Each optimizer-state leaf sharded like the parameter it mirrors (Adam's moments: the
    leaf whose dict path ends in a parameter's path, with its shape), everything else (step
    counts) replicated. Masked states (LoRA's frozen weights) hold no leaves."""
    by_path = {}
    for (path, p), (_, sh) in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                  jax.tree_util.tree_flatten_with_path(param_shardings)[0]):
        by_path[tuple(k.key for k in path)] = (p.shape, sh)

    def shard(path, leaf):
        keys = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
        for start in range(len(keys)):
            hit = by_path.get(keys[start:])
            if hit is not None and hit[0] == leaf.shape:
                return hit[1]
        return repl

    return jax.tree_util.tree_map_with_path(shard, abstract_opt)


def ema_decay_at(step: jax.Array, decay: float, power: float = 0.0) -> jax.Array:
    """The EMA's decay at `step` (0-based), at most `decay`.

    power 0: the warmup (1 + step) / (10 + step), which keeps the average over roughly the last
    tenth of training. power > 0: the power-function EMA of Karras et al. 2024 (EDM2),
    (1 - 1 / (step + 1))^(power + 1), whose average weights step s by s^power at any run length;
    its width relative to the run is sqrt((p + 1) / ((p + 2)^2 (p + 3))): 0.09 at p = 8 (about
    the warmup's), 0.05 at p = 16.
    """
    s = jnp.asarray(step, jnp.float32)
    if power > 0:
        d = (1.0 - 1.0 / (s + 1.0)) ** (power + 1.0)
    else:
        d = (1.0 + s) / (10.0 + s)
    return jnp.minimum(decay, d).astype(jnp.float32)


def ema_update(ema: Any, params: Any, decay: float, step: jax.Array, power: float = 0.0) -> Any:
    """One step of the parameters' EMA at the decay ema_decay_at(step, decay, power)."""
    d = ema_decay_at(step, decay, power)
    return jax.tree.map(lambda e, p: (d * e + (1 - d) * p.astype(e.dtype)).astype(e.dtype),
                        ema, params)


class Setup:
    """Everything static about a run's state: model structure, optimizer, shardings, and the
    frozen networks its inputs come through (a latent DiT's autoencoder, a caption encoder).

    Building it allocates nothing (abstract evaluation); `init()` then creates the state directly
    in its sharded layout, so a model larger than one device never exists unsharded.
    """

    def __init__(self, config: Any, mesh: Mesh, *, autoencoder: Any = None,
                 text_encoder: Any = None):
        self.config = config
        self.mesh = mesh
        # A latent DiT's frozen VAE (vidit/autoencoder.py) and a frozen caption encoder
        # (vidit/text_encoders.py): their structure; their parameters are frozen inputs of the
        # jitted functions (vidit/steps.py).
        self.autoencoder = autoencoder
        self.text_encoder = text_encoder
        rules = config.sharding_rules
        abstract_model = nnx.eval_shape(lambda: build_model(config.model, config.seed))
        self.graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
        self.param_names = sharding.logical_names(abstract_params)
        abstract_params = nnx.to_pure_dict(abstract_params)
        self.lr_schedule = learning_rate_schedule(config.optim, config.train.steps)
        multipliers = (mup.lr_multipliers(config.model, lambda m: build_model(m, config.seed),
                                          abstract_model)
                       if config.model.get("kind", "dit") == "dit" else None)
        self.tx = make_optimizer(config.optim, self.lr_schedule, abstract_params, multipliers,
                                 lora.trainable(abstract_params) if lora.enabled(config.model)
                                 else None,
                                 muon_axes(abstract_model, self.param_names,
                                           tuple(config.optim.get("muon_exclude", ())))
                                 if config.optim.get("name", "adamw") == "muon" else None)
        param_shardings = sharding.tree_shardings(abstract_params, self.param_names, mesh, rules)
        abstract_opt = jax.eval_shape(self.tx.init, abstract_params)
        repl = sharding.replicated(mesh)
        opt_shardings = _optimizer_shardings(abstract_opt, abstract_params, param_shardings,
                                             repl)
        self.shardings = TrainState(step=repl, params=param_shardings,
                                    ema_params=param_shardings, opt_state=opt_shardings, rng=repl)
        self.abstract = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            jax.eval_shape(self._init_fn), self.shardings)

    def model(self, params: Any) -> nnx.Module:
        return nnx.merge(self.graphdef, params)

    def model_input(self, batch: dict, ae_params: Any = None) -> jax.Array:
        """What the model trains on: the batch's pixel clips; with an autoencoder, their
        normalised latents, encoded here (online: batch['video'] and ae_params) or read from a
        latent dataset (cached: batch['latent'], raw posterior means)."""
        if "latent" in batch:
            if self.autoencoder is None:
                raise ConfigError(
                    "the dataset holds latents (written by data_pipelines/encode_latents.py): set "
                    "config.data.autoencoder to the VAE run that encoded it")
            return self.autoencoder.normalize(batch["latent"])
        if self.autoencoder is not None:
            if ae_params is None:
                raise ValueError("online latent training needs the autoencoder's params")
            return self.autoencoder.encode(ae_params, batch["video"])
        return batch["video"]

    def _init_fn(self) -> TrainState:
        model = build_model(self.config.model, self.config.seed)
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            ema_params=jax.tree.map(jnp.copy, params),
            opt_state=self.tx.init(params),
            rng=jax.random.key_data(jax.random.key(self.config.seed)),
        )

    def init(self) -> TrainState:
        with jax.set_mesh(self.mesh):
            return jax.jit(self._init_fn, out_shardings=self.shardings)()

    def with_params(self, state: TrainState, params: Any) -> TrainState:
        """`state` with `params` (a pure dict of host arrays: pretrained weights) as its
        parameters and EMA, placed in their shardings; parameters the weights lack (LoRA
        adapters) keep their initial values."""
        given = traverse_util.flatten_dict(params)
        flat = traverse_util.flatten_dict(state.params)
        shard = traverse_util.flatten_dict(self.abstract.params)
        for key, value in given.items():
            if key not in flat:
                raise ConfigError(f"pretrained parameter {'/'.join(map(str, key))} is not one "
                                  f"of this model's")
            flat[key] = jax.device_put(jnp.asarray(value, shard[key].dtype), shard[key].sharding)
        params = traverse_util.unflatten_dict(flat)
        return state.replace(params=params, ema_params=jax.tree.map(jnp.copy, params))

    def num_params(self) -> int:
        return sum(x.size for x in jax.tree.leaves(self.abstract.params))
