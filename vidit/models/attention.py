"""Attention backends behind one table, chosen by config.model.attention.

Every backend takes q [B, Nq, H, D], k/v [B, Nk, H, D] and an optional key mask [B, Nk]
(True = attend) and returns [B, Nq, H, D]. `BACKENDS` says for each one where it runs, whether
jax.jvp can go through it (MeanFlow and distillation differentiate the model forward), and
whether it must run per shard inside shard_map (a kernel GSPMD cannot partition); the start-up
checks and sequence parallelism (context_parallel.py) read the table. Adding a backend is its
function plus one row.

- `chunked` (default): queries in blocks of `CHUNK`, each block rematerialised in the backward
  pass, so activation memory grows linearly with sequence length; up to CHUNK queries it is
  `dense`.
- `dense`: materialises all [Nq, Nk] logits. Like `chunked` it uses the core below, whose
  derivative is written by hand (tests check it against autodiff of the plain formula).
- `xla`: jax.nn.dot_product_attention (the same call takes cuDNN's flash path on GPU).
- `cudnn`: the same jax.nn call forced onto cuDNN's fused flash kernel (GPU only, bf16/f16).
- `splash`: the Pallas TPU splash-attention kernel (TPU only), run per shard. Key masks (the
  short text cross-attention) go to `xla` instead.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from vidit.errors import ConfigError

SPLASH_BLOCK = 512
# Query block of `chunked`: DiT-S's 1024 tokens take one block, with no lax.map and no
# recompute, which on CPU is faster than smaller blocks (docs/speed).
CHUNK = 1024


def _heads_first(x):
    return x.transpose(0, 2, 1, 3)  # [B, N, H, D] <-> [B, H, N, D]


def _softmax(logits, mask):
    if mask is not None:
        logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    logits = logits - logits.max(axis=-1, keepdims=True)  # a constant shift, for range only
    weights = jnp.exp(logits)
    return weights / weights.sum(axis=-1, keepdims=True)


_F32 = dict(preferred_element_type=jnp.float32)


@jax.custom_jvp
def _softmax_attend(q, k, v, mask):
    """q [B,H,Nq,D] (already scaled), k/v [B,H,Nk,D] -> [B,H,Nq,D], softmax in f32.

    The derivative is written by hand (below) as a JVP, the form that both jax.jvp (MeanFlow)
    and reverse mode (JAX transposes it) use. Autodiff of the forward would differentiate the
    max-shift, exp, sum and divide as separate passes over the [Nq, Nk] weights; the hand rule
    needs one: dP = P * (dS - rowsum(P * dS)), which is faster (docs/speed).
    """
    return _weights_and_out(q, k, v, mask)[1]


def _weights_and_out(q, k, v, mask):
    p = _softmax(jnp.einsum("bhqd,bhkd->bhqk", q, k, **_F32), mask)
    return p, jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), v, **_F32).astype(v.dtype)


@_softmax_attend.defjvp
def _softmax_attend_jvp(primals, tangents):
    q, k, v, mask = primals
    dq, dk, dv, _ = tangents  # the mask is boolean: no tangent
    p, out = _weights_and_out(q, k, v, mask)
    ds = (jnp.einsum("bhqd,bhkd->bhqk", dq, k, **_F32)
          + jnp.einsum("bhqd,bhkd->bhqk", q, dk, **_F32))
    dp = p * (ds - jnp.sum(p * ds, axis=-1, keepdims=True))
    dout = (jnp.einsum("bhqk,bhkd->bhqd", dp.astype(v.dtype), v, **_F32)
            + jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), dv, **_F32))
    return out, dout.astype(v.dtype)


def dense_attention(q, k, v, mask=None):
    scale = jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    out = _softmax_attend(_heads_first(q) * scale, _heads_first(k), _heads_first(v), mask)
    return _heads_first(out)


def chunked_attention(q, k, v, mask=None, chunk: int = CHUNK):
    """Exact attention computed one block of queries at a time (lax.map + remat per block)."""
    b, n, h, d = q.shape
    if n <= chunk:
        return dense_attention(q, k, v, mask)
    blocks = -(-n // chunk)
    scale = jnp.asarray(d ** -0.5, q.dtype)
    qh = _heads_first(q) * scale
    qh = jnp.pad(qh, ((0, 0), (0, 0), (0, blocks * chunk - n), (0, 0)))
    qh = qh.reshape(b, h, blocks, chunk, d).transpose(2, 0, 1, 3, 4)
    kh, vh = _heads_first(k), _heads_first(v)
    attend = jax.checkpoint(lambda qb: _softmax_attend(qb, kh, vh, mask))
    out = jax.lax.map(attend, qh)  # [blocks, B, H, chunk, D]
    out = out.transpose(1, 2, 0, 3, 4).reshape(b, h, blocks * chunk, d)[:, :, :n]
    return _heads_first(out)


def xla_attention(q, k, v, mask=None):
    if mask is not None:
        mask = mask[:, None, None, :]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")


def cudnn_attention(q, k, v, mask=None):
    if mask is not None:
        mask = mask[:, None, None, :]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")


def splash_attention(q, k, v, mask=None):
    """Pallas splash attention on one device's shard (call it inside shard_map on a mesh)."""
    if mask is not None:  # cross-attention to a few padded text tokens: not worth a kernel
        return xla_attention(q, k, v, mask)
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    b, n, h, d = q.shape
    nk = k.shape[1]
    # Token counts that are not multiples of the kernel's blocks (Wan's 21 x 30 x 52 = 32760)
    # are padded with zeros; segment ids keep real queries on real keys (padded queries see
    # only padded keys: finite, and cut off below).
    block = 128 if max(n, nk) <= SPLASH_BLOCK else SPLASH_BLOCK
    pn, pk = -(-n // block) * block, -(-nk // block) * block
    segments = None
    if (pn, pk) != (n, nk):
        pad = lambda x, m: jnp.pad(x, ((0, 0), (0, m - x.shape[1]), (0, 0), (0, 0)))  # noqa
        q, k, v = pad(q, pn), pad(k, pk), pad(v, pk)
        ids = lambda m, real: (jnp.arange(m) >= real).astype(jnp.int32)  # noqa: E731
        segments = splash.SegmentIds(q=ids(pn, n), kv=ids(pk, nk))
    block_q, block_kv = _divisor(pn, SPLASH_BLOCK), _divisor(pk, SPLASH_BLOCK)
    sizes = splash.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
                              block_q_dkv=block_q, block_kv_dkv=block_kv,
                              block_kv_dkv_compute=block_kv, block_q_dq=block_q,
                              block_kv_dq=block_kv)
    mask_lib = splash.MultiHeadMask([splash.FullMask((pn, pk))] * h)
    kernel = splash.make_splash_mha(mask_lib, block_sizes=sizes, head_shards=1, q_seq_shards=1)
    scale = jnp.asarray(d ** -0.5, q.dtype)
    args = (_heads_first(q) * scale, _heads_first(k), _heads_first(v))
    if segments is None:
        out = jax.vmap(kernel)(*args)
    else:
        out = jax.vmap(kernel, in_axes=(0, 0, 0, None))(*args, segments)
    return _heads_first(out)[:, :n]


