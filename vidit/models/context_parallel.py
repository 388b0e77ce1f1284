"""Sequence (context) parallel self-attention over the mesh axis `sequence`, with shard_map.

Between blocks the tokens of a clip are split over `sequence` (rule activation_length ->
sequence), so MLPs and norms never see the whole sequence. Attention is the one op that needs
every key for every query; config.model.sequence_parallel picks how it gets them:

- `ulysses` (DeepSpeed-Ulysses): an all-to-all turns [B, N/s, H, D] into [B, N, H/s, D] (each
  device holds every token for a slice of the heads), any local backend runs, and a second
  all-to-all turns the result back. Traffic per device does not grow with s; needs the heads on
  each tensor shard (heads / tensor) to divide by s.
- `ring` (ring attention): each device keeps its queries while the key/value blocks travel round
  the ring of s devices (ppermute); every block is folded into an online softmax. No limit from
  the head count, one extra K/V block in memory, s - 1 neighbour exchanges per layer.
- `gspmd`: no manual collectives; XLA's partitioner decides (usually all-gathers K and V).

Outside a mesh with sequence > 1 every strategy is plain attention, except that a kernel GSPMD
cannot partition (`splash`) still runs per shard inside shard_map (batch and head splits only).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from vidit import sharding
from vidit.errors import ConfigError
from vidit.models import attention as attention_lib

STRATEGIES = ("ulysses", "ring", "gspmd")
AXIS = "sequence"
HEADS = ("activation_batch", "activation_length", "activation_heads", "activation_kv")


def check_layout(model_cfg, mesh_shape: dict, tokens: int) -> None:
    """Start-up check that the configured split can work; the error names what to change."""
    strategy = model_cfg.get("sequence_parallel", "ulysses")
    if strategy not in STRATEGIES:
        raise ConfigError(
            f"config.model.sequence_parallel='{strategy}' is not one of {STRATEGIES}")
    seq, tensor = mesh_shape.get(AXIS, 1), mesh_shape.get("tensor", 1)
    if model_cfg.heads % tensor:
        raise ConfigError(
            f"config.model.heads={model_cfg.heads} does not divide over config.mesh.tensor={tensor}")
    if seq == 1:
        return
    if tokens % seq:
        raise ConfigError(
            f"{tokens} tokens per clip do not divide over config.mesh.sequence={seq}; change "
            f"config.mesh.sequence, config.model.patch or the clip size (config.data.*)")
    if strategy == "ulysses" and (model_cfg.heads // tensor) % seq:
        raise ConfigError(
            f"ulysses needs config.model.heads={model_cfg.heads} to divide by config.mesh.tensor="
            f"{tensor} x config.mesh.sequence={seq}; change those, or set "
            f"config.model.sequence_parallel='ring' (no head-count limit)")


def self_attention(q, k, v, *, backend: str, strategy: str):
    """q, k, v [B, N, H, D] (sharded by the HEADS logical names) -> [B, N, H, D]."""
    context = sharding.current()
    if context is None:
        return attention_lib.attention(q, k, v, backend=backend)
    mesh, rules = context
    spec = sharding.spec_for_shape(HEADS, q.shape, mesh, rules)
    if mesh.shape[AXIS] == 1 or strategy == "gspmd":
        if not attention_lib.lookup(backend).per_shard:
            return attention_lib.attention(q, k, v, backend=backend)
        spec = P(spec[0], None, spec[2], None)  # whole sequence per shard; batch/heads split
        return jax.shard_map(functools.partial(attention_lib.attention, backend=backend), mesh=mesh,
                             in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)
    if AXIS not in _axes(spec[1]) or AXIS in _axes(spec[0]) + _axes(spec[2]):
        raise ConfigError(
            f"sequence_parallel='{strategy}' needs the token axis sharded over '{AXIS}' alone; "
            f"config.sharding_rules give q the spec {spec} for shape {q.shape}")
    if strategy == "ulysses":
        local = functools.partial(_ulysses, backend=backend)
    elif strategy == "ring":
        local = functools.partial(_ring, size=mesh.shape[AXIS])
    else:
        raise ConfigError(
            f"config.model.sequence_parallel='{strategy}' is not one of {STRATEGIES}")
    spec = P(*spec)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                         check_vma=False)(q, k, v)


def _axes(entry) -> tuple:
    return (entry,) if isinstance(entry, str) else tuple(entry or ())


def _ulysses(q, k, v, *, backend):
    # [b, n/s, h, d] -> [b, n, h/s, d]: split heads over the ring, gather tokens (in mesh order,
    # which is the global token order because the sequence split is contiguous).
    def to_heads(x):
        return jax.lax.all_to_all(x, AXIS, split_axis=2, concat_axis=1, tiled=True)

    def to_tokens(x):
        return jax.lax.all_to_all(x, AXIS, split_axis=1, concat_axis=2, tiled=True)

    out = attention_lib.attention(to_heads(q), to_heads(k), to_heads(v), backend=backend)
    return to_tokens(out)


def _ring(q, k, v, *, size):
    """Exact softmax attention of local queries against all K/V blocks passed round the ring."""
    scale = jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    qh = q.transpose(0, 2, 1, 3) * scale  # [b, h, n, d]
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    perm = [(i, (i + 1) % size) for i in range(size)]

    def fold(carry, kb, vb):
        out, m, l = carry
        s = jnp.einsum("bhqd,bhkd->bhqk", qh, kb, preferred_element_type=jnp.float32)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.exp(s - m_new[..., None])
        corr = jnp.exp(m - m_new)
        l = l * corr + p.sum(-1)
        out = out * corr[..., None] + jnp.einsum(
            "bhqk,bhkd->bhqd", p.astype(vb.dtype), vb, preferred_element_type=jnp.float32)
        return out, m_new, l

    # Each step is rematerialised in the backward pass, so memory stays linear in N.
    @jax.checkpoint
    def step(_, carry):
        acc, kb, vb = carry
        kb, vb = jax.lax.ppermute((kb, vb), AXIS, perm)
        return fold(acc, kb, vb), kb, vb

    b, h, n, d = qh.shape
    init = (jnp.zeros((b, h, n, d), jnp.float32),
            jnp.full((b, h, n), jnp.finfo(jnp.float32).min, jnp.float32),
            jnp.zeros((b, h, n), jnp.float32))
    acc = fold(init, kh, vh)
    (out, _, l), _, _ = jax.lax.fori_loop(1, size, step, (acc, kh, vh))
    return (out / l[..., None]).astype(q.dtype).transpose(0, 2, 1, 3)
