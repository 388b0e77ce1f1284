"""AOT compilation for TPU slices on this CPU machine (libtpu, no TPU): `vidit.compile` lowers the
real train step, the splash-attention kernel included, and reports per-chip memory."""
import os

import pytest

from configs import dit_1b
from vidit import compile as compile_lib
from vidit import config_lib
from vidit.errors import ConfigError

os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # quiets libtpu's host probing


def tiny_pod_config(attention="splash", **mesh):
    c = dit_1b.get_config()
    config_lib.set_size(c.model, "tiny")
    c.model.text_width, c.model.text_depth, c.model.text_heads = 64, 1, 2
    c.model.attention = attention
    c.data.num_frames, c.data.height, c.data.width = 8, 32, 32  # 8 x 16 x 16 = 2048 tokens
    c.data.batch_size = 4
    c.mesh = dict(data=1, fsdp=-1, tensor=1, sequence=1) | mesh
    return c


@pytest.mark.slow
def test_splash_train_step_compiles_for_v5p_with_ulysses():
    c = tiny_pod_config(fsdp=2, sequence=2)
    compiled, setup = compile_lib.compile_step(c, "v5p:2x2x1")
    text = compiled.as_text()
    assert "tpu_custom_call" in text  # the Pallas splash kernel, not an XLA fallback
    assert "all-to-all" in text  # Ulysses' head <-> token exchange
    assert dict(setup.mesh.shape)["sequence"] == 2


@pytest.mark.slow
def test_compile_report_fits_and_counts():
    r = compile_lib.compile_report(tiny_pod_config("chunked"), "v5p:2x2x1")
    assert r["chips"] == 4 and r["fits"]
    m = r["per_chip_gib"]
    # FSDP over 4 chips: each holds a quarter of the f32 weights (plus small replicated leaves).
    full_gib = r["params"] * 4 / 2**30
    assert full_gib / 4 <= m["params"] < full_gib / 2
    assert m["optimizer"] == pytest.approx(2 * m["params"], rel=0.01)  # Adam's mu and nu
    assert m["total"] >= m["params"] + m["ema"] + m["optimizer"]
    assert r["step_time_s"] > 0 and r["tokens_per_s"] > 0
    assert "FITS" in compile_lib.format_report(r)


def test_libtpu_held_by_another_process_is_named(monkeypatch):
    from jax.experimental import topologies

    def held(**kwargs):
        raise RuntimeError("ABORTED: Internal error when accessing libtpu multi-process lockfile.")

    monkeypatch.setattr(topologies, "get_topology_desc", held)
    with pytest.raises(RuntimeError, match="another process .* ALLOW_MULTIPLE_LIBTPU_LOAD=1"):
        compile_lib.topology_devices("v5p:2x2x1")


def test_unknown_chip_is_rejected():
    with pytest.raises(ConfigError, match="not one of"):
        compile_lib.topology_devices("v9x:2x2")


def test_frozen_t5_encoder_compiles_on_the_mesh():
    """--text_encoder: the frozen T5's forward over one global caption batch, bf16, its weights
    sharded by the same rules; FLOPs and parameters as its config implies."""
    folder = os.path.join(os.path.dirname(__file__), "fixtures", "text_encoders", "t5_tiny")
    c = tiny_pod_config("chunked")
    c.model.text_width, c.model.text_len, c.data.batch_size = 32, 64, 8
    e = compile_lib.compile_text_encoder(c, "v5p:2x2x1", folder)
    d, ff, layers, vocab = 32, 48, 2, 64
    per_layer = 4 * d * d + 3 * d * ff + 2 * d  # q k v o, wi_0 wi_1 wo, two RMSNorm scales
    assert e["params"] == vocab * d + layers * per_layer + d + 32 * 4  # + final norm, bias table
    assert e["fits"] and e["dtype"] == "bfloat16"
    assert e["params_gib_per_chip"] < e["params"] * 2 / 2**30 / 2  # sharded over 4 chips
    matmuls = 8 * (2 * (e["params"] - vocab * d) * 64 + layers * 4 * 64**2 * 4 * 8)
    assert e["model_flops_per_batch"] == matmuls
    assert e["compiled_flops_per_chip"] * 4 >= 0.9 * matmuls
    assert e["replication"] == e["compiled_flops_per_chip"] * 4 / matmuls
    c.model.text_width = 4096
    with pytest.raises(ConfigError, match="32 wide"):
        compile_lib.compile_text_encoder(c, "v5p:2x2x1", folder)
    with pytest.raises(ConfigError, match="umt5-xxl"):
        compile_lib.compile_text_encoder(c, "v5p:2x2x1", "no-such-encoder")


