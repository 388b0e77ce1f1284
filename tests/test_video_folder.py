"""Tests for data_pipelines/build_video_folder.py: a folder of real (tiny) video files, good and
bad, made with PyAV at test time, built into a TFDS ArrayRecord dataset and read back, both
directly and through the Grain pipeline."""
import json
import os
import re

import av  # the [video] extra, installed by scripts/test.sh
import numpy as np
import pytest
from etils import epath

from data_pipelines import build_video_folder as bvf
from data_pipelines import data_config, pipeline
from vidit.models import byte_tokenizer

FRAMES, FPS, SIZE = 8, 12, 16
WIDTH, HEIGHT = 64, 32  # source frames; the short side (32) is halved to SIZE


def _encoder(*names):
    """The first of `names` this PyAV can encode with, or None."""
    for name in names:
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:  # noqa: BLE001 - unknown codecs raise various errors
            continue
    return None


def _frame(index, background):
    """Solid `background` with a white 8x8 square 1 px further right on every frame."""
    image = np.empty((HEIGHT, WIDTH, 3), np.uint8)
    image[:] = background
    image[12:20, index:index + 8] = 255
    return image


def _write(path, num, rate, background, codec="mpeg4", options=None, noise=False):
    rng = np.random.default_rng(0)
    with av.open(str(path), "w", options=options or {}) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        for index in range(num):
            image = (rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8) if noise
                     else _frame(index, background))
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


