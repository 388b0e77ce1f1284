"""The Wan 2.1 video VAE (diffusers' `AutoencoderKLWan`) in vidit: causal 3D convs, 4x8x8
compression to 16 latent channels, a feature cache for chunked encode/decode.

Layout is vidit's channels-last: videos [B, T, H, W, C] in [-1, 1] with T = 1 + 4k, latents
[B, 1 + k, H/8, W/8, z_dim]. Module and attribute names follow diffusers' (encoder.down_blocks.3,
mid_block.attentions.0, ...) so that vidit/wan_weights.py maps tensors by name.

What the model computes, as one function of the whole clip
----------------------------------------------------------
diffusers runs the encoder on frame 0 alone and then on 4 frames at a time, and the decoder on
one latent frame at a time, carrying a feature cache between the calls. That chunked
computation is the same as the following whole-clip one (which is what vidit computes; the
cache only splits it into pieces):

* a causal conv over time (kernel 3) sees the current frame and the two before it, with zeros
  before the clip starts (zero, not replicate, padding);
* norms (x / |x| * sqrt(C) * gamma over channels), spatial convs and the mid-block's
  single-head attention (over the H x W positions of one frame) work frame by frame;
* temporal down-sampling (encoder): output frame 0 is input frame 0 (no conv), output j >= 1 is
  a kernel-3 stride-2 conv over input frames (2j-2, 2j-1, 2j): 1 + 2m frames -> 1 + m;
* temporal up-sampling (decoder): output frame 0 is input frame 0; frames 1.. go through a causal
  conv (kernel 3, zeros before frame 1: frame 0 is not its past) to 2C channels that become two
  frames each: 1 + m frames -> 1 + 2m.

Streaming: every layer is `layer(x, cache) -> (y, new_cache)`, cache None at the clip's start.
A first chunk of 1 + 4m frames (1 + m latent frames to decode) and later chunks of 4m frames
(m latent frames) give the whole-clip result; `encode_chunked` / `decode_chunked` hold one chunk
of activations plus the caches (two frames per causal conv).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from vidit import sharding
from vidit.errors import ConfigError
from vidit.models import layers
from vidit.models.conv import (BIAS_NAMES, KERNEL_NAMES, NORM_NAMES, conv3d, decode_step,
                               encode_step, run_chunked)

VIDEO = ("activation_batch", None, None, None, None)
LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamps the log-variance


def default_config() -> ml_collections.ConfigDict:
    """Wan 2.1's VAE (diffusers' AutoencoderKLWan defaults; the latent statistics are the
    published ones and come with a loaded folder's config.json)."""
    return ml_collections.ConfigDict(dict(
        base_dim=96, decoder_base_dim=96, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=2,
        attn_scales=(), temperal_downsample=(False, True, True), in_channels=3, out_channels=3,
        latents_mean=(0.0,) * 16, latents_std=(1.0,) * 16, dtype="float32",
        param_dtype="float32"))


# ------------------------------------------------------------------------------- layers
def _kernel(rngs, shape, names, dtype):
    fan_in = math.prod(shape[:-1])
    init = nnx.initializers.normal(1.0 / math.sqrt(fan_in))
    return layers.param(rngs, init, shape, names, dtype)


class CausalConv(nnx.Module):
    """diffusers' WanCausalConv3d: a 3D conv, causal in time with zeros before the clip, 'same'
    in space. (y, cache) = conv(x, cache): the cache is the last kt - 1 input frames."""

    def __init__(self, cin, cout, kernel=(3, 3, 3), stride=(1, 1, 1), *, rngs, dtype, param_dtype):
        self.kernel_size, self.stride, self.dtype = tuple(kernel), tuple(stride), dtype
        self.kernel = _kernel(rngs, self.kernel_size + (cin, cout), KERNEL_NAMES, param_dtype)
        self.bias = layers.param(rngs, nnx.initializers.zeros, (cout,), BIAS_NAMES, param_dtype)

    def __call__(self, x, cache=None):
        kt, kh, kw = self.kernel_size
        new_cache = None
        if kt > 1 and self.stride[0] == 1:
            past = (jnp.zeros(x.shape[:1] + (kt - 1,) + x.shape[2:], x.dtype) if cache is None
                    else cache.astype(x.dtype))
            x = jnp.concatenate([past, x], axis=1)
            new_cache = x[:, -(kt - 1):]
        pad = ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2))
        y = conv3d(x, self.kernel[...], self.stride, pad, self.dtype)
        return y + self.bias[...].astype(self.dtype), new_cache


