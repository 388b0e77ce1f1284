"""Multi-slice meshes: config.mesh.dcn_* sizes across slices x the ICI sizes within one.

Shape arithmetic and its errors; on 8 simulated CPU devices (config.mesh.num_slices = 2: two
contiguous groups of 4 act as slices) a 2-slice mesh computes the same loss and gradients as the
plain mesh; and (slow) the train step AOT-compiles for two v5p:2x2x1 slices, whose devices carry
a real slice_index, with the data-parallel gradient all-reduce crossing the slices.
"""
import os

import jax
import numpy as np
import pytest

from tests.test_parallel import config as parallel_config, loss_and_grads
from vidit import sharding
from vidit.errors import ConfigError

os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # quiets libtpu's host probing


def mesh_cfg(**sizes):
    return dict(sharding.MESH_DEFAULTS, fsdp=1) | sizes


@pytest.mark.parametrize("sizes,devices,slices,ici,dcn", [
    # dcn_data=2 over 2 slices of 4: data = 4 (ICI, "the rest") x 2 (DCN)
    (dict(data=-1, dcn_data=2), 8, 2, (4, 1, 1, 1), (2, 1, 1, 1)),
    # the -1 ICI axis takes the rest of one slice's devices, not of all devices
    (dict(fsdp=-1, tensor=2, dcn_data=2, dcn_fsdp=2), 64, 4, (1, 8, 2, 1), (2, 2, 1, 1)),
    # a -1 DCN axis takes the rest of the slices
    (dict(fsdp=-1, dcn_data=-1, dcn_sequence=2), 32, 4, (1, 8, 1, 1), (2, 1, 1, 2)),
    # one slice, no dcn: the old single-slice arithmetic
    (dict(data=2, fsdp=-1), 8, 1, (2, 4, 1, 1), (1, 1, 1, 1)),
    # slices not given: taken from the dcn product
    (dict(sequence=-1, dcn_fsdp=2), 8, None, (1, 1, 1, 4), (1, 2, 1, 1)),
])
def test_hybrid_mesh_shape(sizes, devices, slices, ici, dcn):
    got_ici, got_dcn = sharding.hybrid_mesh_shape(mesh_cfg(**sizes), devices, slices)
    assert tuple(got_ici.values()) == ici and tuple(got_dcn.values()) == dcn
    total = sharding.mesh_shape(mesh_cfg(**sizes), devices, slices)
    assert total == {axis: got_ici[axis] * got_dcn[axis] for axis in sharding.MESH_AXES}
    assert np.prod(list(total.values())) == devices


@pytest.mark.parametrize("sizes,devices,slices,message", [
    (dict(dcn_data=2), 8, 1, r"config.mesh.num_slices=2 to simulate 2 slices.*--num_slices 2"),
    (dict(dcn_data=2), 16, 4, r"multiply to 2 but the devices form 4 slices.*dcn_data=4"),
    (dict(data=3, dcn_data=2), 8, 2, r"multiply to 3 but there are 4 devices of each of the 2"),
    (dict(data=-1, fsdp=3, dcn_data=2), 8, 2, r"do not divide the 4 devices of each"),
    (dict(dcn_data=-1, dcn_fsdp=-1), 8, 2, r"only one of config.mesh.dcn_data/dcn_fsdp"),
    (dict(dcn_tensor=0), 8, 1, r"config.mesh.dcn_data/dcn_fsdp/dcn_tensor/dcn_sequence must be"),
    (dict(dcn_data=-1, data=-1), 8, None, r"-1 needs the number of slices"),
    (dict(data=-1, dcn_data=-1), 9, 2, r"9 devices do not split into 2 equal slices"),
])
def test_bad_dcn_sizes_name_the_keys(sizes, devices, slices, message):
    with pytest.raises(ConfigError, match=message):
        sharding.hybrid_mesh_shape(mesh_cfg(**sizes), devices, slices)


def test_make_mesh_errors_on_cpu_without_simulated_slices(devices):
    with pytest.raises(ConfigError, match="devices without slice_index"):
        sharding.make_mesh(mesh_cfg(data=-1, dcn_data=2))
    with pytest.raises(ConfigError, match="num_slices=3 does not divide the 8"):
        sharding.make_mesh(mesh_cfg(data=-1, dcn_data=-1, num_slices=3))


class _SliceDevice:
    """Stands in for a multi-slice TPU device: only `slice_index` matters to device_slices."""

    def __init__(self, i, slice_index):
        self.id, self.slice_index = i, slice_index


