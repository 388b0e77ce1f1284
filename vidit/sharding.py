"""Device mesh and logical-axis sharding.

Every parameter and activation names its dimensions with *logical* axes ("embed", "heads",
"activation_batch", ...). One rules table (in the config) maps each logical axis to zero or more
*mesh* axes. Changing the parallelism layout of a run is therefore a config change, never a model
change. This is the maxtext scheme.
"""
from __future__ import annotations

import contextlib
import math
import threading
from typing import Any, Iterable, Sequence

import flax
import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# Variables are sharded by our jit's out_shardings, not eagerly at creation: creation then works
# the same with or without a mesh, and abstract init (eval_shape) stays cheap.
flax.config.update("flax_always_shard_variable", False)

MESH_AXES = ("data", "fsdp", "tensor", "sequence")
BATCH_AXES = ("data", "fsdp")  # the global batch is split over these mesh axes

# The default rules table. Order matters: a mesh axis is used at most once per array, by the first
# logical axis (left to right in the array) that claims it.
DEFAULT_RULES = (
    # parameters
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("patch", None),
    ("vocab", None),
    ("position", None),
    ("norm", None),
    ("layers", None),
    ("cond", None),
    # activations
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", "sequence"),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_kv", None),
    ("activation_text", None),
)


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key to change."""


def mesh_shape(mesh_cfg: Any, num_devices: int) -> dict[str, int]:
    """Resolves axis sizes (one of them may be -1 = the rest) against the device count."""
    sizes = {axis: int(mesh_cfg.get(axis, 1)) for axis in MESH_AXES}
    unknown = [axis for axis, size in sizes.items() if size == -1]
    if len(unknown) > 1:
        raise ConfigError(f"mesh: only one axis may be -1, got {unknown}")
    known = math.prod(size for size in sizes.values() if size != -1)
    if any(size == 0 or size < -1 for size in sizes.values()):
        raise ConfigError(f"mesh: axis sizes must be positive or -1, got {sizes}")
    if unknown:
        if num_devices % known:
            raise ConfigError(
                f"mesh: the fixed axes {sizes} (product {known}) do not divide the "
                f"{num_devices} devices; change config.mesh.{'/'.join(MESH_AXES)}")
        sizes[unknown[0]] = num_devices // known
    elif known != num_devices:
        raise ConfigError(
            f"mesh: axis sizes {sizes} multiply to {known} but there are {num_devices} devices; "
            f"set one of config.mesh.{'/'.join(MESH_AXES)} to -1 to take the rest")
    return sizes


def make_mesh(mesh_cfg: Any, devices: Sequence[Any] | None = None) -> Mesh:
    """A Mesh with axes (data, fsdp, tensor, sequence) from config.mesh."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(mesh_cfg, len(devices))
    shape = tuple(sizes[axis] for axis in MESH_AXES)
    try:  # topology-aware device order on real TPU slices
        grid = jax.experimental.mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # pylint: disable=broad-except  (CPU, odd shapes: plain order is fine)
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def logical_to_spec(names: Iterable[str | None] | None, rules: Sequence[tuple]) -> P:
    """Maps logical axis names to a PartitionSpec; each mesh axis is used at most once."""
    if names is None:
        return P()
    table: dict[str, tuple[str, ...]] = {}
    for logical, mesh_axes in rules:
        if logical in table:
            continue
        if mesh_axes is None:
            table[logical] = ()
        elif isinstance(mesh_axes, str):
            table[logical] = (mesh_axes,)
        else:
            table[logical] = tuple(mesh_axes)
    used: set[str] = set()
    spec = []
    for name in names:
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise ConfigError(f"logical axis '{name}' has no entry in config.sharding_rules")
        axes = tuple(a for a in table[name] if a not in used)
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else (axes or None))
    return P(*spec)


def _drop_trivial(spec: P, mesh: Mesh) -> P:
    """Removes mesh axes of size 1 so specs print (and compare) cleanly."""
    out = []
    for entry in spec:
        axes = (entry,) if isinstance(entry, str) else (entry or ())
        axes = tuple(a for a in axes if mesh.shape[a] > 1)
        out.append(axes[0] if len(axes) == 1 else (axes or None))
    return P(*out)


def spec_for_shape(names, shape, mesh: Mesh, rules) -> P:
    """Like logical_to_spec, but leaves a dimension unsharded where it does not divide."""
    spec = _drop_trivial(logical_to_spec(names, rules), mesh)
    fixed = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        axes = (entry,) if isinstance(entry, str) else (entry or ())
        size = math.prod(mesh.shape[a] for a in axes)
        fixed.append(entry if size and dim % size == 0 else None)
    return P(*fixed)


# ---------------------------------------------------------------------------------------------
# Activation constraints: the model calls `constrain(x, names)`; it is a no-op outside `use()`.
_CONTEXT = threading.local()


@contextlib.contextmanager
def use(mesh: Mesh, rules: Sequence[tuple]):
    """Makes `constrain` active for code traced inside this block."""
    previous = getattr(_CONTEXT, "value", None)
    _CONTEXT.value = (mesh, tuple(tuple(r) for r in rules))
    try:
        with jax.set_mesh(mesh):
            yield
    finally:
        _CONTEXT.value = previous


def current() -> tuple[Mesh, tuple] | None:
    """(mesh, rules) of the enclosing `use()` block, or None outside one."""
    return getattr(_CONTEXT, "value", None)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Pins an activation's layout by logical names (GSPMD otherwise guesses)."""
    context = getattr(_CONTEXT, "value", None)
    if context is None:
        return x
    mesh, rules = context
    spec = spec_for_shape(names, x.shape, mesh, rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


# ---------------------------------------------------------------------------------------------
# Parameters: logical names live in the nnx Variable metadata ("out_sharding").
def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def logical_names(state: nnx.State) -> dict:
    """Pure dict (same structure as nnx.to_pure_dict) of each parameter's logical axis names."""
    names = jax.tree.map(lambda v: _Names(v.get_metadata().get("out_sharding")), state,
                         is_leaf=_is_variable)
    return jax.tree.map(lambda n: n.value, nnx.to_pure_dict(names),
                        is_leaf=lambda x: isinstance(x, _Names))


class _Names:
    """Opaque leaf so tuples of names are not flattened by tree utilities."""

    def __init__(self, value):
        self.value = value


def tree_shardings(shapes: Any, names: Any, mesh: Mesh, rules) -> Any:
    """NamedShardings for a tree of arrays (or ShapeDtypeStructs) given a tree of logical names."""
    return jax.tree.map(
        lambda s, n: NamedSharding(mesh, spec_for_shape(n, s.shape, mesh, rules)),
        shapes, names, is_leaf=lambda x: isinstance(x, tuple) or x is None)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Batch arrays are split over (data, fsdp) on their leading dimension."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def batch_shards(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch(global_batch: int, mesh: Mesh) -> None:
    shards = batch_shards(mesh)
    if global_batch % shards:
        raise ConfigError(
            f"config.data.batch_size={global_batch} does not divide over the batch mesh axes "
            f"data x fsdp = {shards}; use a multiple of {shards}")
