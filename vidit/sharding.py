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
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vidit.errors import ConfigError

# Variables are sharded by our jit's out_shardings, not eagerly at creation: creation then works
# the same with or without a mesh, and abstract init (eval_shape) stays cheap.
flax.config.update("flax_always_shard_variable", False)

MESH_AXES = ("data", "fsdp", "tensor", "sequence")
DCN_KEYS = tuple(f"dcn_{axis}" for axis in MESH_AXES)
BATCH_AXES = ("data", "fsdp")  # the global batch is split over these mesh axes

# config.mesh: `data` ... `sequence` are sizes within one slice (ICI; one may be -1 = the rest of
# a slice's devices), `dcn_data` ... `dcn_sequence` sizes across slices (DCN; one may be -1 = the
# rest of the slices); each mesh axis is ici x dcn long. `num_slices` is for devices that carry no
# `slice_index` (CPU, GPU, an AOT topology described without slices): 0 = one slice, K = treat K
# contiguous groups of the device list as slices (simulated slices on CPU; hosts on multi-node
# GPU). Multi-slice TPU devices carry `slice_index`; leave it 0 there (if set, it must match).
MESH_DEFAULTS = dict(data=1, fsdp=-1, tensor=1, sequence=1,
                     dcn_data=1, dcn_fsdp=1, dcn_tensor=1, dcn_sequence=1, num_slices=0)

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


def _resolve(sizes: dict[str, int], total: int, prefix: str, what: str) -> dict[str, int]:
    """Fills the one -1 entry of `sizes` (config.mesh.<prefix><axis>) so that they multiply to
    `total` (devices of a slice, or slices); errors name the config keys."""
    sizes = dict(sizes)
    shown = {f"{prefix}{axis}": size for axis, size in sizes.items()}
    keys = "/".join(shown)
    unknown = [axis for axis, size in sizes.items() if size == -1]
    if len(unknown) > 1:
        raise ConfigError(f"mesh: only one of config.mesh.{keys} may be -1, got {shown}")
    if any(size == 0 or size < -1 for size in sizes.values()):
        raise ConfigError(f"mesh: config.mesh.{keys} must be positive or -1, got {shown}")
    known = math.prod(size for size in sizes.values() if size != -1)
    if unknown:
        if total % known:
            raise ConfigError(
                f"mesh: the fixed axes {shown} (product {known}) do not divide the "
                f"{total} {what}; change config.mesh.{keys}")
        sizes[unknown[0]] = total // known
    elif known != total:
        raise ConfigError(
            f"mesh: axis sizes {shown} multiply to {known} but there are {total} {what}; "
            f"set one of config.mesh.{keys} to -1 to take the rest")
    return sizes