class Conv2d(nnx.Module):
    """A per-frame 2D conv (diffusers' nn.Conv2d inside the resamplers); `padding` is
    ((top, bottom), (left, right))."""

    def __init__(self, cin, cout, stride=1, padding=((1, 1), (1, 1)), *, rngs, dtype, param_dtype):
        self.stride, self.padding, self.dtype = (stride, stride), padding, dtype
        self.kernel = _kernel(rngs, (3, 3, cin, cout), KERNEL_NAMES[1:], param_dtype)
        self.bias = layers.param(rngs, nnx.initializers.zeros, (cout,), BIAS_NAMES, param_dtype)

    def __call__(self, x):
        b, t = x.shape[:2]
        y = jax.lax.conv_general_dilated(
            x.reshape((b * t,) + x.shape[2:]).astype(self.dtype),
            self.kernel[...].astype(self.dtype), self.stride, self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        y = y + self.bias[...].astype(self.dtype)
        return y.reshape((b, t) + y.shape[1:])


class RMSNorm(nnx.Module):
    """diffusers' WanRMS_norm: x / max(|x|, 1e-12) * sqrt(C) * gamma over the channels of each
    position (computed in float32)."""

    def __init__(self, dim, *, images=False, rngs, param_dtype):
        self.images = images  # diffusers stores gamma as [C, 1, 1] (images) or [C, 1, 1, 1]
        self.gamma = layers.param(rngs, nnx.initializers.ones, (dim,), NORM_NAMES, param_dtype)

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(jnp.square(x32), axis=-1, keepdims=True))
        y = x32 / jnp.maximum(norm, 1e-12) * math.sqrt(x.shape[-1])
        return (y * self.gamma[...].astype(jnp.float32)).astype(x.dtype)


class ResidualBlock(nnx.Module):
    """norm -> SiLU -> causal conv, twice, plus a 1x1x1 conv shortcut when the width changes."""

    def __init__(self, cin, cout, **kw):
        self.norm1 = RMSNorm(cin, rngs=kw["rngs"], param_dtype=kw["param_dtype"])
        self.conv1 = CausalConv(cin, cout, **kw)
        self.norm2 = RMSNorm(cout, rngs=kw["rngs"], param_dtype=kw["param_dtype"])
        self.conv2 = CausalConv(cout, cout, **kw)
        self.conv_shortcut = CausalConv(cin, cout, (1, 1, 1), **kw) if cin != cout else None

    def __call__(self, x, cache=None):
        c1, c2 = (None, None) if cache is None else cache
        h, c1 = self.conv1(jax.nn.silu(self.norm1(x)), c1)
        h, c2 = self.conv2(jax.nn.silu(self.norm2(h)), c2)
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)[0]
        return sharding.constrain(x + h, VIDEO), (c1, c2)


class Pointwise(nnx.Module):
    """A 1x1 conv per position (diffusers' 1x1 nn.Conv2d): [.., C_in] -> [.., C_out]."""

    def __init__(self, cin, cout, *, rngs, dtype, param_dtype):
        self.dtype = dtype
        self.kernel = _kernel(rngs, (cin, cout), KERNEL_NAMES[3:], param_dtype)
        self.bias = layers.param(rngs, nnx.initializers.zeros, (cout,), BIAS_NAMES, param_dtype)

    def __call__(self, x):
        return x.astype(self.dtype) @ self.kernel[...].astype(self.dtype) + \
            self.bias[...].astype(self.dtype)


