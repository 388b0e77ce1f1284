"""Shape buckets: parsing, assignment, the step schedule, and the Grain pipeline over the mixed
moving-digits set (every batch one shape, order a pure function of (seed, step))."""
import collections

import numpy as np
import pytest

from data_pipelines import buckets as bl
from configs import moving_digits as md_config
from data_pipelines import data_config, moving_digits as md, pipeline

MIXED = {"num_train": 256, "num_validation": 96, "shapes": "mixed"}


@pytest.fixture(scope="module")
def mixed_cfg(tmp_path_factory):
    cfg = data_config.defaults()
    cfg.data_dir = str(tmp_path_factory.mktemp("mixed"))
    cfg.builder_kwargs = dict(MIXED)
    cfg.buckets = md_config.MIXED_BUCKETS
    md.load_builder(cfg.data_dir, **MIXED)
    return cfg


def test_parse_fills_batches_level_in_tokens_and_rejects_bad_entries():
    got = bl.parse("8x32x32:16, 8x32x48, 1x32x32::0.5", frames=8, height=32, width=32,
                   batch_size=16, multiple=2)
    assert [b.shape for b in got] == [(8, 32, 32), (8, 32, 48), (1, 32, 32)]
    assert [b.batch_size for b in got] == [16, 10, 128]  # 16*32*32/48 = 10.7 -> 10 (even)
    assert [b.weight for b in got] == [1.0, 1.0, 0.5]
    assert bl.parse("", frames=4, height=8, width=16, batch_size=2) == [bl.Bucket(4, 8, 16, 2)]
    for bad in ("8x32", "8x32x32:-1", "axbxc", "8x32x32:1:1:1", "8x32x32:2:0", "8x32x32, 8x32x32"):
        with pytest.raises(bl.BucketError, match="buckets"):
            bl.parse(bad, frames=8, height=32, width=32, batch_size=16)


def test_assign_by_length_aspect_and_area():
    buckets = bl.parse(md_config.MIXED_BUCKETS, frames=8, height=32, width=32, batch_size=8,
                       multiple=8)
    names = [b.name for b in buckets]

    def name(shape, stride=1):
        k = bl.assign(shape, buckets, stride)
        return names[k] if k >= 0 else None

    assert [b.batch_size for b in buckets[:4]] == [8, 8, 8, 16]  # level tokens, multiples of 8
    assert name((16, 64, 64)) == "8x32x32"  # longest bucket that fits, square
    assert name((16, 90, 160)) == "8x32x48"  # 16:9 goes to the wide bucket, not a square crop
    assert name((16, 160, 90)) == "8x48x32"
    assert name((5, 32, 48)) == "4x32x48"
    assert name((1, 40, 60)) == "1x32x48"  # an image: 1-frame buckets only
    assert name((8, 32, 32), stride=2) == "4x32x32"  # 8 frames at stride 2 need 15 stored
    assert name((3, 32, 32)) == "1x32x32"  # too short for 4 frames: its first frame
    assert bl.assign((8, 32, 32), [bl.Bucket(16, 32, 32, 1)]) == -1


def test_schedule_is_pure_contiguous_and_weighted():
    buckets = [bl.Bucket(8, 32, 32, 4, 1.0), bl.Bucket(4, 32, 48, 6, 3.0)]
    sched = bl.Schedule(buckets, [100, 100], seed=5, train=True)
    sched.BLOCK = 64  # several blocks in a short test
    steps = [sched.locate(s) for s in range(1000)]
    rows = collections.defaultdict(list)
    for bucket, offset in steps:  # each bucket's stream is read in order without gaps
        rows[bucket].append(offset)
    for k, offsets in rows.items():
        np.testing.assert_array_equal(offsets, np.arange(len(offsets)) * buckets[k].batch_size)
    share = len(rows[1]) / 1000
    assert 0.7 < share < 0.8, share  # weight 3 of 4
    fresh = bl.Schedule(buckets, [100, 100], seed=5, train=True)
    fresh.BLOCK = 64
    assert [fresh.locate(s) for s in (999, 3, 500)] == [steps[999], steps[3], steps[500]]
    one = bl.Schedule(buckets[:1], [100], seed=5, train=True)
    assert [one.locate(s) for s in (0, 7)] == [(0, 0), (0, 28)]  # the plain pipeline's order
    ev = bl.Schedule(buckets, [9, 13], seed=5, train=False)
    assert len(ev) == 2 + 2 and sorted(ev.locate(i) for i in range(4)) == [
        (0, 0), (0, 4), (1, 0), (1, 6)]


def test_mixed_dataset_stores_native_shapes_and_its_index(mixed_cfg):
    builder = md.load_builder(mixed_cfg.data_dir, **MIXED)
    shapes = bl.record_shapes(builder, "train")
    source = builder.as_data_source("train")
    for i in (0, 5, 77, 255):
        assert tuple(shapes[i]) == source[i]["video"].shape[:3]
    kinds = {tuple(s) for s in shapes}
    assert {(1, 32, 48), (16, 48, 32), (4, 32, 32)} <= kinds
    assert all(tuple(s[1:]) in md.MIXED_CANVASES for s in shapes)


