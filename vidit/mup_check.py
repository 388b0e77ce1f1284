"""muP's coordinate check: do the DiT's activation updates stay flat as width grows?

Run it after changing the architecture (a new layer, a new init): `tests/test_mup.py` runs it
on the shipped DiT, `benchmarks/mup_coord_check.py` plots it (docs/mup).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from vidit import config_lib
from vidit.models import dit, layers, mup
from vidit.train_state import make_optimizer


def coordinate_check(cfg: Any, widths, *, steps: int = 4, lr: float = 1e-2, batch: int = 4,
                     clip: tuple[int, int, int] = (4, 16, 16), seed: int = 0) -> dict:
    """muP's coordinate check (Yang et al. 2022, section 7): train a DiT of each width for a
    few Adam steps on one fixed random regression batch and measure, per layer, the RMS per
    coordinate of the activation's change from init. Under muP these stay flat as width grows;
    under standard parametrisation they grow with width (about linearly, for Adam).

    cfg: a model config (its width and heads are replaced: heads keep the head dim of cfg).
    Returns {width: {layer: rms of the change}} with layers 'cond', 'embed', 'block<i>', 'out'.
    """
    head_dim = cfg.width // cfg.heads
    key_x, key_y, key_t = jax.random.split(jax.random.key(seed), 3)
    shape = (batch, *clip, cfg.channels)
    x, target = jax.random.normal(key_x, shape), jax.random.normal(key_y, shape)
    t = jax.random.uniform(key_t, (batch,))
    cond = {"label": jnp.arange(batch) % cfg.num_classes} if cfg.cond == "class" else {}
    optim = config_lib.base_config().optim  # AdamW at its defaults, no clipping or decay
    optim.update(clip_norm=0.0, weight_decay=0.0)

    def activations(model):
        tokens, grid = layers.patchify(x, model.patch)
        c, _, _ = model._condition(t, cond)
        h = model.patch_embed(tokens)
        rope = layers.rope_angles(grid, head_dim, cfg.rope_theta)
        out = {"cond": c, "embed": h}
        for i, block in enumerate(model.blocks):
            h = block(h, c, rope)
            out[f"block{i}"] = h
        out["out"] = model.final(h, c)
        return out

    result = {}
    for width in widths:
        c = cfg.copy_and_resolve_references()
        with c.unlocked():
            c.width, c.heads, c.scan_layers = width, width // head_dim, False
        model = dit.build(c, seed)
        graphdef, params = nnx.split(model, nnx.Param)
        params = nnx.to_pure_dict(params)
        tx = make_optimizer(optim, optax.constant_schedule(lr), params,
                            mup.lr_multipliers(c, lambda m: dit.build(m, seed)))

        def run(params, graphdef=graphdef):
            def loss(p):
                model = nnx.merge(graphdef, p)
                return jnp.mean((model(x, t, cond) - target) ** 2)

            before = activations(nnx.merge(graphdef, params))
            state = tx.init(params)
            for _ in range(steps):
                updates, state = tx.update(jax.grad(loss)(params), state, params)
                params = optax.apply_updates(params, updates)
            after = activations(nnx.merge(graphdef, params))
            return {k: jnp.sqrt(jnp.mean((after[k] - before[k]) ** 2)) for k in before}

        result[width] = {k: float(v) for k, v in jax.jit(run)(params).items()}
    return result
