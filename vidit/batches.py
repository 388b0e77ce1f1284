"""Batches between this process and the mesh: its rows -> global sharded arrays, and back.

Every process of a multi-host job reads its own rows of each global batch (the Grain pipeline,
data_pipelines/pipeline.py); `global_batch` assembles them into one array sharded over the batch
mesh axes, and `to_host` brings (replicated or sharded) results back as numpy on every process.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from vidit import sharding


def global_batch(local: dict, mesh) -> dict:
    """This process's rows -> global arrays sharded over the batch axes."""
    return {k: jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, v.ndim), v)
            for k, v in local.items()}


def to_host(tree: Any) -> Any:
    """numpy copies of (replicated or sharded) global arrays, on every process."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(tree, tiled=True)


def abstract_batch(config: Any, mesh) -> dict:
    """Shapes, dtypes and shardings of one global training batch as the pipeline delivers it
    (for AOT lowering)."""
    d, m = config.data, config.model
    b, length = d.batch_size, m.text_len
    shapes = {"video": ((b, d.num_frames, d.height, d.width, d.channels), jnp.float32),
              "label": ((b,), jnp.int32), "text_mask": ((b, length), jnp.bool_)}
    te = m.get("text_encoder", {})
    if m.cond == "text" and te.get("kind", "byte") != "byte" and not te.get("online", False):
        shapes["text_embedding"] = ((b, length, m.text_width), jnp.float32)  # cached
    else:
        shapes["text"] = ((b, length), jnp.int32)
    return {k: jax.ShapeDtypeStruct(shape, dtype,
                                    sharding=sharding.batch_sharding(mesh, len(shape)))
            for k, (shape, dtype) in shapes.items()}
