"""Small building blocks shared by vidit's models.

Every parameter is created with logical axis names (see vidit/sharding.py); every function that
does math is pure and takes its dtype from the caller.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from vidit import sharding
from vidit.errors import ConfigError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name: str):
    try:
        return DTYPES[name]
    except KeyError:
        raise ConfigError(f"dtype '{name}' is not one of {sorted(DTYPES)}") from None


def param(rngs: nnx.Rngs, init, shape: Sequence[int], names: Sequence[str | None], dtype):
    """An nnx.Param whose metadata carries its logical axis names."""
    assert len(shape) == len(names), (shape, names)
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), out_sharding=tuple(names))


class Dense(nnx.Module):
    """y = x . W + b, contracting the last `len(in_shape)` dims of x into `out_shape`.

    Multi-dimensional kernels (e.g. width -> (heads, head_dim)) keep the head axis visible to the
    sharding rules, so tensor parallelism splits whole heads.
    """

    def __init__(self, in_shape, out_shape, names, *, rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32, use_bias=True, kernel_init=None, bias_init=None):
        in_shape, out_shape = tuple(in_shape), tuple(out_shape)
        kernel_init = kernel_init or nnx.initializers.variance_scaling(
            1.0, "fan_in", "truncated_normal", in_axis=tuple(range(len(in_shape))),
            out_axis=tuple(range(len(in_shape), len(in_shape) + len(out_shape))))
        self.kernel = param(rngs, kernel_init, in_shape + out_shape, names, param_dtype)
        self.bias = (param(rngs, bias_init or nnx.initializers.zeros, out_shape,
                           names[len(in_shape):], param_dtype) if use_bias else None)
        self.num_in, self.num_out = len(in_shape), len(out_shape)
        self.dtype = dtype

    def __call__(self, x):
        kernel = self.kernel[...].astype(self.dtype)
        n = self.num_in
        # Contract a 2-D [tokens, in] matrix. With the 3-D [B, N, in] form, XLA:CPU fused each
        # weight gradient's transposed operand with its element-wise producers into a strided
        # loop (a sixth of a DiT-S step, docs/speed); 2-D transposes run at copy speed.
        lead = x.shape[:x.ndim - n]
        x2 = x.reshape((-1,) + x.shape[x.ndim - n:]).astype(self.dtype)
        y = jax.lax.dot_general(x2, kernel, ((tuple(range(1, 1 + n)), tuple(range(n))), ((), ())))
        lora_a = getattr(self, "lora_a", None)  # adapters added by vidit/models/lora.py
        if lora_a is not None:
            down = jax.lax.dot_general(x2, lora_a[...].astype(self.dtype),
                                       ((tuple(range(1, 1 + n)), tuple(range(n))), ((), ())))
            up = jax.lax.dot_general(down, self.lora_b[...].astype(self.dtype),
                                     (((1,), (0,)), ((), ())))
            y = y + (self.lora_scale * up).astype(y.dtype)
        y = y.reshape(lead + y.shape[1:])
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Mlp(nnx.Module):
    """Two Dense layers with a tanh-approximated GELU between them."""

    def __init__(self, width, hidden, *, rngs, dtype, param_dtype, names=("embed", "mlp")):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.fc1 = Dense((width,), (hidden,), names, **kw)
        self.fc2 = Dense((hidden,), (width,), names[::-1], **kw)

    def __call__(self, x):
        h = jax.nn.gelu(self.fc1(x), approximate=True)
        h = sharding.constrain(h, ("activation_batch", "activation_length", "activation_mlp"))
        return self.fc2(h)


def layer_norm(x, eps: float = 1e-6):
    """LayerNorm without affine parameters (adaLN supplies scale and shift), statistics in f32."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    centred = x32 - mean  # two-pass variance: E[x^2] - E[x]^2 cancels badly in f32
    var = jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
    return (centred * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis with a learned scale (used for QK-normalisation)."""

    def __init__(self, dim: int, names=("kv",), *, rngs, param_dtype=jnp.float32, eps=1e-6):
        self.scale = param(rngs, nnx.initializers.ones, (dim,), names, param_dtype)
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


# DiT's time scaling (t as a DDPM step index); model.time_scale's default, and the value every
# model had before that key existed.
DIT_TIME_SCALE = 1000.0


def timestep_embedding(t, dim: int, max_period: float = 10000.0,
                       scale: float = DIT_TIME_SCALE):
    """Sinusoidal features of a continuous time t in [0, 1], scaled by `scale` (1000 as in DiT:
    t as a DDPM step index). d(features)/dt grows with the scale, which matters to objectives
    that differentiate the model in t (MeanFlow's jvp)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = (scale * t.astype(jnp.float32))[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TimestepEmbedder(nnx.Module):
    """t -> sinusoidal features -> MLP -> conditioning vector of size `width`."""

    def __init__(self, width: int, *, rngs, dtype, param_dtype, freq_dim: int = 256,
                 zero_init_output: bool = False, time_scale: float = DIT_TIME_SCALE,
                 hidden_init_scale: float = 1.0):
        init = nnx.initializers.normal(0.02)
        self.freq_dim = freq_dim
        self.time_scale = time_scale
        self.fc1 = Dense((freq_dim,), (width,), ("cond", "embed"), rngs=rngs, dtype=dtype,
                         param_dtype=param_dtype, kernel_init=init)
        self.fc2 = Dense((width,), (width,), ("mlp", "embed"), rngs=rngs, dtype=dtype,
                         param_dtype=param_dtype,
                         kernel_init=(nnx.initializers.zeros if zero_init_output else
                                      nnx.initializers.normal(0.02 * hidden_init_scale)))

    def __call__(self, t):
        features = timestep_embedding(t, self.freq_dim, scale=self.time_scale)
        return self.fc2(jax.nn.silu(self.fc1(features)))


# ---------------------------------------------------------------------------------------------
# 3D rotary position embedding
def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Head-dim split over (t, h, w): 2*floor(d/6) each for h and w, the rest for t (Wan)."""
    if head_dim % 2:
        raise ConfigError(f"head dim {head_dim} must be even for RoPE (config.model.width / heads)")
    spatial = 2 * (head_dim // 6)
    return head_dim - 2 * spatial, spatial, spatial


def rope_angles(grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0):
    """cos/sin tables [tokens, head_dim/2] for a (T', H', W') token grid, tokens in t-h-w order.

    No parameters depend on the grid, so a model trained on one clip size runs on any other.
    """
    parts = []
    axes = jnp.meshgrid(*[jnp.arange(n, dtype=jnp.float32) for n in grid], indexing="ij")
    for positions, dim in zip(axes, rope_split(head_dim)):
        if dim == 0:
            continue
        freqs = theta ** (-jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
        parts.append(positions.reshape(-1, 1) * freqs[None])
    angles = jnp.concatenate(parts, axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, cos, sin):
    """Rotates pairs (x[i], x[i + d/2]) of x [B, N, H, D] by the per-token angles."""
    half = x.shape[-1] // 2
    # x * (cos, cos) + (x2, x1) * (-sin, sin): one swap of halves and one fused multiply-add,
    # faster than the products computed per half and concatenated (docs/speed).
    cos = jnp.concatenate([cos, cos], axis=-1)[None, :, None, :].astype(x.dtype)
    sin = jnp.concatenate([-sin, sin], axis=-1)[None, :, None, :].astype(x.dtype)
    swapped = jnp.concatenate([x[..., half:], x[..., :half]], axis=-1)
    return x * cos + swapped * sin


# ---------------------------------------------------------------------------------------------
# 3D patches
def patchify(x, patch: Sequence[int]):
    """[B, T, H, W, C] -> ([B, N, pt*ph*pw*C], grid (T', H', W'))."""
    b, t, h, w, c = x.shape
    pt, ph, pw = patch
    if t % pt or h % ph or w % pw:
        raise ConfigError(
            f"input (frames, height, width) = {(t, h, w)} does not divide by "
            f"config.model.patch = {tuple(patch)}")
    grid = (t // pt, h // ph, w // pw)
    x = x.reshape(b, grid[0], pt, grid[1], ph, grid[2], pw, c)
    x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(b, math.prod(grid), pt * ph * pw * c), grid


def unpatchify(tokens, grid, patch: Sequence[int], channels: int):
    """Inverse of patchify: [B, N, pt*ph*pw*C] -> [B, T, H, W, C]."""
    b = tokens.shape[0]
    pt, ph, pw = patch
    x = tokens.reshape(b, *grid, pt, ph, pw, channels)
    x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7)
    return x.reshape(b, grid[0] * pt, grid[1] * ph, grid[2] * pw, channels)