def _divisor(n: int, most: int) -> int:
    """The largest multiple of 128 that divides n and is at most `most`."""
    return max(b for b in range(128, min(n, most) + 1, 128) if n % b == 0)


@dataclasses.dataclass(frozen=True)
class Backend:
    fn: Callable  # (q, k, v, mask=None) -> out
    platforms: tuple[str, ...]  # jax platforms it runs on
    jvp: bool  # jax.jvp works through it (a custom_vjp kernel has no JVP rule)
    per_shard: bool = False  # GSPMD cannot partition it: run inside shard_map on a mesh


ANY = ("cpu", "gpu", "tpu")
BACKENDS = {
    "chunked": Backend(chunked_attention, ANY, jvp=True),
    "dense": Backend(dense_attention, ANY, jvp=True),
    "xla": Backend(xla_attention, ANY, jvp=True),
    "cudnn": Backend(cudnn_attention, ("gpu",), jvp=False),
    "splash": Backend(splash_attention, ("tpu",), jvp=False, per_shard=True),
}


def lookup(name: str) -> Backend:
    """The table row of config.model.attention = name."""
    if name not in BACKENDS:
        raise ConfigError(f"config.model.attention='{name}' is not one of {tuple(BACKENDS)}")
    return BACKENDS[name]


def attention(q, k, v, mask=None, *, backend: str = "chunked"):
    return lookup(backend).fn(q, k, v, mask)
