"""Every parallel layout computes the unsharded math: loss and gradients of the DiT on 8 simulated
devices (data / fsdp / tensor / sequence with Ulysses, ring and GSPMD attention) equal one device.

Tolerance: rtol 1e-5 on the loss, atol 2e-6 + rtol 1e-4 on gradients (f32; the sharded programs
sum in a different order).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from vidit import config_lib, diffusion, sharding
from vidit.models import context_parallel
from vidit.train_state import Setup
from vidit import checks
from vidit.errors import ConfigError

from tests.helpers import import_benchmark

VIDEO = (2, 4, 8, 8, 1)  # [B, T, H, W, C]; patch (1, 2, 2) -> 64 tokens


def config(strategy, heads=4, attention="chunked"):
    c = config_lib.base_config()
    config_lib.set_size(c.model, "tiny")
    c.model.heads = heads
    c.model.width = 16 * heads
    c.model.patch = (1, 2, 2)
    c.model.attention = attention
    c.model.sequence_parallel = strategy
    c.data.num_frames, c.data.height, c.data.width = VIDEO[1:4]
    return c


def loss_and_grads(c, mesh):
    setup = Setup(c, mesh)
    objective = diffusion.make_objective(c.objective)
    params = jax.device_get(setup.init().params)
    rng = np.random.default_rng(0)
    video = jnp.asarray(rng.uniform(-1, 1, VIDEO).astype(np.float32))
    label = jnp.asarray([3, 7])

    def loss_fn(params, video, label):
        loss, _ = objective.loss(setup.model(params), video, {"label": label},
                                 jax.random.key(1))
        return loss

    shard = NamedSharding(mesh, P(sharding.BATCH_AXES))
    with sharding.use(mesh, c.sharding_rules):
        params = jax.device_put(params, setup.shardings.params)
        fn = jax.jit(jax.value_and_grad(loss_fn))
        loss, grads = fn(params, jax.device_put(video, shard), jax.device_put(label, shard))
    return float(loss), jax.device_get(grads)


@functools.cache
def reference(heads):
    c = config("gspmd", heads)
    return loss_and_grads(c, sharding.make_mesh(dict(data=1), jax.devices()[:1]))


@pytest.mark.parametrize("strategy,heads,layout", [
    ("ulysses", 4, dict(data=2, sequence=4)),
    ("ulysses", 8, dict(tensor=2, sequence=4)),
    ("ring", 2, dict(fsdp=2, tensor=2, sequence=2)),
    ("ring", 2, dict(sequence=8)),
    ("gspmd", 4, dict(data=2, sequence=4)),
    ("gspmd", 4, dict(fsdp=2, tensor=4)),
])
def test_parallel_layout_equals_single_device(strategy, heads, layout):
    loss_1, grads_1 = reference(heads)
    loss_8, grads_8 = loss_and_grads(config(strategy, heads), sharding.make_mesh(layout))
    np.testing.assert_allclose(loss_8, loss_1, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6),
                 grads_8, grads_1)
    assert any(np.abs(g).max() > 0 for g in jax.tree.leaves(grads_1))


def test_ring_attention_matches_dense_directly():
    """The ring kernel alone (values and input gradients) against the dense reference."""
    mesh = sharding.make_mesh(dict(sequence=8))
    rules = config_lib.base_config().sharding_rules
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 64, 3, 8)) for i in range(3))
    weights = jax.random.normal(jax.random.key(3), q.shape)

    def loss(strategy, q, k, v):
        out = context_parallel.self_attention(q, k, v, backend="dense", strategy=strategy)
        return jnp.sum(out * weights)

    with sharding.use(mesh, rules):
        ring = jax.jit(jax.value_and_grad(functools.partial(loss, "ring"), (0, 1, 2)))(q, k, v)
    dense = jax.value_and_grad(functools.partial(loss, "gspmd"), (0, 1, 2))(q, k, v)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), ring, dense)


@pytest.mark.parametrize("overrides,mesh_shape,tokens,message", [
    (dict(sequence_parallel="ulysses", heads=6), dict(tensor=2, sequence=2), 64,
     "sequence_parallel='ring'"),
    (dict(sequence_parallel="ring", heads=2), dict(sequence=8), 60, "do not divide over"),
    (dict(sequence_parallel="allgather"), dict(sequence=2), 64, "is not one of"),
    (dict(heads=3), dict(tensor=2), 64, "config.mesh.tensor=2"),
])
def test_impossible_layouts_are_rejected_naming_the_keys(overrides, mesh_shape, tokens, message):
    c = config("ulysses")
    c.model.update(overrides)
    with pytest.raises(ConfigError, match=message):
        context_parallel.check_layout(c.model, mesh_shape, tokens)


def test_ulysses_with_too_few_heads_fails_at_startup():
    c = config("ulysses", heads=2)
    c.mesh = dict(sequence=8)
    with pytest.raises(ConfigError, match="config.mesh.sequence=8"):
        checks.validate(c, sharding.make_mesh(c.mesh))



@pytest.mark.parametrize("backend", ["splash", "cudnn"])
def test_accelerator_only_backends_are_rejected_on_cpu(backend):
    c = config("gspmd", attention=backend)
    with pytest.raises(ConfigError, match=f"attention='{backend}' runs on"):
        checks.validate(c, sharding.make_mesh(dict(data=-1)))


def test_chunked_attention_memory_grows_linearly():
    """Compiled peak memory at 4x the tokens is <= 5x for chunked, ~16x for dense."""
    attention_memory = import_benchmark("attention_memory")
    chunked = [attention_memory.peak_bytes("chunked", n, 4, 32, 1) for n in (1024, 4096)]
    dense = [attention_memory.peak_bytes("dense", n, 4, 32, 1) for n in (1024, 4096)]
    assert chunked[1] / chunked[0] <= 5
    assert dense[1] / dense[0] > 10