def test_device_slices_from_slice_index_or_simulated(devices):
    fake = [_SliceDevice(i, s) for i, s in enumerate([1, 0, 1, 0])]
    assert [[d.id for d in group] for group in sharding.device_slices(fake)] == [[1, 3], [0, 2]]
    with pytest.raises(ConfigError, match="slice_index says 2 slices"):
        sharding.device_slices(fake, num_slices=4)
    with pytest.raises(ConfigError, match="slices differ in size"):
        sharding.device_slices(fake[:3])
    assert sharding.device_slices(devices) == [list(devices)]
    assert sharding.device_slices(devices, 4) == [list(devices[i:i + 2]) for i in (0, 2, 4, 6)]


def test_simulated_slices_are_contiguous_blocks_of_each_axis(devices):
    # ICI (data 2, sequence 2) in each slice of 4, dcn_sequence = 2: the sequence axis is
    # slice-major, [slice 0's 2 | slice 1's 2], unlike the plain reshape of 8 devices.
    mesh = sharding.make_mesh(mesh_cfg(data=2, sequence=2, dcn_sequence=2, num_slices=2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 1, "sequence": 4}
    ids = np.vectorize(lambda d: d.id)(mesh.devices)[:, 0, 0, :]
    np.testing.assert_array_equal(ids, [[0, 1, 4, 5], [2, 3, 6, 7]])


@pytest.mark.parametrize("strategy,heads,multi,plain", [
    # the case the issue names: data split across 2 slices, tensor x sequence within each
    ("gspmd", 4, dict(dcn_data=2, tensor=2, sequence=2), dict(data=2, tensor=2, sequence=2)),
    # ring attention whose ring crosses the slices (device order differs from the plain mesh)
    ("ring", 2, dict(data=2, sequence=2, dcn_sequence=2), dict(data=2, sequence=4)),
])
def test_two_simulated_slices_give_the_plain_mesh_loss(devices, strategy, heads, multi, plain):
    """Same loss and gradients as the plain 8-device mesh (which test_parallel checks against
    one device), at test_parallel's tolerances."""
    c = parallel_config(strategy, heads)
    loss_multi, grads_multi = loss_and_grads(c, sharding.make_mesh(mesh_cfg(**multi,
                                                                            num_slices=2)))
    loss_plain, grads_plain = loss_and_grads(c, sharding.make_mesh(mesh_cfg(**plain)))
    np.testing.assert_allclose(loss_multi, loss_plain, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6),
                 grads_multi, grads_plain)
    assert any(np.abs(g).max() > 0 for g in jax.tree.leaves(grads_plain))


@pytest.mark.slow
def test_smoke_train_step_compiles_for_two_v5p_slices(monkeypatch):
    from configs import dit_1b
    from vidit import compile as compile_lib
    compiled_steps = []

    def compile_step(*args, **kwargs):  # keeps what compile_report compiled, to look inside
        compiled_steps.append(real_compile_step(*args, **kwargs))
        return compiled_steps[-1]

    real_compile_step = compile_lib.compile_step
    monkeypatch.setattr(compile_lib, "compile_step", compile_step)
    c = dit_1b.get_config("smoke")
    c.mesh.dcn_data = 2
    report = compile_lib.compile_report(c, "v5p:2x2x1", num_slices=2)
    compiled, setup = compiled_steps[0]
    mesh = setup.mesh
    assert dict(mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1, "sequence": 1}
    # data indices 0-3 are slice 0's chips, 4-7 slice 1's: only dcn_data crosses slices
    assert [d.slice_index for d in mesh.devices.flat] == [0] * 4 + [1] * 4
    # the gradient all-reduce over `data` crosses slices: XLA hands it to the DCN runtime
    assert '_xla_megascale_transfer_type="ALL_REDUCE"' in compiled.as_text()
    # the report shows the split
    assert report["chips"] == 8 and report["num_slices"] == 2 and report["fits"]
    assert report["mesh_ici"]["data"] == 4 and report["mesh_dcn"]["data"] == 2
    assert "per slice x DCN {'data': 2" in compile_lib.format_report(report)
    # two slices but no dcn sizes: refused, naming the key to set
    with pytest.raises(ConfigError, match="dcn_data=2"):
        real_compile_step(dit_1b.get_config("smoke"), "v5p:2x2x1", num_slices=2)
