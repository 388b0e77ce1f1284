"""A BERT encoder (all-MiniLM-L6-v2, the offline default frozen text encoder).

It computes what Hugging Face `transformers`' `BertModel` computes (tests/test_text_encoders.py
checks it against the real all-MiniLM-L6-v2 weights):

  x = LayerNorm(word_embed(ids) + position_embed(0..L-1) + token_type_embed(0))
  per layer (post-LN):  x = LayerNorm(x + out(SelfAttention(x)))            (logits / sqrt(d))
                        x = LayerNorm(x + down(gelu_erf(up(x))))
  sentence vector = mean of x over the mask, L2-normalised (sentence-transformers' pooling)

Every Dense has a bias; LayerNorm has a scale and a bias (eps from the config, 1e-12).
`params_from_hf` maps a Hugging Face BERT checkpoint's tensors onto this module's tree.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vidit import sharding
from vidit.errors import ConfigError
from vidit.models import layers


@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden: int
    num_layers: int
    num_heads: int
    intermediate: int
    max_positions: int = 512
    type_vocab_size: int = 2
    eps: float = 1e-12
    dtype: str = "float32"
    param_dtype: str = "float32"

    @classmethod
    def from_hf(cls, hf: dict, **kw) -> "BertConfig":
        if hf.get("model_type", "bert") != "bert":
            raise ConfigError(f"a BERT text encoder needs a 'bert' checkpoint, this config.json "
                              f"has model_type={hf.get('model_type')!r}")
        if hf.get("hidden_act", "gelu") != "gelu":
            raise ConfigError(f"hidden_act={hf['hidden_act']!r}: vidit's BERT uses erf GELU")
        return cls(vocab_size=hf["vocab_size"], hidden=hf["hidden_size"],
                   num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
                   intermediate=hf["intermediate_size"],
                   max_positions=hf.get("max_position_embeddings", 512),
                   type_vocab_size=hf.get("type_vocab_size", 2),
                   eps=hf.get("layer_norm_eps", 1e-12), **kw)


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, rngs, param_dtype):
        self.scale = layers.param(rngs, nnx.initializers.ones, (dim,), ("norm",), param_dtype)
        self.bias = layers.param(rngs, nnx.initializers.zeros, (dim,), ("norm",), param_dtype)
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, -1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), -1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...].astype(jnp.float32)
                + self.bias[...].astype(jnp.float32)).astype(x.dtype)


class Layer(nnx.Module):
    def __init__(self, cfg: BertConfig, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        h, d = cfg.num_heads, cfg.hidden // cfg.num_heads
        self.q = layers.Dense((cfg.hidden,), (h, d), ("embed", "heads", "kv"), **kw)
        self.k = layers.Dense((cfg.hidden,), (h, d), ("embed", "heads", "kv"), **kw)
        self.v = layers.Dense((cfg.hidden,), (h, d), ("embed", "heads", "kv"), **kw)
        self.out = layers.Dense((h, d), (cfg.hidden,), ("heads", "kv", "embed"), **kw)
        self.attn_norm = LayerNorm(cfg.hidden, cfg.eps, rngs=rngs, param_dtype=param_dtype)
        self.up = layers.Dense((cfg.hidden,), (cfg.intermediate,), ("embed", "mlp"), **kw)
        self.down = layers.Dense((cfg.intermediate,), (cfg.hidden,), ("mlp", "embed"), **kw)
        self.ff_norm = LayerNorm(cfg.hidden, cfg.eps, rngs=rngs, param_dtype=param_dtype)

    def __call__(self, x, key_bias):
        q, k, v = self.q(x), self.k(x), self.v(x)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        logits = logits / np.sqrt(q.shape[-1]) + key_bias
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        attn = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        attn = sharding.constrain(
            attn, ("activation_batch", "activation_text", "activation_heads", "activation_kv"))
        x = self.attn_norm(x + self.out(attn))
        return self.ff_norm(x + self.down(jax.nn.gelu(self.up(x), approximate=False)))


class BertEncoder(nnx.Module):
    """(token ids [B, L] int32, mask [B, L] bool) -> hidden states [B, L, hidden]."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        dtype, param_dtype = layers.dtype_of(cfg.dtype), layers.dtype_of(cfg.param_dtype)
        init = nnx.initializers.normal(0.02)
        self.word_embed = layers.param(rngs, init, (cfg.vocab_size, cfg.hidden),
                                       ("vocab", "embed"), param_dtype)
        self.position_embed = layers.param(rngs, init, (cfg.max_positions, cfg.hidden),
                                           ("position", "embed"), param_dtype)
        self.type_embed = layers.param(rngs, init, (cfg.type_vocab_size, cfg.hidden),
                                       ("vocab", "embed"), param_dtype)
        self.embed_norm = LayerNorm(cfg.hidden, cfg.eps, rngs=rngs, param_dtype=param_dtype)
        self.layers = nnx.List([Layer(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
                                for _ in range(cfg.num_layers)])
        self.dtype = dtype

    def __call__(self, ids, mask):
        length = ids.shape[1]
        x = (self.word_embed[...][ids] + self.position_embed[...][:length][None]
             + self.type_embed[...][0][None, None])  # one segment: token type 0
        x = self.embed_norm(x.astype(self.dtype))
        key_bias = jnp.where(mask[:, None, None, :], 0.0, jnp.finfo(jnp.float32).min)
        for layer in self.layers:
            x = layer(x, key_bias)
        return x


def sentence_embedding(hidden, mask):
    """Mean of the token outputs over the mask, L2-normalised (sentence-transformers)."""
    w = mask.astype(jnp.float32)[..., None]
    mean = (hidden.astype(jnp.float32) * w).sum(1) / jnp.maximum(w.sum(1), 1e-9)
    return mean / jnp.maximum(jnp.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)


def params_from_hf(tensors: dict, cfg: BertConfig) -> dict:
    """This module's parameter tree from a Hugging Face BERT checkpoint's tensors (keys with or
    without the 'bert.' prefix; the pooler is not used)."""
    h, d = cfg.num_heads, cfg.hidden // cfg.num_heads

    def get(name):
        for key in (name, f"bert.{name}"):
            if key in tensors:
                return np.asarray(tensors[key])
        raise ConfigError(f"the BERT checkpoint has no tensor {name!r}")

    def dense_in(name):  # torch Linear [out, in] -> [in, heads, d]
        return {"kernel": get(f"{name}.weight").T.reshape(cfg.hidden, h, d),
                "bias": get(f"{name}.bias").reshape(h, d)}

    def dense(name):
        return {"kernel": get(f"{name}.weight").T, "bias": get(f"{name}.bias")}

    def norm(name):
        return {"scale": get(f"{name}.weight"), "bias": get(f"{name}.bias")}

    out = {"word_embed": get("embeddings.word_embeddings.weight"),
           "position_embed": get("embeddings.position_embeddings.weight"),
           "type_embed": get("embeddings.token_type_embeddings.weight"),
           "embed_norm": norm("embeddings.LayerNorm"), "layers": {}}
    for i in range(cfg.num_layers):
        p = f"encoder.layer.{i}"
        out["layers"][i] = {
            "q": dense_in(f"{p}.attention.self.query"),
            "k": dense_in(f"{p}.attention.self.key"),
            "v": dense_in(f"{p}.attention.self.value"),
            "out": {"kernel": get(f"{p}.attention.output.dense.weight").T.reshape(h, d, cfg.hidden),
                    "bias": get(f"{p}.attention.output.dense.bias")},
            "attn_norm": norm(f"{p}.attention.output.LayerNorm"),
            "up": dense(f"{p}.intermediate.dense"),
            "down": dense(f"{p}.output.dense"),
            "ff_norm": norm(f"{p}.output.LayerNorm"),
        }
    return out
