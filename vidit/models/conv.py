"""3D convolution layers shared by the causal video VAE (vae.py) and the patch discriminator
(discriminator.py): a channels-last conv3d, the causal conv that carries a cache over time, and a
per-frame norm. Videos are [B, T, H, W, C].
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from vidit.errors import ConfigError
from vidit.models import layers

# Logical axis names of the parameters (all names exist in sharding.DEFAULT_RULES): a conv kernel
# [kt, kh, kw, C_in, C_out] splits C_in like a Dense's input ("embed" -> fsdp) and C_out like its
# hidden side ("mlp" -> tensor); a dimension that does not divide is left unsplit.
KERNEL_NAMES = (None, None, None, "embed", "mlp")
BIAS_NAMES = ("mlp",)
NORM_NAMES = ("norm",)


def conv3d(x, kernel, stride, padding, dtype):
    """3D conv [B, T, H, W, C] x [kt, kh, kw, Cin, Cout]. On CPU it runs as kt 2D convs over
    frames folded into the batch, summed: XLA:CPU's 3D convolution (and its gradient) is several
    times slower than its 2D one (docs/latent); other backends get the native 3D conv."""
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    if jax.default_backend() != "cpu":
        return jax.lax.conv_general_dilated(
            x, kernel, window_strides=tuple(stride), padding=padding,
            dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    (pt0, pt1), pad_h, pad_w = (tuple(p) for p in padding)
    st, sh, sw = stride
    kt = kernel.shape[0]
    if pt0 or pt1:
        x = jnp.pad(x, ((0, 0), (pt0, pt1), (0, 0), (0, 0), (0, 0)))
    b, t = x.shape[:2]
    n = (t - kt) // st + 1
    if n <= 0:  # too few frames for one window (an empty chunk): no output frames
        return jnp.zeros((b, 0) + x.shape[2:4] + kernel.shape[-1:], dtype)[:, :, ::sh, ::sw]
    out = None
    for i in range(kt):
        frames = jax.lax.slice_in_dim(x, i, i + st * (n - 1) + 1, stride=st, axis=1)
        y = jax.lax.conv_general_dilated(
            frames.reshape((b * n,) + frames.shape[2:]), kernel[i], window_strides=(sh, sw),
            padding=(pad_h, pad_w), dimension_numbers=("NHWC", "HWIO", "NHWC"))
        out = y if out is None else out + y
    return out.reshape((b, n) + out.shape[1:])


def spatial_padding(k: int, s: int) -> tuple[int, int]:
    """'same' zero padding for a spatial kernel k at stride s (stride 2: (0, 1) for k=3, LDM)."""
    total = max(k - s, 0)
    return (total // 2, total - total // 2)


class CausalConv3d(nnx.Module):
    """3D conv, causal in time, 'same' in space. Called as layer(x, cache) -> (y, new_cache):
    cache=None starts a clip (the past is the first frame repeated); otherwise it holds the
    input frames the previous chunk left for this layer's next window (vae.py's docstring)."""

    def __init__(self, cin: int, cout: int, kernel=(3, 3, 3), stride=(1, 1, 1), *, rngs,
                 dtype=jnp.float32, param_dtype=jnp.float32, kernel_init=None):
        self.kernel_size = tuple(int(k) for k in kernel)
        self.stride = tuple(int(s) for s in stride)
        init = kernel_init or nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
        self.kernel = layers.param(rngs, init, self.kernel_size + (cin, cout), KERNEL_NAMES,
                                   param_dtype)
        self.bias = layers.param(rngs, nnx.initializers.zeros, (cout,), BIAS_NAMES, param_dtype)
        self.dtype = dtype

    @property
    def stateful(self) -> bool:
        return self.kernel_size[0] > 1 or self.stride[0] > 1

    def __call__(self, x, cache=None):
        kt, kh, kw = self.kernel_size
        st, sh, sw = self.stride
        new_cache = ()
        if self.stateful:
            if cache is None:  # start of the clip: the past is the first frame repeated
                past = jnp.repeat(x[:, :1], kt - 1, axis=1) if kt > 1 else x[:, :0]
            else:
                past = cache
            x = jnp.concatenate([past.astype(x.dtype), x], axis=1)
            n_out = max((x.shape[1] - kt) // st + 1, 0)
            # The input from the next window's start on (stride 1: the last kt-1 frames).
            new_cache = x[:, st * n_out:]
        pad = ((0, 0), spatial_padding(kh, sh), spatial_padding(kw, sw))
        y = conv3d(x, self.kernel[...], self.stride, pad, self.dtype)
        return y + self.bias[...].astype(self.dtype), new_cache


class Norm(nnx.Module):
    """Per-frame normalisation (chunk-exact): channel RMSNorm, or GroupNorm over (H, W, group)."""

    def __init__(self, dim: int, kind: str = "rms", groups: int = 32, *, rngs,
                 param_dtype=jnp.float32, eps: float = 1e-6):
        if kind not in ("rms", "group"):
            raise ConfigError(f"vae norm '{kind}' is not one of ('rms', 'group')")
        self.kind = kind
        self.groups = math.gcd(dim, groups)
        self.eps = eps
        self.scale = layers.param(rngs, nnx.initializers.ones, (dim,), NORM_NAMES, param_dtype)
        self.shift = (layers.param(rngs, nnx.initializers.zeros, (dim,), NORM_NAMES, param_dtype)
                      if kind == "group" else None)

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        if self.kind == "rms":
            y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
            return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)
        b, t, h, w, c = x.shape
        g = x32.reshape(b, t, h, w, self.groups, c // self.groups)
        mean = jnp.mean(g, axis=(2, 3, 5), keepdims=True)
        var = jnp.mean(jnp.square(g - mean), axis=(2, 3, 5), keepdims=True)
        y = ((g - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
        y = y * self.scale[...].astype(jnp.float32) + self.shift[...].astype(jnp.float32)
        return y.astype(x.dtype)



@nnx.jit
def encode_step(model, x, cache):
    """One jitted chunk of a causal VAE's encoder (`model.encode_stream`)."""
    return model.encode_stream(x, cache)


@nnx.jit
def decode_step(model, z, cache):
    """One jitted chunk of a causal VAE's decoder (`model.decode_stream`)."""
    return model.decode_stream(z, cache)


def run_chunked(step, model, x, chunk: int):
    """A causal video model over x [B, T, ...] a chunk at a time: `step(model, piece, cache)
    -> (*outputs, cache)` on [0, 1 + chunk), then `chunk` frames at a time, carrying the cache;
    each output concatenated over time. The chunked encode/decode of the VAEs."""
    bounds = [0, *range(1 + chunk, x.shape[1], chunk), x.shape[1]]
    outs, cache = [], None
    for a, b in zip(bounds[:-1], bounds[1:]):
        *out, cache = step(model, x[:, a:b], cache)
        outs.append(out)
    return tuple(jnp.concatenate(parts, axis=1) for parts in zip(*outs))


def pad_same(n: int, k: int, s: int) -> tuple[int, int]:
    out = -(-n // s)
    total = max((out - 1) * s + k - n, 0)
    return (total // 2, total - total // 2)
