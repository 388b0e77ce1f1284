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
    d = config.data
    shapes = {"video": ((d.batch_size, d.num_frames, d.height, d.width, d.channels), jnp.float32),
              "label": ((d.batch_size,), jnp.int32),
              "text": ((d.batch_size, config.model.text_len), jnp.int32)}
    return {k: jax.ShapeDtypeStruct(shape, dtype,
                                    sharding=sharding.batch_sharding(mesh, len(shape)))
            for k, (shape, dtype) in shapes.items()}
