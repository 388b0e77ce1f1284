"""Causal 3D convolutional video VAE (the latent space a latent-video DiT trains in).

Layout is channels-last like the DiT: videos x [B, T, H, W, C] in [-1, 1], latents
z [B, T', H', W', latent_channels] with T' = 1 + (T - 1) / st, H' = H / sh, W' = W / sw for
compression (st, sh, sw). An image is a 1-frame video and gets a 1-frame latent.

Causality in time
-----------------
Every convolution over time is causal: a kernel of kt frames sees the current frame and the
kt - 1 frames before it. At the start of a clip the missing past is the first frame repeated
(replicate padding), so frame 0 is encoded (and decoded) on its own, exactly as an image would be.
Space uses ordinary zero 'same' padding. Normalisation is per frame (channel-wise RMSNorm, or a
GroupNorm over H, W and a channel group of one frame), never over time.

Temporal down-sampling (scheme): a causal conv with kernel 3 and stride 2 over the replicate-padded
sequence P = [x0, x0, x0, x1, x2, ...]. Its windows start at even positions of P, so
    out[0] = f(x0, x0, x0)                 -- frame 0 alone
    out[i] = f(x[2i-2], x[2i-1], x[2i])    -- i >= 1: the new pair (2i-1, 2i) plus one frame of past
and T = 1 + 2k frames give 1 + k outputs. Stacking log2(st) such layers gives latent frame 0 <- frame 0
and latent frame i <- frames (st*(i-1), st*i] (plus causal context), the CausalVAE/Wan layout.

Temporal up-sampling (mirror): a causal conv (kernel 3, stride 1) produces 2C channels per frame,
which become two frames [a_i, b_i]; the first clip frame drops a_0, so T' frames give 1 + 2(T' - 1):
    frame 0 <- b_0,  frames (2i - 1, 2i) <- (a_i, b_i).
Decoded frame j therefore depends only on latent frames <= ceil(j / st).

Streaming / chunking
--------------------
Every layer is called as `layer(x, cache) -> (y, new_cache)`. `cache=None` means "this chunk starts
the clip" (replicate padding, drop a_0); otherwise the cache holds the causal state carried over
from the previous chunk: for a stride-1 conv with kernel kt its last kt - 1 (= 2) input frames, for
the stride-2 conv the input frames after its last window start (always exactly 1 frame when chunks
are aligned to whole latent frames). Layers with no state over time return `()`. Whole-clip
`encode`/`decode` are one chunk with `cache=None`, so `encode_chunked` / `decode_chunked`
(a first chunk of 1 + n latent frames, then n latent frames at a time) give the same result while
holding only one chunk of activations plus the small per-layer caches.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from vidit import sharding
from vidit.errors import ConfigError
from vidit.models import discriminator, layers
from vidit.models.conv import CausalConv3d, Norm, decode_step, encode_step, run_chunked

# Activations [B, T, H, W, C]: only the batch is pinned.
VIDEO = ("activation_batch", None, None, None, None)

LOGVAR_RANGE = (-30.0, 20.0)


# ---------------------------------------------------------------------------------------------
# Configs
def _levels_needed(compression: Sequence[int]) -> int:
    return max(int(math.log2(f)) for f in compression)


def default_config(compression: Sequence[int] = (4, 4, 4)) -> ml_collections.ConfigDict:
    """A full-size VAE (Wan-like: base width 96, multipliers (1, 2, 4, 4) cut to the levels
    needed, 2 res blocks per level, 16 latent channels; no attention)."""
    compression = tuple(int(f) for f in compression)
    c = ml_collections.ConfigDict()
    c.channels = 3
    c.base_width = 96
    c.channel_mult = (1, 2, 4, 4)[: _levels_needed(compression) + 1] or (1,)
    c.num_res_blocks = 2
    c.latent_channels = 16
    c.compression = compression
    c.norm = "rms"          # "rms" (channel-wise, per pixel) or "group" (per frame)
    c.norm_groups = 32      # for norm="group"
    c.dtype = "float32"
    c.param_dtype = "float32"
    c.disc = ml_collections.ConfigDict(dict(width=64, num_layers=3))
    c.loss = ml_collections.ConfigDict(dict(beta=1e-6, gan_weight=0.0, gan_start=0))
    return c


def tiny_config(compression: Sequence[int] = (4, 4, 4), channels: int = 1) -> ml_collections.ConfigDict:
    """A few-thousand-parameter VAE for tests and CPU smoke runs."""
    c = default_config(compression)
    c.channels = channels
    c.base_width = 8
    c.channel_mult = (1, 2, 2, 2)[: _levels_needed(c.compression) + 1] or (1,)
    c.num_res_blocks = 1
    c.latent_channels = 4
    c.norm_groups = 4
    c.disc = ml_collections.ConfigDict(dict(width=8, num_layers=2))
    return c


def level_plan(cfg) -> list[tuple[int, int, int]]:
    """(st, sh, sw) stride of each down-sampling transition (one between consecutive levels).

    Space is down-sampled at the first log2(sh) / log2(sw) transitions, time at the last log2(st)
    ones (the high-resolution levels stay per-frame cheap, as in Wan/CogVideoX).
    """
    comp = tuple(int(f) for f in cfg.compression)
    if len(comp) != 3:
        raise ConfigError(f"vae compression must be (t, h, w), got {comp}")
    for f in comp:
        if f < 1 or f & (f - 1):
            raise ConfigError(f"vae compression factors must be powers of 2, got {comp}")
    n = len(cfg.channel_mult) - 1
    logs = [int(math.log2(f)) for f in comp]
    if max(logs) > n:
        raise ConfigError(
            f"vae compression {comp} needs {max(logs)} down-sampling transitions but "
            f"channel_mult={tuple(cfg.channel_mult)} gives {n}; add levels")
    plan = []
    for j in range(n):
        st = 2 if j >= n - logs[0] else 1
        sh = 2 if j < logs[1] else 1
        sw = 2 if j < logs[2] else 1
        plan.append((st, sh, sw))
    return plan


# ---------------------------------------------------------------------------------------------
# Building blocks
class ResBlock(nnx.Module):
    """norm -> SiLU -> causal conv, twice, plus a (1x1x1 conv) shortcut."""

    def __init__(self, cin: int, cout: int, cfg, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        nkw = dict(kind=cfg.norm, groups=cfg.norm_groups, rngs=rngs, param_dtype=param_dtype)
        self.norm1 = Norm(cin, **nkw)
        self.conv1 = CausalConv3d(cin, cout, **kw)
        self.norm2 = Norm(cout, **nkw)
        self.conv2 = CausalConv3d(cout, cout, **kw)
        self.skip = CausalConv3d(cin, cout, (1, 1, 1), **kw) if cin != cout else None

    def __call__(self, x, cache=None):
        c1, c2 = (None, None) if cache is None else cache
        h, c1 = self.conv1(jax.nn.silu(self.norm1(x)), c1)
        h, c2 = self.conv2(jax.nn.silu(self.norm2(h)), c2)
        if self.skip is not None:
            x, _ = self.skip(x)
        return sharding.constrain(x + h, VIDEO), (c1, c2)


class Downsample(nnx.Module):
    """Spatial stride-2 conv (per frame), then the stride-2 causal temporal conv (see top)."""

    def __init__(self, dim: int, stride, *, rngs, dtype, param_dtype):
        st, sh, sw = stride
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.spatial = (CausalConv3d(dim, dim, (1, 3, 3), (1, sh, sw), **kw)
                        if sh > 1 or sw > 1 else None)
        self.temporal = CausalConv3d(dim, dim, (3, 1, 1), (2, 1, 1), **kw) if st > 1 else None

    def __call__(self, x, cache=None):
        if self.spatial is not None:
            x, _ = self.spatial(x)
        new_cache = ()
        if self.temporal is not None:
            x, new_cache = self.temporal(x, cache)
        return x, new_cache


class Upsample(nnx.Module):
    """Temporal x2 (causal conv to two frames per frame, first clip frame keeps one), then
    nearest-neighbour spatial x2 and a per-frame 3x3 conv."""

    def __init__(self, dim: int, stride, *, rngs, dtype, param_dtype):
        st, sh, sw = stride
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.factors = (sh, sw)
        self.temporal = CausalConv3d(dim, 2 * dim, (3, 1, 1), **kw) if st > 1 else None
        self.spatial = CausalConv3d(dim, dim, (1, 3, 3), **kw) if sh > 1 or sw > 1 else None

    def __call__(self, x, cache=None):
        new_cache = ()
        if self.temporal is not None:
            first = cache is None
            y, new_cache = self.temporal(x, cache)
            b, t, h, w, c2 = y.shape
            y = y.reshape(b, t, h, w, 2, c2 // 2).transpose(0, 1, 4, 2, 3, 5)
            x = y.reshape(b, 2 * t, h, w, c2 // 2)
            if first:
                x = x[:, 1:]
        if self.spatial is not None:
            sh, sw = self.factors
            x = jnp.repeat(jnp.repeat(x, sh, axis=2), sw, axis=3)
            x, _ = self.spatial(x)
        return x, new_cache


def _run(modules, x, cache):
    """Applies stream layers in order; cache is None (clip start) or the list they returned."""
    new = []
    for i, module in enumerate(modules):
        x, c = module(x, None if cache is None else cache[i])
        new.append(c)
    return x, new


class Encoder(nnx.Module):
    def __init__(self, cfg, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        widths = [cfg.base_width * m for m in cfg.channel_mult]
        plan = level_plan(cfg)
        mods: list[nnx.Module] = [CausalConv3d(cfg.channels, widths[0], **kw)]
        ch = widths[0]
        for i, width in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                mods.append(ResBlock(ch, width, cfg, **kw))
                ch = width
            if i < len(plan):
                mods.append(Downsample(ch, plan[i], **kw))
        mods += [ResBlock(ch, ch, cfg, **kw), ResBlock(ch, ch, cfg, **kw)]
        self.layers = nnx.List(mods)
        self.norm_out = Norm(ch, cfg.norm, cfg.norm_groups, rngs=rngs, param_dtype=param_dtype)
        self.conv_out = CausalConv3d(ch, 2 * cfg.latent_channels, **kw)

    def __call__(self, x, cache=None):
        h, new = _run(self.layers, x, None if cache is None else cache[0])
        h, c_out = self.conv_out(jax.nn.silu(self.norm_out(h)), None if cache is None else cache[1])
        return h, [new, c_out]


class Decoder(nnx.Module):
    def __init__(self, cfg, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        widths = [cfg.base_width * m for m in cfg.channel_mult]
        plan = level_plan(cfg)
        ch = widths[-1]
        mods: list[nnx.Module] = [CausalConv3d(cfg.latent_channels, ch, **kw),
                                  ResBlock(ch, ch, cfg, **kw), ResBlock(ch, ch, cfg, **kw)]
        for i in reversed(range(len(widths))):
            for _ in range(cfg.num_res_blocks + 1):
                mods.append(ResBlock(ch, widths[i], cfg, **kw))
                ch = widths[i]
            if i > 0:
                mods.append(Upsample(ch, plan[i - 1], **kw))
        self.layers = nnx.List(mods)
        self.norm_out = Norm(ch, cfg.norm, cfg.norm_groups, rngs=rngs, param_dtype=param_dtype)
        self.conv_out = CausalConv3d(ch, cfg.channels, **kw)

    def __call__(self, z, cache=None):
        h, new = _run(self.layers, z, None if cache is None else cache[0])
        h, c_out = self.conv_out(jax.nn.silu(self.norm_out(h)), None if cache is None else cache[1])
        return h, [new, c_out]


# ---------------------------------------------------------------------------------------------
# The VAE
class VideoVAE(nnx.Module):
    """Causal video VAE with a diagonal-Gaussian latent.

    encode(x [B,T,H,W,C]) -> (mean, logvar) [B, 1+(T-1)/st, H/sh, W/sw, latent_channels]
    decode(z) -> x [B, 1+(T'-1)*st, H'*sh, W'*sw, channels]; outputs are float32.
    """

    def __init__(self, cfg: Any, rngs: nnx.Rngs | None = None, *, seed: int = 0):
        rngs = rngs if rngs is not None else nnx.Rngs(params=seed)
        dtype, param_dtype = layers.dtype_of(cfg.dtype), layers.dtype_of(cfg.param_dtype)
        self.plan = tuple(level_plan(cfg))  # validates the compression
        if not 1 <= cfg.latent_channels:
            raise ConfigError("vae latent_channels must be positive")
        self.compression = tuple(int(f) for f in cfg.compression)
        self.channels = int(cfg.channels)
        self.latent_channels = int(cfg.latent_channels)
        self.dtype = dtype
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.encoder = Encoder(cfg, **kw)
        self.decoder = Decoder(cfg, **kw)

    # -- shape checks ---------------------------------------------------------------------------
    def latent_shape(self, video_shape: Sequence[int]) -> tuple[int, ...]:
        b, t, h, w, _ = self._check_video(video_shape)
        st, sh, sw = self.compression
        return (b, 1 + (t - 1) // st, h // sh, w // sw, self.latent_channels)

    def video_shape(self, latent_shape: Sequence[int]) -> tuple[int, ...]:
        b, t, h, w, _ = latent_shape
        st, sh, sw = self.compression
        return (b, 1 + (t - 1) * st, h * sh, w * sw, self.channels)

    def _check_video(self, shape):
        if len(shape) != 5:
            raise ValueError(f"VideoVAE expects videos [B, T, H, W, C] (an image is T=1), got {tuple(shape)}")
        b, t, h, w, c = shape
        st, sh, sw = self.compression
        if t < 1 or (t - 1) % st:
            raise ValueError(
                f"VideoVAE with temporal compression {st} needs T = 1 + k*{st} frames "
                f"(1, {1 + st}, {1 + 2 * st}, ...), got T={t}")
        if h % sh or w % sw:
            raise ValueError(f"frame size {h}x{w} does not divide by the spatial compression {sh}x{sw}")
        if c != self.channels:
            raise ValueError(f"VideoVAE built for {self.channels} channels got {c}")
        return shape

    def _check_latent(self, shape):
        if len(shape) != 5 or shape[-1] != self.latent_channels or shape[1] < 1:
            raise ValueError(f"latents must be [B, T', H', W', {self.latent_channels}], got {tuple(shape)}")

    # -- whole clip -----------------------------------------------------------------------------
    def encode(self, x):
        self._check_video(x.shape)
        mean, logvar, _ = self.encode_stream(x, None)
        return mean, logvar

    def decode(self, z):
        self._check_latent(z.shape)
        return self.decode_stream(z, None)[0]

    def __call__(self, x, rng=None):
        """(recon, mean, logvar); z is sampled with `rng` (the posterior mean when rng is None)."""
        mean, logvar = self.encode(x)
        z = sample_posterior(mean, logvar, rng)
        return self.decode(z), mean, logvar

    # -- one chunk of a stream ------------------------------------------------------------------
    def encode_stream(self, x, cache=None):
        """One chunk: (mean, logvar, new_cache). cache=None starts a clip (then x has 1 + k*st
        frames); later chunks take the returned cache and k*st frames."""
        h, new_cache = self.encoder(x.astype(self.dtype), cache)
        mean, logvar = jnp.split(h.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE), new_cache

    def decode_stream(self, z, cache=None):
        """One chunk: (video, new_cache). The first chunk (cache=None) of n latent frames gives
        1 + (n-1)*st frames, every later chunk of n latent frames n*st frames."""
        x, new_cache = self.decoder(z.astype(self.dtype), cache)
        return x.astype(jnp.float32), new_cache

    # -- chunked --------------------------------------------------------------------------------
    def encode_chunked(self, x, chunk_frames: int, jit: bool = True):
        """encode() in bounded memory: frames [0, 1 + chunk_frames), then chunk_frames at a time.

        chunk_frames must be a positive multiple of st; the result equals encode(x)."""
        self._check_video(x.shape)
        st = self.compression[0]
        if chunk_frames < st or chunk_frames % st:
            raise ValueError(f"chunk_frames={chunk_frames} must be a positive multiple of the "
                             f"temporal compression {st}")
        step = encode_step if jit else (lambda m, a, c: m.encode_stream(a, c))
        return run_chunked(step, self, x, chunk_frames)

    def decode_chunked(self, z, chunk_latents: int, jit: bool = True):
        """decode() in bounded memory: latent frames [0, 1 + chunk_latents), then chunk_latents
        at a time (the mirror of encode_chunked); the result equals decode(z)."""
        self._check_latent(z.shape)
        if chunk_latents < 1:
            raise ValueError(f"chunk_latents={chunk_latents} must be positive")
        step = decode_step if jit else (lambda m, a, c: m.decode_stream(a, c))
        return run_chunked(step, self, z, chunk_latents)[0]


def build(cfg: Any, seed: int = 0) -> VideoVAE:
    return VideoVAE(cfg, nnx.Rngs(params=seed))


def num_params(model: nnx.Module) -> int:
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def sample_posterior(mean, logvar, rng=None):
    """z = mean + exp(logvar / 2) * eps, or the mean when rng is None."""
    if rng is None:
        return mean
    eps = jax.random.normal(rng, mean.shape, mean.dtype)
    return mean + jnp.exp(0.5 * logvar) * eps


# ---------------------------------------------------------------------------------------------
# What vidit.train trains (config.model.kind = 'vae')
def vae_model_config(model_cfg: Any) -> ml_collections.ConfigDict:
    """The VideoVAE / PatchDiscriminator fields of a run's config.model (which also holds
    'kind' and 'cond')."""
    return ml_collections.ConfigDict(
        {k: v for k, v in model_cfg.to_dict().items() if k not in ("kind", "cond", "loss")})


class VAEModel(nnx.Module):
    """The VAE and its patch discriminator as one module, so one parameter tree
    {'vae': ..., 'disc': ...} holds both (one optimizer, one EMA, one checkpoint). The
    discriminator always exists (it is small); the 'vae' objective runs it only when its
    gan_weight > 0. `null_cond` makes it look like an unconditional DiT to the train step."""

    def __init__(self, model_cfg: Any, rngs: nnx.Rngs | None = None, *, seed: int = 0):
        rngs = rngs if rngs is not None else nnx.Rngs(params=seed)
        cfg = vae_model_config(model_cfg)
        self.vae = VideoVAE(cfg, rngs)
        self.disc = discriminator.PatchDiscriminator(cfg, rngs)

    def __call__(self, x, rng=None, *, gan: bool = False) -> dict:
        """recon, mean, logvar (z sampled with rng; the posterior mean when None) and, with
        gan=True, discriminator logits: g_logits = D_sg(recon) (stop-gradient discriminator:
        its gradient reaches only the VAE), d_real = D(x), d_fake = D(sg(recon)) (gradient
        reaches only the discriminator)."""
        recon, mean, logvar = self.vae(x, rng)
        out = {"recon": recon, "mean": mean, "logvar": logvar}
        if gan:
            out["g_logits"] = discriminator.frozen(self.disc)(recon)
            out["d_real"] = self.disc(x)
            out["d_fake"] = self.disc(jax.lax.stop_gradient(recon))
        return out

    def null_cond(self, cond: dict) -> dict:
        return {}
