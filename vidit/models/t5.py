"""The T5 v1.1 / umT5 encoder stack (frozen text encoder of Open-Sora 2.0, CogVideoX, Wan).

It computes what Hugging Face `transformers`' `T5EncoderModel` / `UMT5EncoderModel` compute
(tests/test_text_encoders.py checks it against their outputs):

  x = embed(ids)                                       (no absolute positions)
  per block:  x += SelfAttention(RMSNorm(x))           (no 1/sqrt(d) scaling, no biases)
              x += wo(gelu_tanh(wi_0 h) * wi_1 h),  h = RMSNorm(x)       (gated GELU)
  out = RMSNorm(x)

Attention logits get a learned relative-position bias [num_buckets, heads] indexed by a
bidirectional bucket of (key position - query position): half the buckets per direction,
exact below a quarter of them, log-spaced up to `max_distance`. T5 keeps one table (in the
first layer) that every layer reuses; umT5 has a table per layer. Padded keys get the most
negative float added to their logits; padded positions still produce outputs (mask them).
RMSNorm: x * rsqrt(mean(x^2) + eps) in float32, times a learned scale, no mean subtraction.

Parameters carry logical axis names, so the rules table shards a T5-XXL like the DiT.
`params_from_hf` maps a Hugging Face checkpoint's tensors (T5EncoderModel, or a full
T5ForConditionalGeneration / UMT5 model, whose decoder is ignored) onto this module's tree.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vidit import sharding
from vidit.errors import ConfigError
from vidit.models import layers


@dataclasses.dataclass(frozen=True)
class T5Config:
    vocab_size: int
    d_model: int
    d_kv: int
    num_heads: int
    d_ff: int
    num_layers: int
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6
    per_layer_bias: bool = False  # umT5: a relative-position table in every layer
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"

    @classmethod
    def from_hf(cls, hf: dict, **kw) -> "T5Config":
        """From a Hugging Face config.json (model_type 't5' or 'umt5')."""
        kind = hf.get("model_type", "t5")
        if kind not in ("t5", "umt5"):
            raise ConfigError(f"a T5 text encoder needs a 't5' or 'umt5' checkpoint, this "
                              f"config.json has model_type={kind!r}")
        act = hf.get("feed_forward_proj", "relu")
        if act not in ("gated-gelu",):
            raise ConfigError(f"feed_forward_proj={act!r}: vidit's T5 implements T5 v1.1 / umT5 "
                              "(gated-gelu); the original T5's relu FFN is not supported")
        return cls(vocab_size=hf["vocab_size"], d_model=hf["d_model"], d_kv=hf["d_kv"],
                   num_heads=hf["num_heads"], d_ff=hf["d_ff"], num_layers=hf["num_layers"],
                   num_buckets=hf.get("relative_attention_num_buckets", 32),
                   max_distance=hf.get("relative_attention_max_distance", 128),
                   eps=hf.get("layer_norm_epsilon", 1e-6), per_layer_bias=kind == "umt5", **kw)


# The config.json of the XXL encoders video DiTs read captions through (google/t5-v1_1-xxl,
# google/umt5-xxl), by name: shapes for `vidit.compile --text_encoder`, no weights needed.
_XXL = dict(d_model=4096, d_kv=64, num_heads=64, d_ff=10240, num_layers=24,
            feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
            relative_attention_max_distance=128, layer_norm_epsilon=1e-6)
HF_CONFIGS = {
    "t5-v1_1-xxl": dict(_XXL, model_type="t5", vocab_size=32128),  # Open-Sora 2.0, CogVideoX
    "umt5-xxl": dict(_XXL, model_type="umt5", vocab_size=256384),  # Wan 2.1
}


def relative_position_bucket(relative_position, num_buckets: int = 32, max_distance: int = 128):
    """Bidirectional T5 buckets of (key - query) positions, int32, same shape."""
    num_buckets //= 2
    buckets = (relative_position > 0).astype(jnp.int32) * num_buckets
    n = jnp.abs(relative_position)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    # float32 log, as the reference computes it; clipped below at 1 where it is not used
    large = max_exact + (jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / max_exact)
                         / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(is_small, n, large)


class RMSNorm(nnx.Module):
    """T5's layer norm: no mean subtraction, no bias, statistics in float32."""

    def __init__(self, dim: int, eps: float, *, rngs, param_dtype):
        self.scale = layers.param(rngs, nnx.initializers.ones, (dim,), ("norm",), param_dtype)
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + self.eps)
        return (self.scale[...].astype(jnp.float32) * y).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: T5Config, has_bias_table: bool, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, use_bias=False)
        h, d = cfg.num_heads, cfg.d_kv
        self.q = layers.Dense((cfg.d_model,), (h, d), ("embed", "heads", "kv"), **kw)
        self.k = layers.Dense((cfg.d_model,), (h, d), ("embed", "heads", "kv"), **kw)
        self.v = layers.Dense((cfg.d_model,), (h, d), ("embed", "heads", "kv"), **kw)
        self.o = layers.Dense((h, d), (cfg.d_model,), ("heads", "kv", "embed"), **kw)
        self.bias_table = (layers.param(rngs, nnx.initializers.normal(1.0),
                                        (cfg.num_buckets, h), ("position", "heads"),
                                        param_dtype) if has_bias_table else None)

    def __call__(self, x, bias):
        """x [B, L, D], bias [B or 1, H, L, L] (position bias + key mask) -> [B, L, D]."""
        q, k, v = self.q(x), self.k(x), self.v(x)  # [B, L, H, d]
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        weights = jax.nn.softmax(logits + bias, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        return self.o(sharding.constrain(
            out, ("activation_batch", "activation_text", "activation_heads", "activation_kv")))


class Block(nnx.Module):
    def __init__(self, cfg: T5Config, has_bias_table: bool, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, use_bias=False)
        self.attn_norm = RMSNorm(cfg.d_model, cfg.eps, rngs=rngs, param_dtype=param_dtype)
        self.attn = Attention(cfg, has_bias_table, rngs=rngs, dtype=dtype,
                              param_dtype=param_dtype)
        self.ff_norm = RMSNorm(cfg.d_model, cfg.eps, rngs=rngs, param_dtype=param_dtype)
        self.wi_0 = layers.Dense((cfg.d_model,), (cfg.d_ff,), ("embed", "mlp"), **kw)
        self.wi_1 = layers.Dense((cfg.d_model,), (cfg.d_ff,), ("embed", "mlp"), **kw)
        self.wo = layers.Dense((cfg.d_ff,), (cfg.d_model,), ("mlp", "embed"), **kw)

    def __call__(self, x, bias):
        x = x + self.attn(self.attn_norm(x), bias)
        h = self.ff_norm(x)
        return x + self.wo(jax.nn.gelu(self.wi_0(h), approximate=True) * self.wi_1(h))


class T5Encoder(nnx.Module):
    """(token ids [B, L] int32, mask [B, L] bool) -> hidden states [B, L, d_model]."""

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        dtype, param_dtype = layers.dtype_of(cfg.dtype), layers.dtype_of(cfg.param_dtype)
        self.cfg = cfg
        self.embed = layers.param(rngs, nnx.initializers.normal(1.0),
                                  (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), param_dtype)
        self.blocks = nnx.List([
            Block(cfg, cfg.per_layer_bias or i == 0, rngs=rngs, dtype=dtype,
                  param_dtype=param_dtype) for i in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.d_model, cfg.eps, rngs=rngs, param_dtype=param_dtype)
        self.dtype = dtype

    def _position_bias(self, table, length):
        positions = jnp.arange(length)
        buckets = relative_position_bucket(positions[None, :] - positions[:, None],
                                           self.cfg.num_buckets, self.cfg.max_distance)
        return jnp.transpose(table[...][buckets].astype(jnp.float32), (2, 0, 1))[None]

    def __call__(self, ids, mask):
        x = self.embed[...][ids].astype(self.dtype)
        length = ids.shape[1]
        key_mask = jnp.where(mask[:, None, None, :], 0.0, jnp.finfo(jnp.float32).min)
        shared = self._position_bias(self.blocks[0].attn.bias_table, length) + key_mask
        for block in self.blocks:
            bias = shared
            if self.cfg.per_layer_bias:
                bias = self._position_bias(block.attn.bias_table, length) + key_mask
            x = block(x, bias)
        return self.final_norm(x)


def params_from_hf(tensors: dict, cfg: T5Config) -> dict:
    """This module's parameter tree (nested dict of numpy arrays) from a Hugging Face
    checkpoint's tensors {name: array}. Raises ConfigError naming what is missing."""
    h, d, m = cfg.num_heads, cfg.d_kv, cfg.d_model

    def get(name):
        for key in (name, f"encoder.{name}"):
            if key in tensors:
                return np.asarray(tensors[key])
        raise ConfigError(f"the T5 checkpoint has no tensor {name!r}")

    def linear_in(name):  # torch Linear [out, in] -> [in, heads, d]
        return get(name).T.reshape(m, h, d)

    embed = (np.asarray(tensors["shared.weight"]) if "shared.weight" in tensors
             else get("embed_tokens.weight"))
    out = {"embed": embed, "final_norm": {"scale": get("final_layer_norm.weight")},
           "blocks": {}}
    for i in range(cfg.num_layers):
        p = f"block.{i}.layer"
        attn = {"q": {"kernel": linear_in(f"{p}.0.SelfAttention.q.weight")},
                "k": {"kernel": linear_in(f"{p}.0.SelfAttention.k.weight")},
                "v": {"kernel": linear_in(f"{p}.0.SelfAttention.v.weight")},
                "o": {"kernel": get(f"{p}.0.SelfAttention.o.weight").T.reshape(h, d, m)}}
        if cfg.per_layer_bias or i == 0:
            attn["bias_table"] = get(f"{p}.0.SelfAttention.relative_attention_bias.weight")
        out["blocks"][i] = {
            "attn_norm": {"scale": get(f"{p}.0.layer_norm.weight")},
            "attn": attn,
            "ff_norm": {"scale": get(f"{p}.1.layer_norm.weight")},
            "wi_0": {"kernel": get(f"{p}.1.DenseReluDense.wi_0.weight").T},
            "wi_1": {"kernel": get(f"{p}.1.DenseReluDense.wi_1.weight").T},
            "wo": {"kernel": get(f"{p}.1.DenseReluDense.wo.weight").T},
        }
    return out
