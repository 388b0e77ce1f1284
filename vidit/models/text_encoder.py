"""The byte-level caption encoder, trained jointly with the DiT (config.model.cond = 'text').

Captions are tokenized by vidit/models/byte_tokenizer.py (UTF-8 bytes, no vocabulary file), so
the embedded datasets need nothing downloaded; the encoder learns the rest.
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from vidit.models import byte_tokenizer, layers
from vidit.models.attention import attention
from vidit.models.layers import Dense


class TextBlock(nnx.Module):
    """Pre-LN transformer block for the small caption encoder."""

    def __init__(self, width, heads, *, rngs, dtype, param_dtype):
        head_dim = width // heads
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.qkv = Dense((width,), (3, heads, head_dim), ("embed", None, "heads", "kv"), **kw)
        self.out = Dense((heads, head_dim), (width,), ("heads", "kv", "embed"), **kw)
        self.mlp = layers.Mlp(width, 4 * width, **kw)

    def __call__(self, x, mask, backend):
        qkv = self.qkv(layers.layer_norm(x))
        x = x + self.out(attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], mask, backend=backend))
        return x + self.mlp(layers.layer_norm(x))


class TextEncoder(nnx.Module):
    """Byte tokens -> contextual embeddings [B, L, text_width] and a pooled vector.

    Trained with the DiT (the big systems use a frozen T5; a byte-level encoder keeps the embedded
    dataset self-contained). Token 1 (BOS) is always present, so the null caption is not empty.
    """

    def __init__(self, cfg, *, rngs, dtype, param_dtype):
        width = cfg.text_width
        self.embed = layers.param(rngs, nnx.initializers.normal(0.02),
                                  (byte_tokenizer.VOCAB_SIZE, width), ("vocab", "embed"),
                                  param_dtype)
        self.pos = layers.param(rngs, nnx.initializers.normal(0.02), (cfg.text_len, width),
                                ("position", "embed"), param_dtype)
        self.blocks = nnx.List([TextBlock(width, cfg.text_heads, rngs=rngs, dtype=dtype,
                                          param_dtype=param_dtype)
                                for _ in range(cfg.text_depth)])
        self.dtype = dtype
        self.backend = cfg.attention

    def __call__(self, tokens):
        mask = tokens > 0
        x = (self.embed[...][tokens] + self.pos[...][: tokens.shape[1]]).astype(self.dtype)
        for block in self.blocks:
            x = block(x, mask, self.backend)
        x = layers.layer_norm(x)
        weights = mask.astype(x.dtype)[..., None]
        pooled = (x * weights).sum(1) / jnp.maximum(weights.sum(1), 1)
        return x, mask, pooled
