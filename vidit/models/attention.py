"""Attention backends behind one function, chosen by config.model.attention.

All take q [B, Nq, H, D], k/v [B, Nk, H, D] and an optional key mask [B, Nk] (True = attend).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from vidit import sharding

BACKENDS = ("xla", "dense")


def dense_attention(q, k, v, mask=None):
    """Plain softmax(q k^T / sqrt(d)) v with f32 softmax: the reference every backend must match."""
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", q * jnp.asarray(scale, q.dtype), k,
                        preferred_element_type=jnp.float32)
    if mask is not None:
        logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def xla_attention(q, k, v, mask=None):
    """jax.nn.dot_product_attention (XLA path; the same call takes cuDNN's flash path on GPU)."""
    if mask is not None:
        mask = mask[:, None, None, :]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")


def attention(q, k, v, mask=None, *, backend: str = "xla"):
    if backend == "xla":
        return xla_attention(q, k, v, mask)
    if backend == "dense":
        return dense_attention(q, k, v, mask)
    raise sharding.ConfigError(f"config.model.attention='{backend}' is not one of {BACKENDS}")