RED, GREEN, BLUE, YELLOW = (200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)
WEBM_CODEC = _encoder("libvpx", "libvpx-vp9")
WEBM = "green.webm" if WEBM_CODEC else "green.mkv"  # Matroska + mpeg4 where there is no VP8/9
# name: (source frames, source fps, background); frames at 12 fps = ceil(n * 12 / fps).
GOOD = {
    "red.mp4": (40, 24, RED),  # 20 frames -> 2 clips (downsampled 2:1)
    WEBM: (30, 10, GREEN),  # 36 frames -> 4 clips (upsampled, millisecond timestamps)
    "blue.avi": (36, 12, BLUE),  # 36 frames -> 4 clips
    "sub/yellow.mov": (28, 12, YELLOW),  # 28 frames -> 3 clips (a tail of 4 dropped)
}
CLIPS = {"red.mp4": 2, WEBM: 4, "blue.avi": 4, "sub/yellow.mov": 3}
BAD = {"empty.mp4": "empty", "notes.mp4": "not a readable video", "short.mp4": "too short",
       "cut.mp4": "", "truncated.mp4": "truncated"}


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    (folder / "sub").mkdir()
    for name, (num, rate, background) in GOOD.items():
        codec = WEBM_CODEC if name.endswith(".webm") else "mpeg4"
        _write(folder / name, num, rate, background, codec=codec)
    _write(folder / "short.mp4", 10, 24, RED)  # 5 frames at 12 fps < one clip of 8
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "notes.mp4").write_text("not a video, just text with a video's name\n")
    (folder / "readme.txt").write_text("not a video extension: ignored")
    # The index (moov) sits at the end of a plain mp4: cutting bytes from the middle breaks it.
    _write(folder / "cut.mp4", 40, 24, RED, noise=True)
    data = (folder / "cut.mp4").read_bytes()
    n = len(data)
    (folder / "cut.mp4").write_bytes(data[:n // 2] + data[n // 2 + n // 8:])
    # Index first (faststart), then the file cut short: readable, but ends early.
    _write(folder / "truncated.mp4", 40, 24, RED, options={"movflags": "faststart"}, noise=True)
    data = (folder / "truncated.mp4").read_bytes()
    (folder / "truncated.mp4").write_bytes(data[:int(len(data) * 0.6)])
    captions = folder.parent / "captions.csv"
    captions.write_text("path,caption\n"
                        "red.mp4,a white square on red\n"
                        f"{WEBM},\"green, with a comma\"\n"
                        "yellow.mov,matched by its bare name\n"
                        "missing.mp4,no such file\n")
    return str(folder), str(captions)


def _val_fraction():
    """A fraction that puts exactly one good file (the lowest hash) in validation."""
    positions = sorted(bvf.split_position(name) for name in GOOD)
    return (positions[0] + positions[1]) / 2


@pytest.fixture(scope="module")
def built(videos, tmp_path_factory):
    folder, captions = videos
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    builder, report = bvf.build(folder, data_dir, frames=FRAMES, fps=FPS, size=SIZE,
                                captions=captions, name="tiny_videos",
                                val_fraction=_val_fraction(), show_progress=False)
    return data_dir, builder, report


def _read_all(data_dir, name="tiny_videos"):
    import tensorflow_datasets as tfds
    builder = tfds.builder(name, data_dir=data_dir)  # from the files alone, as training does
    return {split: [builder.as_data_source(split)[i] for i in range(info.num_examples)]
            for split, info in builder.info.splits.items()}


def _text(value):
    return value.decode() if isinstance(value, bytes) else value


# --------------------------------------------------------------------------- #
# Decoding.
# --------------------------------------------------------------------------- #

def test_resampling_counts_frames_by_time(videos):
    folder, _ = videos
    for name, (num, rate, _) in GOOD.items():
        frames = list(bvf.resampled_frames(os.path.join(folder, name), bvf.as_fraction(FPS), SIZE))
        assert len(frames) == -(-num * FPS // rate), name  # ceil(num * FPS / rate)
        assert all(f.shape == (SIZE, SIZE, 3) and f.dtype == np.uint8 for f in frames)


def test_windows_and_stride(videos):
    folder, _ = videos
    path = os.path.join(folder, "red.mp4")  # 20 frames at 12 fps
    spec = bvf.ClipSpec(frames=8, fps=bvf.as_fraction(12), size=SIZE, stride=4)
    clips = list(bvf.iter_clips(path, spec))
    assert [start for start, _ in clips] == [0, 4, 8, 12]
    np.testing.assert_array_equal(clips[0][1][4:], clips[1][1][:4])  # overlap is shared frames
    spec = bvf.ClipSpec(frames=8, fps=bvf.as_fraction(12), size=SIZE, stride=12)
    assert [start for start, _ in bvf.iter_clips(path, spec)] == [0, 12]


def test_pixels_follow_the_drawn_square(videos):
    """At 12 fps from 24, output frame k is source frame 2k: the square moves 2 source px,
    i.e. 1 output px (scaled 1/2), per frame; frames 8-15 show it whole inside the crop."""
    folder, _ = videos
    spec = bvf.ClipSpec(frames=8, fps=bvf.as_fraction(12), size=SIZE, stride=8)
    (_, first), (start, clip) = bvf.iter_clips(os.path.join(folder, "red.mp4"), spec)
    assert start == 8
    weight = np.maximum(clip[..., 1].astype(float) - RED[1], 0)  # the white square's excess green
    cols = np.arange(SIZE)
    centre = (weight.sum(axis=1) * cols).sum(axis=1) / weight.sum(axis=(1, 2))
    # Source frame 2k has the square over columns 2k..2k+7, centre 2k + 3.5 + 0.5 (pixel
    # centres), which the 2:1 scale and the crop of 8 put at (2k + 4) / 2 - 8 - 0.5.
    expected = (2 * np.arange(8, 16) + 4) / 2 - 8 - 0.5
    np.testing.assert_allclose(centre, expected, atol=0.3)


# --------------------------------------------------------------------------- #
# The built dataset.
# --------------------------------------------------------------------------- #

def test_every_good_clip_arrives_with_its_caption(built):
    data_dir, _, report = built
    examples = _read_all(data_dir)
    by_source = {}
    for split, items in examples.items():
        for item in items:
            by_source.setdefault(_text(item["source"]), []).append((split, item))
    partial = {item["file"]: item["clips_kept"] for item in report.partial}
    expected = {**CLIPS, **partial}
    assert {k: len(v) for k, v in by_source.items()} == expected
    captions = {"red.mp4": "a white square on red", WEBM: "green, with a comma",
                "sub/yellow.mov": "matched by its bare name", "blue.avi": ""}
    for source, items in by_source.items():
        assert len({split for split, _ in items}) == 1, f"{source} straddles the splits"
        assert sorted(int(item["start_frame"]) for _, item in items) == [
            FRAMES * i for i in range(len(items))]
        for _, item in items:
            assert item["video"].shape == (FRAMES, SIZE, SIZE, 3)
            assert item["video"].dtype == np.uint8
            if source in GOOD:
                assert _text(item["caption"]) == captions[source]
                # Mostly background: the 8x8 square covers 1/32 of the 64x32 frame.
                mean = item["video"].reshape(-1, 3).mean(axis=0)
                np.testing.assert_allclose(mean, GOOD[source][2], atol=30, err_msg=source)
    assert report.clips == {split: len(items) for split, items in examples.items()}
    assert report.clips["validation"] >= 1 and report.clips["train"] >= 1
    assert report.unmatched_captions == ["missing.mp4"]


def test_bad_files_are_reported_by_name_with_a_reason(built):
    data_dir, builder, report = built
    problems = {item["file"]: item["reason"] for item in report.skipped + report.partial}
    assert set(problems) == set(BAD)  # and no good file among them
    for name, words in BAD.items():
        assert problems[name] and words in problems[name], (name, problems[name])
    assert {item["file"] for item in report.skipped} >= {"empty.mp4", "notes.mp4", "short.mp4",
                                                         "cut.mp4"}
    with open(os.path.join(builder.data_dir, bvf.REPORT)) as f:
        saved = json.load(f)
    assert saved["skipped"] == report.skipped and saved["partial"] == report.partial
    assert saved["clips"] == report.clips
    text = report.text()
    assert all(name in text for name in BAD)


def test_build_is_deterministic(built, videos, tmp_path):
    data_dir, builder, _ = built
    folder, captions = videos
    again, _ = bvf.build(folder, str(tmp_path), frames=FRAMES, fps=FPS, size=SIZE,
                         captions=captions, name="tiny_videos", val_fraction=_val_fraction(),
                         show_progress=False)
    shards = sorted(f for f in os.listdir(builder.data_dir) if ".array_record" in f)
    assert shards and shards == sorted(f for f in os.listdir(again.data_dir)
                                       if ".array_record" in f)
    for shard in shards:
        with open(os.path.join(builder.data_dir, shard), "rb") as a, \
                open(os.path.join(again.data_dir, shard), "rb") as b:
            assert a.read() == b.read(), shard


def test_grain_pipeline_reads_it(built):
    data_dir, _, report = built
    cfg = data_config.defaults()
    cfg.update(dict(name="tiny_videos", data_dir=data_dir, num_frames=4, frame_stride=2,
                    height=SIZE, width=SIZE, channels=3, batch_size=2))
    batch = next(pipeline.make_iterator(cfg, "train", seed=0, train=True,
                                        process_index=0, process_count=1))
    assert batch["video"].shape == (2, 4, SIZE, SIZE, 3)
    assert -1.0 <= batch["video"].min() and batch["video"].max() <= 1.0
    np.testing.assert_array_equal(batch["label"], [-1, -1])  # no labels in this dataset
    assert batch["text"].shape == (2, cfg.text_len) and (batch["text"][:, 0] == byte_tokenizer.BOS).all()
    cfg.batch_size = 1
    batches = list(pipeline.make_iterator(cfg, "validation", seed=0, train=False,
                                          process_index=0, process_count=1))
    assert len(batches) == report.clips["validation"]


def test_build_into_a_bucket_matches_the_local_build(built, videos, bucket_dir):
    """--data_dir gs://...: built locally, uploaded, and read back from the bucket as is."""
    data_dir, builder, _ = built
    folder, captions = videos
    remote, _ = bvf.build(folder, str(bucket_dir), frames=FRAMES, fps=FPS, size=SIZE,
                          captions=captions, name="tiny_videos", val_fraction=_val_fraction(),
                          show_progress=False)
    remote_dir = epath.Path(remote.data_dir)
    assert str(remote_dir).startswith("gs://")
    local_files = sorted(f for f in os.listdir(builder.data_dir) if ".array_record" in f)
    for name in local_files:
        with open(os.path.join(builder.data_dir, name), "rb") as f:
            assert (remote_dir / name).read_bytes() == f.read(), name
    assert (remote_dir / bvf.REPORT).exists()
    got, want = _read_all(str(bucket_dir)), _read_all(data_dir)
    assert {k: len(v) for k, v in got.items()} == {k: len(v) for k, v in want.items()}
    np.testing.assert_array_equal(got["train"][0]["video"], want["train"][0]["video"])
    with pytest.raises(bvf.BuildError, match="already exists"):
        bvf.build(folder, str(bucket_dir), frames=FRAMES, fps=FPS, size=SIZE, name="tiny_videos",
                  show_progress=False)


# --------------------------------------------------------------------------- #
# Arguments and edge cases.
# --------------------------------------------------------------------------- #

def test_a_split_without_clips_is_left_out(videos, tmp_path):
    folder, _ = videos
    builder, report = bvf.build(folder, str(tmp_path), frames=FRAMES, fps=FPS, size=SIZE,
                                val_fraction=0.0, show_progress=False)
    assert list(builder.info.splits) == ["train"]
    assert report.clips == {"train": sum(report.clips.values()), "validation": 0}
    assert report.clips["train"] >= sum(CLIPS.values())


def test_no_usable_file_is_an_error(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.mp4").write_bytes(b"")
    (folder / "b.webm").write_text("text")
    with pytest.raises(bvf.BuildError, match=r"(?s)no clips.*a\.mp4: empty.*b\.webm"):
        bvf.build(str(folder), str(tmp_path / "out"), frames=4, fps=8, size=8,
                  val_fraction=0.5, show_progress=False)


@pytest.mark.parametrize("args, message", [
    (["--videos", "{missing}"], "does not exist"),
    (["--videos", "{empty}"], "no video or image files"),
    (["--frames", "0"], "--frames must be an integer >= 1"),
    (["--fps", "0"], "--fps must be > 0"),
    (["--stride", "0"], "--stride must be an integer >= 1"),
    (["--val_fraction", "1.5"], "--val_fraction must lie in"),
    (["--name", "Bad-Name"], "--name 'Bad-Name'"),
    (["--captions", "{bad_captions}"], "must name the columns 'path' and 'caption'"),
    (["--captions", "{missing}"], "--captions .* does not exist"),
])
def test_bad_arguments_name_the_problem(videos, tmp_path, capsys, args, message):
    folder, _ = videos
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.txt").write_text("")
    (tmp_path / "bad.csv").write_text("file,text\nred.mp4,x\n")
    paths = dict(missing=str(tmp_path / "missing"), empty=str(tmp_path / "empty"),
                 bad_captions=str(tmp_path / "bad.csv"))
    base = {"--videos": folder, "--data_dir": str(tmp_path / "out"), "--frames": "8",
            "--fps": "12", "--size": "16"}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value.format(**paths)
    argv = [item for pair in base.items() for item in pair]
    assert bvf.main(argv) == 2
    assert re.search(message, capsys.readouterr().err), message


def test_existing_dataset_needs_overwrite(built, videos, capsys):
    data_dir, _, _ = built
    folder, _ = videos
    argv = ["--videos", folder, "--data_dir", data_dir, "--frames", "8", "--fps", "12",
            "--size", "16", "--name", "tiny_videos"]
    assert bvf.main(argv) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err


# --------------------------------------------------------------------------- #
# Aspect-ratio buckets and images.
# --------------------------------------------------------------------------- #

def _write_sized(path, width, height, num=24, rate=12):
    """Grey frames with a white band along the left and right edges (6% of the width each):
    a square centre crop of a wide frame loses both bands."""
    band = max(2, round(0.06 * width))
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for _ in range(num):
            image = np.full((height, width, 3), 90, np.uint8)
            image[:, :band] = image[:, -band:] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_buckets_keep_aspect_ratios_and_ingest_images(tmp_path):
    from PIL import Image
    from data_pipelines import buckets
    folder = tmp_path / "mixed"
    folder.mkdir()
    _write_sized(folder / "wide.mp4", 96, 54)  # 16:9
    _write_sized(folder / "tall.mp4", 54, 96)  # 9:16
    _write_sized(folder / "square.mp4", 64, 64)
    Image.fromarray(np.full((40, 72, 3), 200, np.uint8)).save(folder / "photo.png")  # wide
    Image.fromarray(np.full((30, 30, 3), 50, np.uint8)).save(folder / "icon.jpg")
    (folder / "broken.webp").write_bytes(b"not an image")
    spec = "8x18x32, 8x32x18, 8x24x24, 1x18x32, 1x24x24"
    builder, report = bvf.build(str(folder), str(tmp_path / "out"), fps=12, buckets_=spec,
                                val_fraction=0.0, show_progress=False)
    source = builder.as_data_source("train")
    stored = {}
    for i in range(len(source)):
        example = source[i]
        stored.setdefault(example["source"].decode(), []).append(example)
    shapes = {name: {e["video"].shape for e in examples} for name, examples in stored.items()}
    assert shapes == {"wide.mp4": {(8, 18, 32, 3)}, "tall.mp4": {(8, 32, 18, 3)},
                      "square.mp4": {(8, 24, 24, 3)}, "photo.png": {(1, 18, 32, 3)},
                      "icon.jpg": {(1, 24, 24, 3)}}
    assert len(stored["wide.mp4"]) == 3  # 24 frames: 3 windows of 8
    for name in ("wide.mp4", "tall.mp4"):  # no square crop: both edge bands survive
        video = stored[name][0]["video"].astype(float)
        assert video[..., 0, :].mean() > 180 and video[..., -1, :].mean() > 180, name
        assert video[..., video.shape[2] // 2, :].mean() < 120
    assert stored["wide.mp4"][0]["bucket"] == b"8x18x32"
    assert [s["file"] for s in report.skipped] == ["broken.webp"]
    assert "not a readable image" in report.skipped[0]["reason"]
    index = buckets.record_shapes(builder, "train")
    assert [tuple(index[i]) for i in range(len(source))] == [
        source[i]["video"].shape[:3] for i in range(len(source))]
    # The pipeline trains each clip in its own bucket, one shape per batch.
    cfg = data_config.defaults()
    cfg.update(dict(name=builder.name, data_dir=str(tmp_path / "out"), channels=3,
                    buckets=spec.replace("8x18x32", "8x18x32:2").replace(
                        "8x32x18", "8x32x18:2").replace("8x24x24", "8x24x24:2"),
                    batch_size=2, bucket_batch_multiple=1))
    it = pipeline.make_iterator(cfg, "train", seed=0, train=True, process_index=0,
                                process_count=1)
    seen = {next(it)["video"].shape[1:4] for _ in range(30)}
    assert seen == {(8, 18, 32), (8, 32, 18), (8, 24, 24), (1, 18, 32), (1, 24, 24)}


def test_images_without_buckets_are_reported(tmp_path):
    from PIL import Image
    folder = tmp_path / "v"
    folder.mkdir()
    _write_sized(folder / "clip.mp4", 64, 64)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "still.png")
    _, report = bvf.build(str(folder), str(tmp_path / "out"), frames=8, fps=12, size=16,
                          val_fraction=0.0, show_progress=False)
    assert [s["file"] for s in report.skipped] == ["still.png"]
    assert "--buckets" in report.skipped[0]["reason"]
