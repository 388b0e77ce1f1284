"""Tests for the embedded moving-digits dataset, the caption tokenizer and the Grain pipeline."""
import os
import re
import subprocess
import sys

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds
from etils import epath

from data_pipelines import moving_digits as md
from data_pipelines import data_config, pipeline
from vidit.models import byte_tokenizer

TINY = {"num_train": 64, "num_validation": 16}


@pytest.fixture
def cfg(data_dir):
    cfg = data_config.defaults()
    cfg.data_dir = data_dir
    cfg.builder_kwargs = dict(TINY)
    cfg.batch_size = 8
    return cfg


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _assert_batches_equal(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _bbox_corner(frame):
    """Top-left corner of the nonzero pixels; integer shifts move it exactly with the digit."""
    rows, cols = np.nonzero(frame[..., 0])
    return np.array([rows.min(), cols.min()])


# --------------------------------------------------------------------------- #
# Dataset generation.
# --------------------------------------------------------------------------- #

def test_make_clip_is_deterministic_with_expected_shape():
    image, label = np.arange(64).reshape(8, 8) % 17, 3
    video, caption = md.make_clip(np.random.default_rng(7), image, label)
    again, caption_again = md.make_clip(np.random.default_rng(7), image, label)
    other, _ = md.make_clip(np.random.default_rng(8), image, label)
    assert video.shape == (md.NUM_FRAMES, 32, 32, 1) and video.dtype == np.uint8
    np.testing.assert_array_equal(video, again)
    assert caption == caption_again
    assert not np.array_equal(video, other)
    assert video.max() > 200 and video.min() == 0
    assert all(frame.any() for frame in video)  # the digit is on every frame


def test_caption_describes_the_motion():
    images, labels = md._source_images("validation")
    for index in range(40):
        rng = np.random.default_rng(index)
        video, caption = md.make_clip(rng, images[index], labels[index])
        corners = np.stack([_bbox_corner(frame) for frame in video])
        steps = np.diff(corners, axis=0)
        assert np.abs(steps).max() <= md.MAX_SPEED
        dy, dx = steps[0]  # no bounce on the first step, so it shows the captioned velocity
        assert caption.startswith(f"a {labels[index]} moving ")
        assert ("up" in caption) == (dy < 0) and ("down" in caption) == (dy > 0)
        assert ("left" in caption) == (dx < 0) and ("right" in caption) == (dx > 0)


def test_varied_captions_name_the_digit_and_motion_and_change_no_frame():
    """captions='varied' phrases the same clip several ways; paraphrases (evaluation prompts)
    use words no training caption has; the videos equal the plain style's."""
    plain = list(md.generate("train", 60, seed=0))
    varied = list(md.generate("train", 60, seed=0, captions="varied"))
    for a, b in zip(plain, varied):
        np.testing.assert_array_equal(a["video"], b["video"])
        assert a["label"] == b["label"]
        label, words = b["label"], b["caption"].split()
        assert str(label) in words or md.NUMBER_WORDS[label] in words
        assert a["caption"].split(" moving ")[1] in b["caption"]  # the same direction words
    assert len({b["caption"].split()[0] + b["caption"].split()[1] for b in varied}) >= 4
    training_words = {w for t in md.CAPTION_TEMPLATES["varied"] for w in t.split()}
    prompts = md.captions_for(np.arange(30) % 10, "paraphrase", seed=0)
    for label, prompt in zip(np.arange(30) % 10, prompts):
        assert str(label) in prompt.split() or md.NUMBER_WORDS[label] in prompt.split()
        assert set(prompt.split()) & ({"number", "numeral", "handwritten"} - training_words)
    with pytest.raises(ValueError, match="paraphrase"):
        md.MovingDigits(data_dir="/nonexistent", captions="paraphrase")


def _source_indices(frame, upscaled):
    """Indices of the source digits whose upscaled image appears in `frame`."""
    y, x = _bbox_corner(frame)
    matches = []
    for index, digit in enumerate(upscaled):
        dy, dx = _bbox_corner(digit[..., None])
        top, left = y - dy, x - dx
        if 0 <= top <= 16 and 0 <= left <= 16 and np.array_equal(
                frame[top:top + 16, left:left + 16, 0], digit):
            matches.append(index)
    return matches


def test_generate_is_deterministic_and_splits_use_disjoint_digits():
    first = list(md.generate("validation", 4, seed=1))
    again = list(md.generate("validation", 4, seed=1))
    for ex, ex_again in zip(first, again):
        assert ex["caption"] == ex_again["caption"] and ex["label"] == ex_again["label"]
        np.testing.assert_array_equal(ex["video"], ex_again["video"])
    from sklearn.datasets import load_digits

    upscaled = [md.upscale_digit(image) for image in load_digits().images]
    for split, allowed in (("train", range(0, md.NUM_TRAIN_IMAGES)),
                           ("validation", range(md.NUM_TRAIN_IMAGES, len(upscaled)))):
        for example in md.generate(split, 4, seed=1):
            sources = _source_indices(example["video"][0], upscaled)
            assert any(index in allowed for index in sources), split


def test_builder_round_trip_without_tensorflow(data_dir):
    builder = md.load_builder(data_dir, **TINY)
    assert builder.info.splits["train"].num_examples == 64
    assert builder.info.splits["validation"].num_examples == 16
    source = tfds.data_source(md.NAME, split="validation", data_dir=data_dir, builder_kwargs=TINY)
    stored = sorted((ex["caption"].decode(), ex["video"].tobytes()) for ex in source)
    generated = sorted((ex["caption"], ex["video"].tobytes())
                       for ex in md.generate("validation", 16, seed=0))
    assert stored == generated  # same clips; TFDS only reorders them
    assert "tensorflow" not in sys.modules


def test_load_builder_reuses_the_files(data_dir, capsys):
    md.load_builder(data_dir, **TINY)
    assert "Building" not in capsys.readouterr().out


def test_concurrent_first_builds_both_succeed(tmp_path):
    # Two runs started together on a fresh machine: without the build lock the second one's
    # rename onto the first's files raised FileExistsError.
    code = ("import sys; from data_pipelines import moving_digits as md; "
            f"b = md.load_builder(sys.argv[1], **{TINY!r}); "
            "print(b.info.splits['train'].num_examples)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=root,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    for out, err, rc in results:
        assert rc == 0, err[-2000:]
        assert out.split()[-1] == "64"
    assert sum("Building" in out for out, _, _ in results) == 1  # one built, one waited
    # Output to a pipe (a log file): no TFDS progress bar redrawn into it.
    assert not any("examples/s" in err or "Generating" in err for _, err, _ in results)


# --------------------------------------------------------------------------- #
# Tokenizer.
# --------------------------------------------------------------------------- #

def test_tokenizer_round_trip_padding_and_truncation():
    tokens = byte_tokenizer.encode("a 3 é", 10)
    assert tokens.dtype == np.int32 and tokens.shape == (10,)
    assert tokens[0] == byte_tokenizer.BOS and tokens[-1] == byte_tokenizer.PAD
    assert tokens[1] == ord("a") + 2 and tokens.max() < byte_tokenizer.VOCAB_SIZE == 258
    assert byte_tokenizer.decode(tokens) == "a 3 é"
    assert byte_tokenizer.decode(byte_tokenizer.encode("abcdef", 4)) == "abc"  # BOS + 3 bytes
    np.testing.assert_array_equal(byte_tokenizer.encode(byte_tokenizer.NULL, 4), [1, 0, 0, 0])
    np.testing.assert_array_equal(byte_tokenizer.null_tokens(4), [1, 0, 0, 0])


# --------------------------------------------------------------------------- #
# Pipeline.
# --------------------------------------------------------------------------- #

def test_pipeline_elements(cfg):
    batch = next(pipeline.make_iterator(cfg, "train", seed=0, train=True,
                                        process_index=0, process_count=1))
    assert batch["video"].shape == (8, 8, 32, 32, 1) and batch["video"].dtype == np.float32
    assert batch["video"].min() >= -1 and batch["video"].max() <= 1
    assert batch["video"].min() == -1 and batch["video"].max() > 0.5
    assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32
    assert batch["text"].shape == (8, cfg.text_len) and batch["text"].dtype == np.int32
    for label, text in zip(batch["label"], batch["text"]):
        assert byte_tokenizer.decode(text).startswith(f"a {label} moving")  # rows stay aligned


class RgbClipsForTest(tfds.core.GeneratorBasedBuilder):
    """Stand-in for any other video dataset: 20-frame 40x48 RGB clips, no captions."""

    VERSION = tfds.core.Version("1.0.0")
    code_path = epath.Path(__file__)  # see MovingDigits.code_path

    def __init__(self, **kwargs):
        super().__init__(file_format="array_record", **kwargs)

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "video": tfds.features.Tensor(shape=(20, 40, 48, 3), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=2),
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        rng = np.random.default_rng(0)
        for index in range(16):
            yield index, {"video": rng.integers(0, 256, (20, 40, 48, 3), dtype=np.uint8),
                          "label": index % 2}


def test_pipeline_reads_other_datasets(tmp_path):
    cfg = data_config.defaults()
    cfg.update(dict(name=RgbClipsForTest.name, data_dir=str(tmp_path), batch_size=4, frame_stride=2))
    with pytest.raises(ValueError, match="data.name"):  # not prepared yet
        pipeline.make_iterator(cfg, "train", seed=0, train=True)
    RgbClipsForTest(data_dir=str(tmp_path)).download_and_prepare()
    batch = next(pipeline.make_iterator(cfg, "train", seed=0, train=True))  # JAX's process 0 of 1
    assert batch["video"].shape == (4, 8, 32, 32, 1)  # cropped, resized, RGB -> grey
    assert batch["video"].min() >= -1 and batch["video"].max() <= 1
    np.testing.assert_array_equal(batch["text"], np.stack([byte_tokenizer.null_tokens(cfg.text_len)] * 4))


def test_resize_and_crop():
    constant = np.full((2, 40, 48, 3), 0.25, np.float32)
    np.testing.assert_allclose(pipeline.resize_and_crop(constant, 24, 20), 0.25, rtol=1e-6)
    stripes = np.zeros((1, 8, 8, 1), np.float32)
    stripes[:, :, 1::2] = 1.0  # one-pixel vertical stripes
    halved = pipeline.resize_and_crop(stripes, 4, 4)  # antialiased: stripes average out
    np.testing.assert_allclose(halved[0, 1:-1, 1:-1], 0.5, atol=1e-6)
    assert pipeline.resize_and_crop(constant, 16, 16).shape == (2, 16, 16, 3)  # crop after cover


def test_pipeline_resizes_converts_channels_and_strides(cfg):
    cfg.update(dict(height=24, width=20, channels=3, num_frames=4, frame_stride=3))
    video = next(pipeline.make_iterator(cfg, "train", seed=0, train=True,
                                        process_index=0, process_count=1))["video"]
    assert video.shape == (8, 4, 24, 20, 3)
    assert video.min() >= -1 and video.max() <= 1
    np.testing.assert_array_equal(video[..., 0], video[..., 2])  # grey repeated to RGB


def test_eval_is_one_pass_over_first_frames(cfg, data_dir):
    batches = list(pipeline.make_iterator(cfg, "validation", seed=0, train=False,
                                          process_index=0, process_count=1))
    assert len(batches) == 16 // 8
    source = tfds.data_source(md.NAME, split="validation", data_dir=data_dir, builder_kwargs=TINY)
    want = sorted(ex["video"][:8].tobytes() for ex in source)
    got = sorted(((row + 1) * 127.5).round().astype(np.uint8).tobytes()
                 for batch in batches for row in batch["video"])
    assert got == want  # every clip exactly once, starting at frame 0


def test_pipeline_is_deterministic_in_seed(cfg):
    def batches(seed):
        return _take(pipeline.make_iterator(cfg, "train", seed=seed, train=True,
                                            process_index=0, process_count=1), 3)

    first = batches(0)
    _assert_batches_equal(batches(0), first)
    assert not np.array_equal(batches(1)[0]["video"], first[0]["video"])


def test_resume_from_state(cfg):
    iterator = pipeline.make_iterator(cfg, "train", seed=0, train=True,
                                      process_index=0, process_count=1)
    _take(iterator, 3)
    state = iterator.get_state()
    expected = _take(iterator, 2)  # crosses into the second epoch (64 clips / 8)
    resumed = pipeline.make_iterator(cfg, "train", seed=0, train=True,
                                     process_index=0, process_count=1)
    resumed.set_state(state)
    _assert_batches_equal(_take(resumed, 2), expected)


def test_resume_through_orbax(cfg, tmp_path):
    def make():
        return pipeline.make_iterator(cfg, "train", seed=0, train=True,
                                      process_index=0, process_count=1)

    iterator = make()
    _take(iterator, 3)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
        manager.wait_until_finished()
    expected = _take(iterator, 2)
    resumed = make()
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
    _assert_batches_equal(_take(resumed, 2), expected)


@pytest.mark.parametrize("process_count", [2, 4])
def test_processes_split_the_same_global_batch(cfg, process_count):
    whole = _take(pipeline.make_iterator(cfg, "train", seed=0, train=True,
                                         process_index=0, process_count=1), 10)
    parts = [_take(pipeline.make_iterator(cfg, "train", seed=0, train=True,
                                          process_index=p, process_count=process_count), 10)
             for p in range(process_count)]
    joined = [{key: np.concatenate([part[step][key] for part in parts]) for key in whole[step]}
              for step in range(10)]
    _assert_batches_equal(joined, whole)


def test_worker_processes_give_the_same_batches(cfg):
    expected = _take(pipeline.make_iterator(cfg, "train", seed=0, train=True,
                                            process_index=0, process_count=1), 3)
    cfg.num_workers = 2
    iterator = pipeline.make_iterator(cfg, "train", seed=0, train=True,
                                      process_index=0, process_count=1)
    try:
        _assert_batches_equal(_take(iterator, 3), expected)
    finally:
        iterator.close()


def test_builder_rebuilds_from_a_copy_of_the_stock_config(tmp_path):
    # What a Grain worker does with the default-size dataset: unpickle a copy of its config.
    import copy
    builder = md.MovingDigits(data_dir=str(tmp_path),
                                         config=copy.deepcopy(md._DEFAULT_CONFIG))
    assert builder.builder_config is md._DEFAULT_CONFIG


@pytest.mark.parametrize("change, split, key", [
    (dict(batch_size=9), "train", "batch_size"),
    (dict(), "test", "split"),
    (dict(num_frames=9, frame_stride=2), "train", "num_frames"),
])
def test_bad_config_raises(cfg, change, split, key):
    cfg.update(change)
    with pytest.raises(ValueError, match=key):
        pipeline.make_iterator(cfg, split, seed=0, train=True, process_index=0, process_count=2)


class DamagedClipsForTest(tfds.core.GeneratorBasedBuilder):
    """40 grey clips, some of them unusable for 8-frame RGB clips: too short, with 2 channels
    (neither grey nor RGB), or (written over after the build, see `damaged_dataset`)
    undecodable bytes."""

    VERSION = tfds.core.Version("1.0.0")
    code_path = epath.Path(__file__)
    SHORT, TWO_CHANNELS = (5, 17), (9,)

    def __init__(self, **kwargs):
        super().__init__(file_format="array_record", **kwargs)

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "video": tfds.features.Tensor(shape=(None, None, None, None), dtype=np.uint8,
                                          encoding="zlib"),
            "label": tfds.features.ClassLabel(num_classes=10),
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        rng = np.random.default_rng(0)
        for key in range(40):
            frames = 3 if key in self.SHORT else 16
            channels = 2 if key in self.TWO_CHANNELS else 1
            yield key, {"video": rng.integers(0, 256, (frames, 32, 32, channels), np.uint8),
                        "label": key % 10}


def damaged_dataset(data_dir) -> set:
    """Builds DamagedClipsForTest, writes garbage over one record's bytes, and returns the
    record indices (in the stored order) that cannot become an 8-frame RGB clip."""
    from array_record.python import array_record_module
    builder = DamagedClipsForTest(data_dir=data_dir)
    builder.download_and_prepare()
    (file,) = epath.Path(builder.data_dir).glob("*train.array_record*")
    reader = array_record_module.ArrayRecordReader(str(file))
    records = reader.read_all()
    reader.close()
    garbage = 30
    records[garbage] = b"\x08\xff\xff not a serialized example"
    writer = array_record_module.ArrayRecordWriter(str(file), "group_size:1")
    for record in records:
        writer.write(record)
    writer.close()
    source = builder.as_data_source("train")
    bad = {garbage}
    for i in range(len(source)):
        if i == garbage:
            continue
        video = source[i]["video"]
        if video.shape[0] < 8 or video.shape[-1] == 2:
            bad.add(i)
    assert len(bad) == 4
    return bad


def test_unreadable_records_are_replaced_counted_and_named(tmp_path, caplog):
    bad = damaged_dataset(str(tmp_path))
    cfg = data_config.defaults()
    cfg.update(dict(name=DamagedClipsForTest.name, data_dir=str(tmp_path), batch_size=8,
                    channels=3))
    it = pipeline.make_iterator(cfg, "train", seed=0, train=True, process_index=0,
                                process_count=1)
    with caplog.at_level("WARNING", logger="vidit"):
        epoch = [next(it) for _ in range(5)]  # 40 records: one epoch
    for batch in epoch:  # every batch whole and usable
        assert batch["video"].shape == (8, 8, 32, 32, 3) and np.isfinite(batch["video"]).all()
    named = {int(m) for m in re.findall(r"record (\d+) skipped", caplog.text)}
    assert named == bad
    # Each bad record read in the epoch counts once, plus once more for each bad record its
    # replacement chain runs into.
    expected = sum(next(k for k in range(40) if (i + k) % 40 not in bad) for i in range(40))
    assert int(sum(b["bad"].sum() for b in epoch)) == expected


def test_training_stops_past_max_bad_fraction(tmp_path):
    from configs import moving_digits
    from vidit import train as train_lib
    damaged_dataset(str(tmp_path / "tfds"))
    c = moving_digits.get_config("smoke")
    c.data.update(dict(name=DamagedClipsForTest.name, data_dir=str(tmp_path / "tfds"),
                       max_bad_fraction=0.5, channels=3))
    c.data.builder_kwargs = {}  # (update() merges dicts: the smoke sizes would stay)
    c.model.channels = 3
    c.train.progress, c.train.log_every, c.sample.num = False, 1, 0
    summary = train_lib.train(c, str(tmp_path / "tolerant"))
    assert not summary["failed"] and summary["bad_examples"] > 0
    # A tenth of the records is bad: past 5% the run stops (judged from 20 examples on).
    c.data.max_bad_fraction = 0.05
    summary = train_lib.train(c, str(tmp_path / "strict"))
    assert summary["failed"] and "config.data.max_bad_fraction=0.05" in summary["stopped_for"]
    assert summary["step"] < c.train.steps
