"""vidit.hlo_cost: per-chip FLOPs, HBM bytes and collective bytes read from compiled HLO, loops at
their trip counts; and the roofline vidit.compile builds from them."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vidit import compile as compile_lib
from vidit import flops, hlo_cost

os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")


def compiled_text(f, *args):
    return jax.jit(f).lower(*args).compile().as_text()


def test_a_loop_body_counts_once_per_trip():
    """XLA's cost analysis counts a fori_loop's body once; hlo_cost multiplies it by 7."""
    a = jnp.ones((64, 128), jnp.float32)
    w = jnp.ones((128, 128), jnp.float32)

    def looped(a, w):
        return jax.lax.fori_loop(0, 7, lambda i, x: jnp.tanh(x @ w), a)

    def unrolled(a, w):
        for _ in range(7):
            a = jnp.tanh(a @ w)
        return a

    matmuls = 7 * 2 * 64 * 128 * 128
    looped_cost = hlo_cost.analyze(compiled_text(looped, a, w))
    unrolled_cost = hlo_cost.analyze(compiled_text(unrolled, a, w))
    assert [trips for _, trips, _ in looped_cost.loops] == [7]
    assert looped_cost.flops == pytest.approx(matmuls, rel=0.02)
    assert unrolled_cost.flops == pytest.approx(matmuls, rel=0.02)
    assert looped_cost.transcendentals == 7 * 64 * 128  # tanh, counted apart as XLA does
    xla = jax.jit(looped).lower(a, w).compile().cost_analysis()
    xla = xla[0] if isinstance(xla, (list, tuple)) else xla
    assert xla["flops"] < 0.2 * matmuls  # the undercount this module exists for


def test_a_loop_that_starts_late_runs_fewer_trips():
    x = jnp.ones((32, 32))
    cost = hlo_cost.analyze(compiled_text(
        lambda x: jax.lax.fori_loop(3, 10, lambda i, y: y @ y, x), x))
    assert [trips for _, trips, _ in cost.loops] == [7]


def test_collectives_count_the_bytes_each_chip_sends(devices):
    """An all-gather over 4 chips sends 3/4 of its result; a psum (all-reduce) 2 x 3/4 of its
    operand; chips in two slices of 4 send those over DCN only where a group spans both."""
    mesh = Mesh(np.array(devices).reshape(2, 4), ("a", "b"))

    def step(x):
        def body(x):
            full = jax.lax.all_gather(x, "b", tiled=True)  # [64, 32] per chip, gathered over b
            return jax.lax.psum(full, "b")
        return jax.shard_map(body, mesh=mesh, in_specs=P("a", "b"), out_specs=P("a"))(x)

    x = jax.device_put(jnp.ones((128, 128), jnp.float32), NamedSharding(mesh, P("a", "b")))
    text = compiled_text(step, x)
    result = 64 * 128 * 4  # the gathered [64, 128] f32 block on each chip
    ici = hlo_cost.analyze(text, [0] * 8)
    assert ici.collective_bytes["all-gather"] == pytest.approx(0.75 * result)
    assert ici.collective_bytes["all-reduce"] == pytest.approx(2 * 0.75 * result)
    assert ici.dcn_bytes == 0 and ici.ici_bytes == pytest.approx(2.25 * result)
    # Mesh axis b runs along the device order: slices of 4 consecutive devices hold whole b
    # groups (ICI only); slices that alternate devices split every group (all DCN).
    assert hlo_cost.analyze(text, [0, 0, 0, 0, 1, 1, 1, 1]).dcn_bytes == 0
    split = hlo_cost.analyze(text, [0, 1] * 4)
    assert split.dcn_bytes == pytest.approx(2.25 * result) and split.ici_bytes == 0


@pytest.mark.parametrize("text, groups", [
    ("replica_groups={{0,1},{2,3}}", [[0, 1], [2, 3]]),
    ("replica_groups=[2,2]<=[4]", [[0, 1], [2, 3]]),
    ("replica_groups=[2,2]<=[2,2]T(1,0)", [[0, 2], [1, 3]]),
    ("replica_groups=mesh['x'=2,'y'=2] {'x'}", [[0, 2], [1, 3]]),
    ("replica_groups=mesh['x'=2,'y'=2] {'y'}", [[0, 1], [2, 3]]),
    ("source_target_pairs={{0,1},{1,0}}", [[0, 1], [1, 0]]),
])
def test_replica_groups_in_every_spelling(text, groups):
    assert hlo_cost.replica_groups(text + ", use_global_device_ids=true", 4) == groups


def test_roofline_adds_collectives_to_the_slower_of_compute_and_memory():
    cost = hlo_cost.HloCost(flops=459e12, hbm_bytes=2 * 2765e9, ici_bytes=200e9,
                            collective_bytes={"all-gather": 200e9})
    chip = compile_lib.CHIPS["v5p"]
    r = compile_lib.roofline(cost, chip, model_flops_per_chip=229.5e12)
    assert r["compute_s"] == pytest.approx(1.0) and r["hbm_s"] == pytest.approx(2.0)
    assert r["ici_s"] == pytest.approx(1.0)  # 1200 GB/s bidirectional / 3 dims / 2 = 200 GB/s
    assert r["step_s"] == pytest.approx(3.0) and r["step_s_overlapped"] == pytest.approx(2.0)
    assert r["mfu"] == pytest.approx(0.5 / 3) and r["bound"] == "hbm"
    assert r["top_collective"] == "all-gather" and r["hardware_flops_ratio"] == 2.0
    # A chip without a published DCN figure leaves that term out and says so.
    r = compile_lib.roofline(hlo_cost.HloCost(flops=1e12, dcn_bytes=1e9),
                             compile_lib.CHIPS["v6e"], 1e12)
    assert r["dcn_s"] is None and r["unpriced"] == ["dcn"]


@pytest.mark.slow
def test_scanned_model_flops_match_the_unscanned_compile_and_the_counter():
    """The bar: trip-count-corrected FLOPs of a scanned DiT equal the unscanned model's compiled
    FLOPs (XLA's own count, no loops to miss) and vidit's FLOP counter within 5%."""
    from tests.test_compile import tiny_pod_config
    counts = {}
    for scan in (True, False):
        c = tiny_pod_config("dense", fsdp=4)
        c.model.depth, c.model.width, c.model.heads = 4, 256, 4
        c.model.remat, c.model.scan_layers = "none", scan
        compiled, _ = compile_lib.compile_step(c, "v5p:2x2x1")
        xla = compiled.cost_analysis()
        xla = xla[0] if isinstance(xla, (list, tuple)) else xla
        counts[scan] = (hlo_cost.analyze(compiled.as_text(), [0] * 4), xla["flops"])
    (scanned, xla_scanned), (unscanned, xla_unscanned) = counts[True], counts[False]
    model = flops.train_flops_per_step(c.model, c.data) / 4
    assert scanned.loops and xla_scanned < 0.5 * xla_unscanned  # XLA sees one layer of four
    assert scanned.flops == pytest.approx(xla_unscanned, rel=0.05)
    assert unscanned.flops == pytest.approx(xla_unscanned, rel=0.01)
    assert scanned.flops == pytest.approx(model, rel=0.05)
    # HBM traffic: the same order as XLA's count of the loop-free program.
    assert 0.7 < unscanned.hbm_bytes / xla["bytes accessed"] < 1.3


def test_splash_kernels_are_counted_from_their_shapes():
    """A Pallas splash call is opaque to XLA; its FLOPs come from q and k's shapes."""
    q = hlo_cost.Instr("q", "bf16[2,4,1024,64]{3,2,1,0}", "parameter", [], "", "0")
    k = hlo_cost.Instr("k", "bf16[2,4,2048,64]{3,2,1,0}", "parameter", [], "", "1")
    mask = hlo_cost.Instr("m", "s8[1,4,4]{2,1,0}", "parameter", [], "", "2")
    defs = {i.name: i for i in (q, k, mask)}
    for name, factor in (("splash_mha_fwd_residuals.3", 4), ("splash_mha_dkv_no_residuals", 8)):
        call = hlo_cost.Instr(name, "bf16[2,4,1024,64]", "custom-call", ["m", "q", "k", "k"],
                              'custom_call_target="tpu_custom_call"')
        assert hlo_cost._attention_kernel_flops(call, defs) == factor * 2 * 4 * 1024 * 64 * 2048
