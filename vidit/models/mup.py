"""Maximal-update parametrisation (muP) for the DiT: what changes with width, and by how much.

With config.model.parametrization = 'mup', a model of width w behaves like its base model of
width config.model.mup_base_width (heads mup_base_heads) would if it were w wide: activations
and their updates keep their size per coordinate as w grows, so a learning rate tuned on the
narrow base model transfers to the wide one (Yang et al. 2022, "Tensor Programs V", Table 3 for
Adam). At the base width every multiplier is 1: muP and standard parametrisation coincide there.

What differs from the standard parametrisation, weight by weight, is decided by comparing each
weight's shape with the base model's (as the `mup` package's base shapes do):

- hidden and output matrices, whose fan-in grows with width (attention and MLP projections, the
  adaLN modulation, the time MLP's second layer, the final projection): Adam learning rate times
  base_fan_in / fan_in. Their init is already 1/fan_in variance (fan-in scaling), except the
  time MLP's fixed-std layer, whose std shrinks by sqrt(base_width / width).
- the output layer is zero-initialised (adaLN-Zero's final projection), the limit of muP's
  1/fan_in^2 init variance, so only its learning rate changes.
- input weights (patch embedding, the time MLP's first layer, class and text projections,
  cross-attention keys/values from a fixed text width), biases and norm scales: unchanged.
- attention logits: q.k / d instead of q.k / sqrt(d) as the head dim d grows, written as the
  standard 1/sqrt(d) times sqrt(d_base / d) so the base model is unchanged.

Weight decay (optax's decoupled AdamW, multiplied by the learning rate) follows each weight's
scaled learning rate.
"""
from __future__ import annotations

import math
from typing import Any

import jax
from flax import nnx

from vidit.errors import ConfigError
from vidit.models.layers import Dense

PARAMETRIZATIONS = ("standard", "mup")


def enabled(cfg: Any) -> bool:
    kind = cfg.get("parametrization", "standard")
    if kind not in PARAMETRIZATIONS:
        raise ConfigError(
            f"config.model.parametrization='{kind}' is not one of {list(PARAMETRIZATIONS)}")
    return kind == "mup"


def base_shape(cfg: Any) -> tuple[int, int]:
    """(width, heads) of the base model muP is anchored to."""
    width = int(cfg.get("mup_base_width", 0) or cfg.width)
    heads = int(cfg.get("mup_base_heads", 0) or cfg.heads)
    if width % heads:
        raise ConfigError(f"config.model.mup_base_width={width} does not divide by "
                          f"config.model.mup_base_heads={heads}")
    return width, heads


def attention_multiplier(cfg: Any) -> float:
    """Extra factor on the attention logits: sqrt(d_base / d) under muP, else 1."""
    if not enabled(cfg):
        return 1.0
    width, heads = base_shape(cfg)
    return math.sqrt((width // heads) / (cfg.width // cfg.heads))


def fixed_init_scale(cfg: Any) -> float:
    """Factor on a fixed-std init of a hidden (width -> width) matrix: sqrt(base / width)."""
    return math.sqrt(base_shape(cfg)[0] / cfg.width) if enabled(cfg) else 1.0


def lr_multipliers(cfg: Any, build, model: nnx.Module | None = None) -> Any | None:
    """Per-parameter Adam learning-rate factors (a pure dict shaped like the parameters), or
    None under standard parametrisation. build(model_cfg) makes a model (abstractly here);
    `model`, when given, is the (abstract) model of `cfg` already built."""
    if not enabled(cfg):
        return None
    base_cfg = cfg.copy_and_resolve_references()
    with base_cfg.unlocked():
        base_cfg.width, base_cfg.heads = base_shape(cfg)
    model = model if model is not None else nnx.eval_shape(lambda: build(cfg))
    base = nnx.eval_shape(lambda: build(base_cfg))
    fan_in = _fan_ins(model)
    base_fan_in = _fan_ins(base)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))

    def factor(path, _):
        key = tuple(getattr(p, "key", p) for p in path)
        if key not in fan_in:  # biases, norm scales, embedding tables
            return 1.0
        return base_fan_in[key] / fan_in[key]

    return jax.tree_util.tree_map_with_path(factor, params)


def _fan_ins(model: nnx.Module) -> dict:
    """{path of a Dense kernel in the pure dict: its fan-in}, layer-stacked kernels included."""
    out = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, Dense):
            shape = node.kernel.shape
            lead = len(shape) - node.num_in - node.num_out  # a scanned model's 'layers' axis
            out[tuple(path) + ("kernel",)] = math.prod(shape[lead:lead + node.num_in])
    return out