def test_pipeline_batches_one_shape_each_and_independent_of_process_count(mixed_cfg):
    it = pipeline.make_iterator(mixed_cfg, "train", seed=3, train=True,
                                process_index=0, process_count=1)
    batches = [next(it) for _ in range(40)]
    seen = collections.Counter(b["video"].shape for b in batches)
    buckets = {b.name: b for b in bl.from_config(mixed_cfg)}
    assert len(seen) >= 5, seen
    for shape in seen:  # each batch has its bucket's own shape and batch size
        bucket = buckets["x".join(str(n) for n in shape[1:4])]
        assert shape[0] == bucket.batch_size
    for b in batches:  # every row of a batch is one of that bucket's clips (label intact)
        assert b["video"].min() >= -1 and b["label"].min() >= 0
    halves = [pipeline.make_iterator(mixed_cfg, "train", seed=3, train=True,
                                     process_index=p, process_count=2) for p in range(2)]
    for want in batches[:12]:
        got = [next(h) for h in halves]
        for key in want:
            np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), want[key])


def test_pipeline_resumes_mid_stream_across_buckets(mixed_cfg):
    it = pipeline.make_iterator(mixed_cfg, "train", seed=1, train=True,
                                process_index=0, process_count=1)
    for _ in range(9):
        next(it)
    state = it.get_state()
    want = [next(it) for _ in range(6)]
    again = pipeline.make_iterator(mixed_cfg, "train", seed=1, train=True,
                                   process_index=0, process_count=1)
    again.set_state(state)
    for a, b in zip(want, [next(again) for _ in range(6)]):
        np.testing.assert_array_equal(a["video"], b["video"])
        np.testing.assert_array_equal(a["label"], b["label"])


def test_validation_pass_reads_each_full_batch_once(mixed_cfg):
    it = pipeline.make_iterator(mixed_cfg, "validation", seed=0, train=False,
                                process_index=0, process_count=1)
    batches = list(it)
    shapes = bl.record_shapes(md.load_builder(mixed_cfg.data_dir, **MIXED), "validation")
    bucket_list = bl.from_config(mixed_cfg)
    assigned = bl.assign_all(shapes, bucket_list)
    want = collections.Counter()
    for k, b in enumerate(bucket_list):
        want[b.name] = int(np.count_nonzero(assigned == k)) // b.batch_size
    got = collections.Counter("x".join(str(n) for n in b["video"].shape[1:4]) for b in batches)
    assert got == +want


# --------------------------------------------------------------------------- #
# Training in buckets.
# --------------------------------------------------------------------------- #

def _mixed_smoke(data_dir, **overrides):
    from configs import moving_digits as config_file
    from tests.helpers import override
    c = config_file.get_config("smoke,shapes=mixed")
    c.data.data_dir = data_dir
    c.train.progress = False
    c.train.steps = 8
    c.train.ckpt_every = 4
    c.train.eval_every = 0
    c.sample.num = 8
    return override(c, **overrides)


def test_training_in_buckets_resumes_exactly_and_reports_each_bucket(tmp_path):
    from tests.helpers import event_scalars
    from vidit import train as train_lib
    data_dir = str(tmp_path / "tfds")
    # Three of the mixed config's buckets (each compiles its own step: keep the test short).
    c = _mixed_smoke(data_dir, **{"data.buckets": "8x32x32, 4x32x48, 1x48x32:16:0.5"})
    it = pipeline.make_iterator(c.data, "train", seed=c.seed, train=True,
                                process_index=0, process_count=1)
    shapes = [next(it)["video"].shape for _ in range(8)]
    assert len(set(shapes)) >= 3, shapes  # the run below sees several shapes
    straight = train_lib.train(c, str(tmp_path / "a"))
    first = train_lib.train(c, str(tmp_path / "b"), stop_at=4)
    second = train_lib.train(c, str(tmp_path / "b"))
    assert np.isfinite(straight["losses"]).all() and len(straight["losses"]) == 8
    np.testing.assert_allclose(first["losses"] + second["losses"], straight["losses"], rtol=1e-6)
    tags = event_scalars(sorted((tmp_path / "a" / "tensorboard").glob("events.out.tfevents.*")))
    per_bucket = {t.split("/")[1] for t in tags if t.endswith("/mfu") and t.count("/") == 2}
    seen = {"x".join(str(n) for n in s[1:4]) for s in shapes}
    assert per_bucket and per_bucket <= seen, (per_bucket, seen)


# --------------------------------------------------------------------------- #
# Sampling at any size, the token-count shift, image-to-video.
# --------------------------------------------------------------------------- #