def hybrid_mesh_shape(mesh_cfg: Any, num_devices: int,
                      num_slices: int | None = None) -> tuple[dict[str, int], dict[str, int]]:
    """(ICI sizes within a slice, DCN sizes across slices) per mesh axis.

    `num_slices` is how many slices the devices form; None takes it from the dcn_* product
    (then no dcn_* may be -1). The ICI sizes resolve against the devices of one slice.
    """
    dcn = {axis: int(mesh_cfg.get(f"dcn_{axis}", 1)) for axis in MESH_AXES}
    dcn_keys = "/".join(DCN_KEYS)
    product = math.prod(dcn.values())
    if num_slices is None:
        if -1 in dcn.values():
            raise ConfigError(f"mesh: config.mesh.{dcn_keys} = -1 needs the number of slices")
        num_slices = product
    if all(size > 0 for size in dcn.values()) and product != num_slices:
        if num_slices == 1:
            hint = (f"devices without slice_index (CPU, GPU, an AOT topology described without "
                    f"slices) form one slice: set config.mesh.num_slices={product} to simulate "
                    f"{product} slices, pass `vidit.compile --num_slices {product}`, or run on "
                    f"{product} TPU slices")
        else:
            hint = (f"make config.mesh.{dcn_keys} multiply to {num_slices}, e.g. "
                    f"config.mesh.dcn_data={num_slices} (or set one of them to -1)")
        shown = {f"dcn_{axis}": size for axis, size in dcn.items()}
        raise ConfigError(f"mesh: config.mesh {shown} multiply to {product} but the devices form "
                          f"{num_slices} slice{'s' if num_slices > 1 else ''}; {hint}")
    dcn = _resolve(dcn, num_slices, "dcn_", "slices")
    if num_devices % num_slices:
        raise ConfigError(f"mesh: {num_devices} devices do not split into {num_slices} equal "
                          f"slices; change config.mesh.num_slices or config.mesh.{dcn_keys}")
    what = "devices" if num_slices == 1 else f"devices of each of the {num_slices} slices"
    ici = _resolve({axis: int(mesh_cfg.get(axis, 1)) for axis in MESH_AXES},
                   num_devices // num_slices, "", what)
    return ici, dcn


def mesh_shape(mesh_cfg: Any, num_devices: int, num_slices: int | None = None) -> dict[str, int]:
    """Axis sizes (ici x dcn) against the device count; one ICI axis may be -1 = the rest."""
    ici, dcn = hybrid_mesh_shape(mesh_cfg, num_devices, num_slices)
    return {axis: ici[axis] * dcn[axis] for axis in MESH_AXES}


def device_slices(devices: Sequence[Any], num_slices: int = 0) -> list[list[Any]]:
    """The devices grouped by slice, in slice order.

    TPU devices of a multi-slice job carry `slice_index`; others (CPU, GPU, a single slice) form
    one slice, or with num_slices = K > 0, K contiguous groups of the list (simulated slices).
    """
    devices = list(devices)
    num_slices = int(num_slices or 0)
    if num_slices < 0:
        raise ConfigError(f"config.mesh.num_slices={num_slices} must be 0 (from the devices) or "
                          f"positive")
    if hasattr(devices[0], "slice_index"):
        groups: dict[int, list] = {}
        for device in devices:
            groups.setdefault(device.slice_index, []).append(device)
        slices = [groups[k] for k in sorted(groups)]
        if num_slices and num_slices != len(slices):
            raise ConfigError(
                f"config.mesh.num_slices={num_slices} but the devices' slice_index says "
                f"{len(slices)} slices; set config.mesh.num_slices=0 (it is only for devices "
                f"without slice_index)")
        if len({len(group) for group in slices}) > 1:
            raise ConfigError(f"the devices' slices differ in size "
                              f"({[len(group) for group in slices]} devices); a mesh needs "
                              f"equal slices")
        return slices
    num_slices = num_slices or 1
    if len(devices) % num_slices:
        raise ConfigError(f"config.mesh.num_slices={num_slices} does not divide the "
                          f"{len(devices)} devices")
    per = len(devices) // num_slices
    return [devices[i * per:(i + 1) * per] for i in range(num_slices)]


def _device_grid(shape: tuple[int, ...], devices: Sequence[Any]) -> np.ndarray:
    try:  # topology-aware device order on real TPU slices
        return mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # pylint: disable=broad-except  (CPU, odd shapes: plain order is fine)
        return np.asarray(devices).reshape(shape)


def make_mesh(mesh_cfg: Any, devices: Sequence[Any] | None = None) -> Mesh:
    """A Mesh with axes (data, fsdp, tensor, sequence) from config.mesh.

    With more than one slice each axis is dcn x ici long, slice-major: the devices of one slice
    form a contiguous ICI block, and only the dcn_* part of an axis crosses slices.
    """
    devices = list(jax.devices() if devices is None else devices)
    slices = device_slices(devices, mesh_cfg.get("num_slices", 0))
    ici, dcn = hybrid_mesh_shape(mesh_cfg, len(devices), len(slices))
    ici_shape = tuple(ici[axis] for axis in MESH_AXES)
    dcn_shape = tuple(dcn[axis] for axis in MESH_AXES)
    if len(slices) == 1:
        return Mesh(_device_grid(ici_shape, devices), MESH_AXES)
    grid = None
    if hasattr(devices[0], "slice_index"):
        try:
            grid = mesh_utils.create_hybrid_device_mesh(
                ici_shape, dcn_shape, devices=devices)
        except Exception:  # pylint: disable=broad-except  (odd ICI shapes: built below)
            grid = None
    if grid is None:  # what create_hybrid_device_mesh does, with plain order as the fallback
        grids = [_device_grid(ici_shape, group) for group in slices]
        blocks = np.vectorize(lambda i: grids[i], otypes=[object])(
            np.arange(len(slices)).reshape(dcn_shape))
        grid = np.block(blocks.tolist())
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
