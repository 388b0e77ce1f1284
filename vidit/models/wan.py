"""Wan 2.1's text-to-video DiT (Wan Team 2025, "Wan: Open and Advanced Large-Scale Video
Generative Models"), config.model.kind = 'wan', laid out as vidit's DiT is: logical axis names
on every weight, the same attention backends, RoPE, patchify and scan/remat switches.

What makes it Wan's rather than vidit's DiT:
- one time MLP for the whole network: t -> sinusoids -> temb; silu(temb) -> 6 x width
  modulations shared by all blocks, each block adding its own learned offsets
  (`scale_shift_table`); the output head adds its own 2 offsets to temb itself;
- RMSNorm of q and k across all heads at once (one scale per channel of the full width),
  before the heads are split;
- cross-attention to projected text tokens (umT5 embeddings through a 2-layer GELU MLP) after a
  LayerNorm with affine parameters, added to the residual without a gate; no key mask (Wan pads
  captions with zero embeddings and attends to them);
- the 3D RoPE split of Wan over (t, h, w) - vidit's own split - with rotation pairs taken as
  halves of each head (vidit's convention); Wan rotates interleaved pairs, and
  vidit/wan_weights.py permutes q and k's output channels on import so the two agree exactly.

x [B, T, H, W, C] -> prediction [B, T, H, W, C]; t in [0, 1] enters as model.time_scale * t
(Wan's timesteps are 1000 sigma). cond['text_embedding'] [B, L, text_width].
"""
from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from vidit import sharding
from vidit.errors import ConfigError
from vidit.models import attention as attention_lib, layers
from vidit.models.attention import attention
from vidit.models.context_parallel import self_attention
from vidit.models.dit import HEADS, TOKENS, check_stack, make_blocks, run_blocks
from vidit.models.layers import Dense

LN_AFFINE = ("embed",)
# The released text-to-video sizes (Wan2.1-T2V-1.3B / -14B): depth, width, heads, MLP width.
SIZES = {"1.3b": dict(depth=30, width=1536, heads=12, ffn_dim=8960),
         "14b": dict(depth=40, width=5120, heads=40, ffn_dim=13824)}
# What every released Wan 2.1 T2V transformer shares: umT5-XXL text (4096 wide, 512 tokens),
# the Wan VAE's 16 latent channels, 1x2x2 patches, 256 time features.
COMMON = dict(kind="wan", text_width=4096, text_len=512, freq_dim=256, channels=16,
              patch=(1, 2, 2), eps=1e-6, cross_attn_norm=True, rope_theta=10000.0,
              time_scale=1000.0, rope_max_len=1024)


class LayerNorm(nnx.Module):
    """LayerNorm with scale and bias, statistics in float32 (Wan's cross-attention norm)."""

    def __init__(self, width: int, eps: float, *, rngs, param_dtype):
        self.scale = layers.param(rngs, nnx.initializers.ones, (width,), LN_AFFINE, param_dtype)
        self.bias = layers.param(rngs, nnx.initializers.zeros, (width,), LN_AFFINE, param_dtype)
        self.eps = eps

    def __call__(self, x):
        y = layers.layer_norm(x.astype(jnp.float32), self.eps)
        return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