def test_flow_shift_follows_token_count():
    from vidit import diffusion
    flow = diffusion.make_objective({"name": "flow", "shift": 1.5})
    assert flow.at_tokens(1024, 256).shift == pytest.approx(3.0)  # 4x tokens: 2x the shift
    assert flow.at_tokens(256, 256) is flow
    fixed = diffusion.make_objective({"name": "flow", "shift": 1.5, "shift_with_tokens": False})
    assert fixed.at_tokens(1024, 256).shift == 1.5


@pytest.fixture(scope="module")
def i2v_run(tmp_path_factory):
    """A smoke run of an image-to-video model (model.first_frame), 6 steps."""
    from configs import moving_digits as config_file
    from vidit import train as train_lib
    root = tmp_path_factory.mktemp("i2v")
    c = config_file.get_config("smoke")
    c.data.data_dir = str(root / "tfds")
    c.train.progress = False
    c.sample.num = 0
    c.model.first_frame = True
    c.train.first_frame_prob = 0.5
    c.optim.lr = 1e-2  # a few steps move the zero-initialised output layer
    train_lib.train(c, str(root / "run"))
    return str(root / "run"), c


def test_image_to_video_starts_from_the_given_frame(i2v_run, tmp_path):
    import imageio.v3 as iio
    from vidit import sample as sample_lib
    workdir, c = i2v_run
    picture = np.zeros((32, 32), np.uint8)
    picture[8:24, 12:20] = 255  # a bar: the given first frame
    iio.imwrite(tmp_path / "first.png", picture)
    videos, _ = sample_lib.generate(workdir, num=2, label=3, steps_=2,
                                    image=str(tmp_path / "first.png"))
    want = picture.astype(np.float32)[None, :, :, None] / 127.5 - 1.0
    np.testing.assert_array_equal(videos[:, 0], np.broadcast_to(want, videos[:, 0].shape))
    assert not np.allclose(videos[:, 1], videos[:, 0])  # later frames are generated
    # The condition reaches the network: with the mask on its output depends on the frame's
    # pixels, with it off it does not.
    from vidit import run as run_lib
    run = run_lib.load(workdir)
    model = run.setup.model(run.params)
    x = np.random.default_rng(0).normal(size=(2, 8, 32, 32, 1)).astype(np.float32)
    t, label = np.full(2, 0.5, np.float32), np.array([3, 3], np.int32)
    frames = [np.zeros_like(x), np.ones_like(x)]

    def out(frame, given):
        return np.asarray(model(x, t, {"label": label, "first_frame": frame,
                                       "first_frame_mask": np.full(2, given)}))

    assert np.abs(out(frames[0], True) - out(frames[1], True)).max() > 1e-4
    np.testing.assert_array_equal(out(frames[0], False), out(frames[1], False))
    with pytest.raises(ValueError, match="could not be read"):
        sample_lib.generate(workdir, num=1, label=3, steps_=1, image=str(tmp_path / "none.png"))


def test_sample_at_untrained_sizes_and_bad_sizes(i2v_run):
    from vidit import sample as sample_lib
    workdir, _ = i2v_run
    videos, _ = sample_lib.generate(workdir, num=2, label=1, steps_=2, frames=4, height=32,
                                    width=48)
    assert videos.shape == (2, 4, 32, 48, 1) and np.isfinite(videos).all()
    with pytest.raises(ValueError, match="patch"):
        sample_lib.generate(workdir, num=1, label=1, steps_=1, frames=3)


def test_demo_configs_validate_and_bad_buckets_are_refused_by_name(devices):
    from configs import moving_digits as md_cfg, text_digits
    from vidit import checks, sharding
    from vidit.errors import ConfigError
    mesh = sharding.make_mesh(dict(data=2, fsdp=4))
    for c in (md_cfg.get_config("smoke,shapes=mixed"),
              text_digits.get_config("smoke,shapes=mixed,encoder=byte")):
        checks.validate(c, mesh)
        assert len(checks.buckets(c)) >= 6
    c = md_cfg.get_config("smoke,shapes=mixed")
    cases = {"8x32x32, 4x32x34": r"bucket 4x32x34 .*patch",
             "8x32x32, 4x32x32:12": r"bucket 4x32x32's batch 12 .*data x fsdp = 8",
             "8x32x32, 8x32": r"'8x32' is not FRAMESxHEIGHTxWIDTH"}
    for text, message in cases.items():
        c.data.buckets = text
        with pytest.raises(ConfigError, match=message):
            checks.validate(c, mesh)
    c.data.buckets = "8x32x32, 1x4x4:8"  # one token per clip cannot split over 2 sequence shards
    c.mesh.sequence = 2
    with pytest.raises(ConfigError, match=r"bucket 1x4x4 .*config.mesh.sequence=2"):
        checks.validate(c, sharding.make_mesh(dict(data=2, fsdp=2, sequence=2)))
