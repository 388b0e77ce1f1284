"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") for vidit's
Dense layers: W x + (alpha / r) B(A x), with A [in, r] random and B [r, out] zero, so a model
with fresh adapters computes exactly what it did without them.

config.model.lora = dict(rank=16, alpha=16.0, targets=("self_attn/q", ...)): `targets` are
path fragments of the Dense layers to adapt ('self_attn/q' matches every block's self-attention
query projection; 'mlp' every MLP layer). rank 0 = no adapters. With adapters the optimizer
updates only them (vidit/train_state.py): the base weights stay as loaded, and their gradients
are never formed. `merged` folds them into the weights (export).
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax import traverse_util

from vidit.errors import ConfigError
from vidit.models.layers import Dense

ADAPTERS = ("lora_a", "lora_b")


def enabled(model_cfg: Any) -> bool:
    return int(model_cfg.get("lora", {}).get("rank", 0)) > 0


def attach(model: nnx.Module, model_cfg: Any, rngs: nnx.Rngs) -> nnx.Module:
    """Adds adapters (lora_a, lora_b) to every Dense whose path matches a target."""
    spec = model_cfg.lora
    rank, targets = int(spec.rank), tuple(spec.targets)
    hits = set()
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, Dense):
            continue
        name = "/".join(str(p) for p in path)
        matched = [t for t in targets if _matches(name, t)]
        if not matched:
            continue
        hits.update(matched)
        names = node.kernel.get_metadata().get("out_sharding") or (None,) * node.kernel.ndim
        lead = node.kernel.ndim - node.num_in - node.num_out  # a scanned model's 'layers' axis
        shape = node.kernel.shape
        in_shape, out_shape = shape[lead:lead + node.num_in], shape[lead + node.num_in:]
        fan_in = math.prod(in_shape)
        a = jax.random.normal(rngs.params(), shape[:lead] + in_shape + (rank,),
                              node.kernel.dtype) / math.sqrt(fan_in)
        node.lora_a = nnx.Param(a, out_sharding=tuple(names[:lead + node.num_in]) + (None,))
        node.lora_b = nnx.Param(jnp.zeros(shape[:lead] + (rank,) + out_shape, node.kernel.dtype),
                                out_sharding=tuple(names[:lead]) + (None,)
                                + tuple(names[lead + node.num_in:]))
        node.lora_scale = float(spec.alpha) / rank
    missing = [t for t in targets if t not in hits]
    if missing:
        raise ConfigError(f"config.model.lora.targets {missing} match no Dense layer of this "
                          f"model (paths look like 'blocks/0/self_attn/q')")
    return model


def _matches(name: str, target: str) -> bool:
    """'self_attn/q' matches 'blocks/3/self_attn/q' but not 'blocks/3/self_attn/q_norm'."""
    parts, want = name.split("/"), target.strip("/").split("/")
    return any(parts[i:i + len(want)] == want for i in range(len(parts) - len(want) + 1))


def trainable(params: Any) -> Any:
    """True at the adapters, False at every other parameter (the optimizer's mask)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) in ADAPTERS, params)


def merged(params: Any, model_cfg: Any) -> Any:
    """The params with each adapter folded into its kernel (W + scale A B) and removed."""
    scale = float(model_cfg.lora.alpha) / int(model_cfg.lora.rank)
    flat = traverse_util.flatten_dict(params)
    out = {k: v for k, v in flat.items() if k[-1] not in ADAPTERS}
    for key in flat:
        if key[-1] != "lora_a":
            continue
        a, b = flat[key], flat[key[:-1] + ("lora_b",)]
        kernel = out[key[:-1] + ("kernel",)]
        r = a.shape[-1]
        # [..., in..., r] x [..., r, out...] -> [..., in..., out...], per stacked layer
        lead = b.ndim - (kernel.ndim - a.ndim + 1) - 1
        a2 = a.reshape(a.shape[:lead] + (-1, r))
        b2 = b.reshape(b.shape[:lead] + (r, -1))
        delta = (jnp.asarray(a2) @ jnp.asarray(b2)).reshape(kernel.shape)
        out[key[:-1] + ("kernel",)] = (jnp.asarray(kernel) + scale * delta).astype(kernel.dtype)
    return traverse_util.unflatten_dict(out)