def test_layout_search_ranks_fitting_layouts_by_roofline_mfu(monkeypatch):
    """--search: every tensor x sequence split, then other remat policies and batches for the
    best two; refused and non-fitting layouts rank last; the batch grows to one clip per batch
    shard. (The compiler is replaced by a table here; the real one runs in docs/compile.)"""
    seen = []

    def fake_report(c, topology, num_slices=1):
        t, s, remat, b = c.mesh.tensor, c.mesh.sequence, c.model.remat, c.data.batch_size
        seen.append((t, s, remat, b))
        assert b % (16 // (t * s)) == 0  # divides over data x fsdp
        if s == 4:
            raise ConfigError("heads do not divide over sequence=4")
        mfu = {1: 0.3, 2: 0.5}[s] + (0.1 if remat == "none" else 0) + (0.05 if t == 2 else 0)
        # Pretend the unsplit layout, and remat 'none' above 4 clips, run out of memory.
        fits = not (t == 1 and s == 1) and not (remat == "none" and b > 4)
        return {"mesh": {"tensor": t, "sequence": s}, "fits": fits,
                "per_chip_gib": {"total": 10.0}, "tokens_per_clip": 64,
                "roofline": {"step_s": 1.0, "mfu": mfu, "mfu_overlapped": mfu + 0.1,
                             "bound": "compute", "compute_s": 1.0, "hbm_s": 0.1,
                             "ici_s": 0.1, "dcn_s": 0.0, "top_collective": "all-gather"}}

    monkeypatch.setattr(compile_lib, "compile_report", fake_report)
    monkeypatch.setattr(compile_lib, "topology_devices", lambda name, n=1: list(range(16)))
    c = tiny_pod_config("chunked")
    c.data.batch_size = 2
    rows = compile_lib.search_layouts(c, "v5p:2x2x4", max_split=4, log=lambda line: None)
    best = rows[0]
    assert (best["tensor"], best["sequence"], best["remat"]) == (2, 2, "none")
    assert best["mfu"] == pytest.approx(0.65)
    assert best["global_batch"] >= 4  # 16 chips / (2 x 2) = 4 batch shards
    assert any("error" in r and "sequence=4" in r["error"] for r in rows)
    assert not rows[-1].get("fits")
    assert len([s for s in seen if s[2] == c.model.remat]) >= 9  # the whole 3 x 3 grid
    assert {"full", "dots_saveable", "none"} <= {s[2] for s in seen}
    assert "refused" in compile_lib._search_line(rows[-1]) or not rows[-1]["fits"]
    # A remat policy that runs out of memory is retried at half the batch until it fits.
    i = seen.index((2, 2, "none", 8))
    assert seen[i + 1] == (2, 2, "none", 4)


@pytest.mark.slow
def test_every_bucket_is_compiled_and_reported():
    c = tiny_pod_config("chunked")
    c.data.buckets = "8x32x32:4, 4x32x64:4, 1x64x64:8"
    buckets = compile_lib.bucket_reports(c, "v5p:2x2x1")
    assert list(buckets) == ["8x32x32", "4x32x64", "1x64x64"]
    assert all(b["fits"] and b["per_chip_gib"] > 0 for b in buckets.values())
    assert buckets["4x32x64"]["tokens_per_clip"] == buckets["8x32x32"]["tokens_per_clip"]
    assert "bucket 1x64x64" in compile_lib.format_report(
        compile_lib.compile_report(c, "v5p:2x2x1") | {"buckets": buckets})