class AttentionBlock(nnx.Module):
    """Single-head self-attention over the H x W positions of each frame, residual."""

    def __init__(self, dim, **kw):
        self.norm = RMSNorm(dim, images=True, rngs=kw["rngs"], param_dtype=kw["param_dtype"])
        self.to_qkv = Pointwise(dim, 3 * dim, **kw)
        self.proj = Pointwise(dim, dim, **kw)

    def __call__(self, x, cache=None):
        b, t, h, w, c = x.shape
        qkv = self.to_qkv(self.norm(x).reshape(b * t, h * w, c))
        q, k, v = (a[:, :, None, :] for a in jnp.split(qkv, 3, axis=-1))  # one head
        y = self.proj(jax.nn.dot_product_attention(q, k, v)[:, :, 0])
        return x + y.reshape(x.shape).astype(x.dtype), None


class Resample(nnx.Module):
    """diffusers' WanResample: 'downsample2d' / 'downsample3d' (a stride-2 3x3 conv per frame,
    zero-padded bottom/right, then for 3d the temporal stride-2 conv) and 'upsample2d' /
    'upsample3d' (for 3d the temporal conv to two frames per frame, then nearest x2 and a 3x3
    conv to dim // 2 channels). The temporal rules are in the module docstring."""

    MODES = ("downsample2d", "downsample3d", "upsample2d", "upsample3d")

    def __init__(self, dim, mode, **kw):
        if mode not in self.MODES:
            raise ConfigError(f"Wan VAE resample mode {mode!r} is not one of {self.MODES}")
        self.mode = mode
        if mode.startswith("up"):
            self.resample = Conv2d(dim, dim // 2, **kw)
            self.time_conv = (CausalConv(dim, 2 * dim, (3, 1, 1), **kw) if mode == "upsample3d"
                              else None)
        else:
            self.resample = Conv2d(dim, dim, 2, ((0, 1), (0, 1)), **kw)
            self.time_conv = (CausalConv(dim, dim, (3, 1, 1), (2, 1, 1), **kw)
                              if mode == "downsample3d" else None)

    def __call__(self, x, cache=None):
        if self.mode == "upsample3d":
            x, cache = self._up_time(x, cache)
        if self.mode.startswith("up"):
            x = self.resample(jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3))
        else:
            x = self.resample(x)
        if self.mode == "downsample3d":
            x, cache = self._down_time(x, cache)
        return x, cache

    def _up_time(self, x, cache):
        head = x[:, :1] if cache is None else x[:, :0]
        rest = x[:, 1:] if cache is None else x
        if rest.shape[1] == 0:  # a first chunk of one frame: the conv has seen nothing yet
            return head, jnp.zeros(x.shape[:1] + (2,) + x.shape[2:], x.dtype)
        y, cache = self.time_conv(rest, cache)
        b, t, h, w, c2 = y.shape
        y = y.reshape(b, t, h, w, 2, c2 // 2).transpose(0, 1, 4, 2, 3, 5)
        return jnp.concatenate([head, y.reshape(b, 2 * t, h, w, c2 // 2)], axis=1), cache

    def _down_time(self, x, cache):
        head = x[:, :1] if cache is None else x[:, :0]
        window = x if cache is None else jnp.concatenate([cache.astype(x.dtype), x], axis=1)
        if window.shape[1] % 2 != 1:
            raise ValueError(f"Wan VAE temporal down-sampling got a chunk of {x.shape[1]} frames "
                             f"at this level: clips are 1 + 4k frames, later chunks 4k")
        new_cache = x[:, -1:]
        if window.shape[1] == 1:
            return head, new_cache
        return jnp.concatenate([head, self.time_conv(window)[0]], axis=1), new_cache


class MidBlock(nnx.Module):
    def __init__(self, dim, **kw):
        self.resnets = nnx.List([ResidualBlock(dim, dim, **kw), ResidualBlock(dim, dim, **kw)])
        self.attentions = nnx.List([AttentionBlock(dim, **kw)])

    def __call__(self, x, cache=None):
        c0, c1 = (None, None) if cache is None else cache
        x, c0 = self.resnets[0](x, c0)
        x, _ = self.attentions[0](x)
        x, c1 = self.resnets[1](x, c1)
        return x, (c0, c1)


class UpBlock(nnx.Module):
    def __init__(self, cin, cout, num_res_blocks, mode, **kw):
        self.resnets = nnx.List([ResidualBlock(cin if i == 0 else cout, cout, **kw)
                                 for i in range(num_res_blocks + 1)])
        self.upsamplers = nnx.List([Resample(cout, mode, **kw)] if mode else [])

    def __call__(self, x, cache=None):
        return _run(list(self.resnets) + list(self.upsamplers), x, cache)


def _run(modules, x, cache):
    new = []
    for i, module in enumerate(modules):
        x, c = module(x, None if cache is None else cache[i])
        new.append(c)
    return x, new


def _head(norm, conv, x, cache):
    return conv(jax.nn.silu(norm(x)), cache)


class Encoder(nnx.Module):
    def __init__(self, cfg, **kw):
        dims = [cfg.base_dim * u for u in (1, *cfg.dim_mult)]
        self.conv_in = CausalConv(cfg.in_channels, dims[0], **kw)
        blocks, last = [], len(cfg.dim_mult) - 1
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(cin, cout, **kw))
                cin = cout
            if i != last:
                mode = "downsample3d" if cfg.temperal_downsample[i] else "downsample2d"
                blocks.append(Resample(cout, mode, **kw))
        self.down_blocks = nnx.List(blocks)
        self.mid_block = MidBlock(dims[-1], **kw)
        self.norm_out = RMSNorm(dims[-1], rngs=kw["rngs"], param_dtype=kw["param_dtype"])
        self.conv_out = CausalConv(dims[-1], 2 * cfg.z_dim, **kw)

    def __call__(self, x, cache=None):
        cache = cache or (None, None, None, None)
        x, c_in = self.conv_in(x, cache[0])
        x, c_down = _run(self.down_blocks, x, cache[1])
        x, c_mid = self.mid_block(x, cache[2])
        x, c_out = _head(self.norm_out, self.conv_out, x, cache[3])
        return x, (c_in, c_down, c_mid, c_out)


class Decoder(nnx.Module):
    def __init__(self, cfg, **kw):
        dim = cfg.decoder_base_dim or cfg.base_dim
        mult = tuple(cfg.dim_mult)
        dims = [dim * u for u in (mult[-1], *mult[::-1])]
        upsample = tuple(cfg.temperal_downsample)[::-1]
        self.conv_in = CausalConv(cfg.z_dim, dims[0], **kw)
        self.mid_block = MidBlock(dims[0], **kw)
        blocks = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            cin = cin // 2 if i > 0 else cin  # the up-sampler before halves the width
            mode = None
            if i != len(mult) - 1:
                mode = "upsample3d" if upsample[i] else "upsample2d"
            blocks.append(UpBlock(cin, cout, cfg.num_res_blocks, mode, **kw))
        self.up_blocks = nnx.List(blocks)
        self.norm_out = RMSNorm(dims[-1], rngs=kw["rngs"], param_dtype=kw["param_dtype"])
        self.conv_out = CausalConv(dims[-1], cfg.out_channels, **kw)

    def __call__(self, z, cache=None):
        cache = cache or (None, None, None, None)
        x, c_in = self.conv_in(z, cache[0])
        x, c_mid = self.mid_block(x, cache[1])
        x, c_up = _run(self.up_blocks, x, cache[2])
        x, c_out = _head(self.norm_out, self.conv_out, x, cache[3])
        return x, (c_in, c_mid, c_up, c_out)


# ------------------------------------------------------------------------------- the VAE
class WanVAE(nnx.Module):
    """encode(x [B, 1+4k, H, W, C]) -> (mean, logvar) [B, 1+k, H/8, W/8, z_dim];
    decode(z) -> x, clipped to [-1, 1] as diffusers does. Outputs are float32."""

    def __init__(self, cfg: Any, rngs: nnx.Rngs | None = None, *, seed: int = 0):
        rngs = rngs if rngs is not None else nnx.Rngs(params=seed)
        dtype, param_dtype = layers.dtype_of(cfg.dtype), layers.dtype_of(cfg.param_dtype)
        if tuple(cfg.get("attn_scales", ())):
            # Wan 2.1 has none, and diffusers' encoder cannot run them with its feature cache.
            raise ConfigError(f"Wan VAE attn_scales={tuple(cfg.attn_scales)}: vidit builds the "
                              f"Wan 2.1 VAE, whose down blocks have no attention")
        if len(cfg.temperal_downsample) != len(cfg.dim_mult) - 1:
            raise ConfigError(f"Wan VAE: temperal_downsample needs {len(cfg.dim_mult) - 1} "
                              f"entries (one per down-sampling), got {cfg.temperal_downsample}")
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.compression = (2 ** sum(bool(d) for d in cfg.temperal_downsample),
                            2 ** (len(cfg.dim_mult) - 1), 2 ** (len(cfg.dim_mult) - 1))
        self.channels, self.latent_channels = int(cfg.in_channels), int(cfg.z_dim)
        self.dtype = dtype
        self.encoder = Encoder(cfg, **kw)
        self.quant_conv = CausalConv(2 * cfg.z_dim, 2 * cfg.z_dim, (1, 1, 1), **kw)
        self.post_quant_conv = CausalConv(cfg.z_dim, cfg.z_dim, (1, 1, 1), **kw)
        self.decoder = Decoder(cfg, **kw)

    def latent_shape(self, video_shape: Sequence[int]) -> tuple[int, ...]:
        b, t, h, w, _ = self._check_video(video_shape)
        st, sh, sw = self.compression
        return (b, 1 + (t - 1) // st, h // sh, w // sw, self.latent_channels)

    def _check_video(self, shape):
        if len(shape) != 5:
            raise ValueError(f"the Wan VAE takes videos [B, T, H, W, C], got {tuple(shape)}")
        b, t, h, w, c = shape
        st, sh, sw = self.compression
        if (t - 1) % st or t < 1:
            raise ValueError(f"the Wan VAE encodes 1 + k*{st} frames (1, {1 + st}, "
                             f"{1 + 2 * st}, ...), got {t}")
        if h % sh or w % sw:
            raise ValueError(f"frame size {h}x{w} does not divide by the VAE's {sh}x{sw}")
        if c != self.channels:
            raise ValueError(f"the Wan VAE takes {self.channels}-channel video, got {c}")
        return shape

    # -- whole clip
    def encode(self, x):
        self._check_video(x.shape)
        mean, logvar, _ = self.encode_stream(x, None)
        return mean, logvar

    def decode(self, z):
        if z.ndim != 5 or z.shape[-1] != self.latent_channels:
            raise ValueError(f"latents must be [B, T', H', W', {self.latent_channels}], "
                             f"got {tuple(z.shape)}")
        return self.decode_stream(z, None)[0]

    def __call__(self, x):
        """The reconstruction of x through the posterior mean (diffusers' forward)."""
        return self.decode(self.encode(x)[0])

    # -- one chunk
    def encode_stream(self, x, cache=None):
        h, cache = self.encoder(sharding.constrain(x.astype(self.dtype), VIDEO), cache)
        h = self.quant_conv(h)[0].astype(jnp.float32)
        mean, logvar = jnp.split(h, 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE), cache

    def decode_stream(self, z, cache=None):
        x = self.post_quant_conv(z.astype(self.dtype))[0]
        x, cache = self.decoder(x, cache)
        return jnp.clip(x.astype(jnp.float32), -1.0, 1.0), cache

    # -- chunked: bounded memory, the same result
    def encode_chunked(self, x, chunk_frames: int = 4):
        """encode() a chunk at a time: frames [0, 1 + chunk_frames), then chunk_frames at a
        time (diffusers uses 1, then 4); chunk_frames a multiple of the temporal compression."""
        self._check_video(x.shape)
        st = self.compression[0]
        if chunk_frames < st or chunk_frames % st:
            raise ValueError(f"chunk_frames={chunk_frames} must be a positive multiple of {st}")
        return run_chunked(encode_step, self, x, chunk_frames)

    def decode_chunked(self, z, chunk_latents: int = 1):
        """decode() a chunk at a time: latent frames [0, 1 + chunk_latents), then
        chunk_latents at a time."""
        if chunk_latents < 1:
            raise ValueError(f"chunk_latents={chunk_latents} must be positive")
        return run_chunked(decode_step, self, z, chunk_latents)[0]


def build(cfg: Any, seed: int = 0) -> WanVAE:
    return WanVAE(cfg, nnx.Rngs(params=seed))