class Attention(nnx.Module):
    """Wan's attention: q/k/v projections (k/v from `context_width` inputs), q and k
    RMS-normalised across heads, output projection."""

    def __init__(self, cfg, context_width: int, *, rngs, dtype, param_dtype):
        width, heads = cfg.width, cfg.heads
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.q = Dense((width,), (width,), ("embed", "mlp"), **kw)
        self.k = Dense((context_width,), (width,), ("embed", "mlp"), **kw)
        self.v = Dense((context_width,), (width,), ("embed", "mlp"), **kw)
        self.out = Dense((width,), (width,), ("mlp", "embed"), **kw)
        # RMSNorm over all heads at once: one scale per channel of the full width.
        norm = dict(names=("embed",), rngs=rngs, param_dtype=param_dtype, eps=cfg.eps)
        self.q_norm, self.k_norm = layers.RMSNorm(width, **norm), layers.RMSNorm(width, **norm)
        self.heads = heads
        self.backend = cfg.attention
        self.strategy = cfg.get("sequence_parallel", "ulysses")

    def _split(self, x):
        return x.reshape(*x.shape[:-1], self.heads, x.shape[-1] // self.heads)

    def __call__(self, x, context=None, rope=None):
        self_attn = context is None
        context = x if self_attn else context
        q = self._split(self.q_norm(self.q(x)))
        k = self._split(self.k_norm(self.k(context)))
        v = self._split(self.v(context))
        if rope is not None:
            q, k = layers.apply_rope(q, *rope), layers.apply_rope(k, *rope)
        if self_attn:
            q, k, v = (sharding.constrain(a, HEADS) for a in (q, k, v))
            y = self_attention(q, k, v, backend=self.backend, strategy=self.strategy)
        else:  # to 512 text tokens: a per-shard kernel (splash) is not worth a shard_map here
            backend = "xla" if attention_lib.lookup(self.backend).per_shard else self.backend
            y = attention(q, k, v, None, backend=backend)
        return self.out(y.reshape(*y.shape[:-2], -1))


class WanBlock(nnx.Module):
    def __init__(self, cfg, *, rngs, dtype, param_dtype):
        width = cfg.width
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.self_attn = Attention(cfg, width, **kw)
        self.cross_norm = (LayerNorm(width, cfg.eps, rngs=rngs, param_dtype=param_dtype)
                           if cfg.cross_attn_norm else None)
        self.cross_attn = Attention(cfg, width, **kw)
        self.mlp = layers.Mlp(width, cfg.ffn_dim, **kw)
        self.modulation = layers.param(  # Wan's scale_shift_table: this block's offsets
            rngs, nnx.initializers.normal(1 / math.sqrt(width)), (6, width), (None, "embed"),
            jnp.float32)
        self.eps = cfg.eps

    def __call__(self, x, modulation, rope, context):
        shift1, scale1, gate1, shift2, scale2, gate2 = jnp.moveaxis(
            self.modulation[...][None] + modulation, 1, 0)  # each [B, width], float32
        norm = lambda h: layers.layer_norm(h.astype(jnp.float32), self.eps)  # noqa: E731
        h = (norm(x) * (1 + scale1[:, None]) + shift1[:, None]).astype(x.dtype)
        x = (x + self.self_attn(h, rope=rope) * gate1[:, None]).astype(x.dtype)
        h = x if self.cross_norm is None else self.cross_norm(x)
        x = x + self.cross_attn(h, context=context)
        h = (norm(x) * (1 + scale2[:, None]) + shift2[:, None]).astype(x.dtype)
        x = (x + self.mlp(h) * gate2[:, None]).astype(x.dtype)
        return sharding.constrain(x, TOKENS)


class WanDiT(nnx.Module):
    """The denoiser: (x_t [B,T,H,W,C], t [B], cond) -> velocity [B,T,H,W,C]."""

    def __init__(self, cfg: Any, *, rngs: nnx.Rngs):
        check_stack(cfg)
        dtype, param_dtype = layers.dtype_of(cfg.dtype), layers.dtype_of(cfg.param_dtype)
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        width = cfg.width
        self.cfg = cfg
        self.patch, self.channels = tuple(cfg.patch), cfg.channels
        patch_dim = math.prod(self.patch) * cfg.channels
        self.patch_embed = Dense((patch_dim,), (width,), ("patch", "embed"), **kw)
        # The time MLP (sinusoids -> width -> width) and the shared 6 x width modulations, kept
        # in float32 as Wan keeps them.
        f32 = dict(rngs=rngs, dtype=jnp.float32, param_dtype=param_dtype)
        self.time_fc1 = Dense((cfg.freq_dim,), (width,), ("cond", "embed"), **f32)
        self.time_fc2 = Dense((width,), (width,), ("mlp", "embed"), **f32)
        self.time_modulation = Dense((width,), (6, width), ("embed", None, "mlp"), **f32)
        self.text_fc1 = Dense((cfg.text_width,), (width,), ("mlp", "embed"), **kw)
        self.text_fc2 = Dense((width,), (width,), ("mlp", "embed"), **kw)
        self.blocks = make_blocks(
            functools.partial(WanBlock, cfg, dtype=dtype, param_dtype=param_dtype), cfg, rngs)
        self.out_modulation = layers.param(
            rngs, nnx.initializers.normal(1 / math.sqrt(width)), (2, width), (None, "embed"),
            jnp.float32)
        self.proj_out = Dense((width,), (patch_dim,), ("embed", "patch"), **kw)
        self.dtype = dtype

    def null_cond(self, cond: dict) -> dict:
        return {}  # a frozen encoder's empty caption is data (vidit/steps.py adds it)

    def __call__(self, x, t, cond: dict | None = None, h=None):
        if h is not None:
            raise ConfigError("the Wan DiT takes no interval h: use the flow objective")
        cond = cond or {}
        tokens, grid = layers.patchify(x.astype(self.dtype), self.patch)
        features = layers.timestep_embedding(t, self.cfg.freq_dim, scale=self.cfg.time_scale)
        temb = self.time_fc2(jax.nn.silu(self.time_fc1(features)))
        modulation = self.time_modulation(jax.nn.silu(temb))  # [B, 6, width], float32
        text = cond["text_embedding"].astype(self.dtype)
        context = self.text_fc2(jax.nn.gelu(self.text_fc1(text), approximate=True))
        h = sharding.constrain(self.patch_embed(tokens), TOKENS)
        rope = layers.rope_angles(grid, self.cfg.width // self.cfg.heads, self.cfg.rope_theta)
        h = run_blocks(self.blocks, lambda block, h: block(h, modulation, rope, context), h,
                       self.cfg)
        shift, scale = jnp.moveaxis(self.out_modulation[...][None] + temb[:, None], 1, 0)
        h = layers.layer_norm(h.astype(jnp.float32), self.cfg.eps)
        h = (h * (1 + scale[:, None]) + shift[:, None]).astype(self.dtype)
        out = self.proj_out(h)
        return layers.unpatchify(out, grid, self.patch, self.channels).astype(jnp.float32)

def build(cfg: Any, seed: int = 0) -> WanDiT:
    return WanDiT(cfg, rngs=nnx.Rngs(params=seed))
