"""A folder of video files (plus optional captions) -> a TFDS ArrayRecord dataset of clips.

    python -m data_pipelines.build_video_folder --videos DIR [--captions FILE] --data_dir OUT \\
        --frames N --fps F --size S [--stride K] [--name NAME] [--val_fraction X] [--overwrite]
    python -m data_pipelines.build_video_folder --videos DIR --data_dir OUT --fps F \\
        --buckets "16x144x256,16x256x144,16x192x192,1x144x256,1x256x144,1x192x192"

With --buckets (FRAMESxHEIGHTxWIDTH, comma-separated, as config.data.buckets) clips keep their
aspect ratio: each file goes to the bucket of its size and length (data_pipelines/buckets.py:
nearest aspect ratio, then the most frames it can fill), is scaled to cover the bucket's size and
centre-cropped only by the remainder, and cut into windows of the bucket's frames; images
(.png .jpg .jpeg .webp) become 1-frame clips. Each example then also has `bucket` ('16x144x256'),
and a shape index (buckets.SHAPES_FILE) is written beside the files. Without --buckets every clip
is square (below), and images are reported as skipped.

Every video file under DIR (.mp4 .webm .mov .avi .mkv .m4v, searched recursively) is decoded with
PyAV one frame at a time, resampled to F frames per second (each output instant shows the latest
source frame at or before it), its short side scaled to S and centre-cropped to S x S RGB, and cut
into clips of N frames by a sliding window that moves K frames (default N: no overlap; a tail
shorter than N is dropped). Nothing knows about scenes: a clip may span a cut. Memory holds one
window, never a whole video.

Each example: `video` uint8 [N, S, S, 3], `caption` (the file's caption, '' if none), `source`
(the file's path relative to DIR) and `start_frame` (the clip's first frame, counted at F fps from
the file's first frame). There is no `label`; the Grain pipeline gives such datasets label -1.

Files go to `train` or `validation` by a hash of their relative path (a fraction `val_fraction`
goes to validation), so a video's clips never straddle the splits and a file keeps its split when
others are added. The captions file is CSV (header with `path` and `caption` columns) or JSON
lines ({"path": ..., "caption": ...}); `path` is relative to DIR (or absolute, or a bare file name
when that name is unique under DIR).

A file that cannot be used never stops the build. Empty, unreadable, not-a-video and too-short
files are skipped; a file whose decoding fails part-way (corrupt data) or that ends before its
header says it should (truncated) keeps the clips decoded before the fault and is reported as
partial. The report printed at the end, also written to `skipped.json` in the dataset's folder
(OUT/NAME/1.0.0/), names every such file with its reason, and counts files and clips per split.
Corruption that the decoder conceals (no error raised) cannot be seen and is not reported.
Rotation metadata and non-square pixels are ignored.

Training on the result: `--config.data.name=NAME --config.data.data_dir=OUT
--config.data.channels=3 --config.model.channels=3 --config.data.height=S --config.data.width=S`
with `model.cond=text` (or `none`), e.g. `configs/moving_digits.py:cond=text` (not `:smoke`, whose
`data.builder_kwargs` are moving_digits' sizes).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import os
import re
import shutil
import sys
from fractions import Fraction
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from data_pipelines import buckets
from vidit import storage

try:
    from tqdm import tqdm as _progress
except ImportError:  # tqdm is a dependency of vidit, but the builder works without it
    def _progress(items, **kwargs):
        del kwargs
        return items

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".avi", ".mkv", ".m4v")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
DEFAULT_NAME = "video_folder"
VERSION = "1.0.0"
REPORT = "skipped.json"
SPLITS = ("train", "validation")


class BuildError(ValueError):
    """A bad argument or input (missing folder, no videos, bad captions file, ...)."""


class VideoError(Exception):
    """A problem with one video file: it is skipped (or kept in part) with this reason."""


@dataclasses.dataclass(frozen=True)
class ClipSpec:
    """What one clip is: `frames` frames at `fps`, `size` x `size`, windows `stride` apart; with
    `buckets`, each file's bucket gives the frames, height and width (and windows move `stride`
    frames, 0 = the bucket's frames)."""

    frames: int
    fps: Fraction
    size: int
    stride: int
    buckets: tuple = ()  # buckets.Bucket

    def __post_init__(self):
        # With buckets, frames and size come from each file's bucket, and stride 0 means the
        # bucket's frames.
        checked = ("stride",) if self.buckets else ("frames", "size", "stride")
        for field in checked:
            value = getattr(self, field)
            if self.buckets and value == 0:
                continue
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise BuildError(f"--{field} must be an integer >= 1, got {value!r}")
        if not self.fps > 0:
            raise BuildError(f"--fps must be > 0, got {self.fps!r}")


def as_fraction(fps: float | str | Fraction) -> Fraction:
    """29.97 -> 2997/100 exactly (via its decimal text), so frame times are exact fractions."""
    try:
        value = Fraction(str(fps)) if not isinstance(fps, Fraction) else fps
    except (ValueError, ZeroDivisionError) as e:
        raise BuildError(f"--fps must be a positive number, got {fps!r}") from e
    if value <= 0:
        raise BuildError(f"--fps must be > 0, got {fps!r}")
    return value.limit_denominator(1_000_000)


# --------------------------------------------------------------------------- #
# Files, splits and captions.
# --------------------------------------------------------------------------- #

def list_videos(folder: str) -> list[str]:
    """Relative POSIX paths of the video and image files under `folder` (recursive, sorted, no
    hidden)."""
    if not os.path.isdir(folder):
        what = "is not a folder" if os.path.exists(folder) else "does not exist"
        raise BuildError(f"--videos {folder!r} {what}")
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for file in files:
            if not file.startswith(".") and file.lower().endswith(VIDEO_EXTENSIONS +
                                                                 IMAGE_EXTENSIONS):
                found.append(os.path.relpath(os.path.join(root, file), folder).replace(os.sep, "/"))
    if not found:
        raise BuildError(f"no video or image files ({' '.join(VIDEO_EXTENSIONS)} "
                         f"{' '.join(IMAGE_EXTENSIONS)}) found under --videos {folder!r}")
    return sorted(found)


def split_position(source: str) -> float:
    """A number in [0, 1) fixed by the relative path alone (a hash): the same on every run and
    machine, and unchanged by adding other files."""
    digest = hashlib.sha256(source.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_of(source: str, val_fraction: float) -> str:
    """'validation' for the files whose `split_position` is below `val_fraction`, else 'train'."""
    return "validation" if split_position(source) < val_fraction else "train"


def _caption_rows(path: str) -> Iterator[tuple[str, dict]]:
    """(where, row) for each record of a .csv or .jsonl captions file."""
    lower = path.lower()
    with open(path, newline="", encoding="utf-8") as f:
        if lower.endswith(".csv"):
            reader = csv.DictReader(f)
            missing = {"path", "caption"} - set(reader.fieldnames or ())
            if missing:
                raise BuildError(f"--captions {path}: the CSV header must name the columns "
                                 f"'path' and 'caption'; missing {sorted(missing)}, header is "
                                 f"{reader.fieldnames}")
            for row in reader:
                yield f"{path}:{reader.line_num}", row
        elif lower.endswith((".jsonl", ".json")):
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise BuildError(f"{where}: not a JSON object ({e})") from e
                if not isinstance(row, dict):
                    raise BuildError(f"{where}: expected a JSON object with 'path' and 'caption'")
                yield where, row
        else:
            raise BuildError(f"--captions {path}: expected a .csv or .jsonl file")


def read_captions(path: str, folder: str, sources: list[str]) -> tuple[dict[str, str], list[str]]:
    """({source: caption}, [caption paths that match no video]) from a captions file.

    A row's `path` is matched as a path relative to `folder`, an absolute path inside it, or a
    bare file name that is unique among `sources`.
    """
    if not os.path.isfile(path):
        raise BuildError(f"--captions {path!r} does not exist")
    known = set(sources)
    by_basename: dict[str, list[str]] = {}
    for source in sources:
        by_basename.setdefault(source.rsplit("/", 1)[-1], []).append(source)
    captions: dict[str, str] = {}
    where_of: dict[str, str] = {}
    unmatched = []
    for where, row in _caption_rows(path):
        if row.get("path") is None or row.get("caption") is None:
            raise BuildError(f"{where}: needs both 'path' and 'caption', got {row}")
        name, caption = str(row["path"]).strip(), str(row["caption"])
        key = name.replace(os.sep, "/")
        if os.path.isabs(name):
            key = os.path.relpath(name, folder).replace(os.sep, "/")
        key = key.removeprefix("./")
        if key not in known:
            candidates = by_basename.get(key.rsplit("/", 1)[-1], [])
            if "/" in key or len(candidates) != 1:
                unmatched.append(name)
                continue
            key = candidates[0]
        if key in captions and captions[key] != caption:
            raise BuildError(f"{where}: a second, different caption for {key!r} "
                             f"(first at {where_of[key]})")
        captions[key], where_of[key] = caption, where
    return captions, unmatched


# --------------------------------------------------------------------------- #
# Decoding: frames at a fixed rate, then clips.
# --------------------------------------------------------------------------- #

def _cover(width: int, height: int, out_h: int, out_w: int) -> tuple[int, int, float]:
    """(scaled width, scaled height, scale) of a width x height picture scaled to just cover
    out_h x out_w, keeping its aspect ratio."""
    scale = max(out_h / height, out_w / width)
    return max(out_w, round(width * scale)), max(out_h, round(height * scale)), scale


def _to_size(frame, out_h: int, out_w: int) -> np.ndarray:
    """An av.VideoFrame -> uint8 [out_h, out_w, 3]: scaled to cover, the remainder centre-cropped
    (a square size: short side scaled to it)."""
    scaled_w, scaled_h, scale = _cover(frame.width, frame.height, out_h, out_w)
    # Area averaging when shrinking (no aliasing), bicubic when enlarging.
    interpolation = "AREA" if scale < 1 else "BICUBIC"
    rgb = frame.reformat(width=scaled_w, height=scaled_h, format="rgb24",
                         interpolation=interpolation).to_ndarray()
    top, left = (scaled_h - out_h) // 2, (scaled_w - out_w) // 2
    return np.ascontiguousarray(rgb[top:top + out_h, left:left + out_w])


def read_image(path: str, out_h: int, out_w: int) -> np.ndarray:
    """An image file -> uint8 [1, out_h, out_w, 3], scaled and cropped as `_to_size`."""
    from PIL import Image  # deferred: only building needs Pillow (imageio's dependency)
    if os.path.getsize(path) == 0:
        raise VideoError("empty file (0 bytes)")
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            scaled_w, scaled_h, scale = _cover(image.width, image.height, out_h, out_w)
            image = image.resize((scaled_w, scaled_h), Image.BOX if scale < 1 else Image.BICUBIC)
    except (OSError, ValueError) as e:
        raise VideoError(f"not a readable image: {e}") from e
    rgb = np.asarray(image)
    top, left = (scaled_h - out_h) // 2, (scaled_w - out_w) // 2
    return np.ascontiguousarray(rgb[top:top + out_h, left:left + out_w])[None]


def probe(path: str, fps: Fraction) -> tuple[int, int, float]:
    """(height, width, frames at `fps` the header promises, inf if it says nothing) of a video
    or image file, from its header alone."""
    if path.lower().endswith(IMAGE_EXTENSIONS):
        from PIL import Image
        try:
            with Image.open(path) as image:
                return image.height, image.width, 1
        except (OSError, ValueError) as e:
            raise VideoError(f"not a readable image: {e}") from e
    import av
    if os.path.getsize(path) == 0:
        raise VideoError("empty file (0 bytes)")
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise VideoError(f"no video stream (format {container.format.name})")
            stream = container.streams.video[0]
            promised = _expected_length(stream)
            size = (stream.codec_context.height, stream.codec_context.width)
    except VideoError:
        raise
    except Exception as e:  # PyAV raises many types for files it cannot parse
        raise VideoError(f"not a readable video: {getattr(e, 'strerror', None) or e}") from e
    if not promised:
        return size + (float("inf"),)
    what, value, _ = promised
    return size + (value if what == "frames" else value * float(fps),)


def _expected_length(stream) -> tuple[str, float, float] | None:
    """(what, value, tolerance) the header promises, for spotting truncated files, or None."""
    rate = stream.average_rate or stream.guessed_rate
    period = float(1 / rate) if rate else 0.0
    if stream.duration and stream.time_base:
        seconds = float(stream.duration * stream.time_base)
        return "seconds", seconds, max(2 * period, 0.01 * seconds)
    if stream.frames:
        return "frames", float(stream.frames), max(2.0, 0.01 * stream.frames)
    tag = (stream.metadata or {}).get("DURATION")  # Matroska/WebM writers put one per track
    if tag:
        match = re.fullmatch(r"(\d+):(\d+):(\d+(?:\.\d*)?)", tag.strip())
        if match:
            hours, minutes, seconds = match.groups()
            seconds = int(hours) * 3600 + int(minutes) * 60 + float(seconds)
            return "seconds", seconds, max(2 * period, 0.01 * seconds)
    return None


def resampled_frames(path: str, fps: Fraction, size: int | tuple[int, int],
                     wanted=None) -> Iterator[np.ndarray | None]:
    """Yields the frames of the video at `path` at `fps`, as uint8 [size, size, 3] (or
    [height, width, 3] for a size (height, width)), streaming.

    Output frame k shows the latest source frame whose time is at or before k / fps (times
    relative to the first frame; the last source frame lasts one frame period). `wanted(k)` False
    yields None instead, skipping the resize. Raises VideoError if the file cannot be opened,
    has no video stream or ends well before its header says (after yielding what it had);
    decoder errors part-way propagate as they are.
    """
    import av  # deferred: only building needs PyAV

    out_h, out_w = (size, size) if isinstance(size, int) else size
    if os.path.getsize(path) == 0:
        raise VideoError("empty file (0 bytes)")
    try:
        container = av.open(path)
    except Exception as e:  # PyAV raises many types for files it cannot parse
        raise VideoError(f"not a readable video: {getattr(e, 'strerror', None) or e}") from e
    with container:
        if not container.streams.video:
            raise VideoError(f"no video stream (format {container.format.name})")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate or Fraction(25)
        source_period = Fraction(1) / Fraction(rate)
        period = 1 / fps
        # Timestamps are rounded to the container's clock (ms for WebM): a frame counts as
        # "at or before" an instant up to a quarter of the shorter period after it.
        tolerance = min(period, source_period) / 4
        index, start, previous, previous_time = 0, None, None, None
        converted = None  # (source frame, its square array), converted at most once
        decoded = 0

        def emit(frame):
            nonlocal index, converted
            if wanted is not None and not wanted(index):
                array = None
            else:
                if converted is None or converted[0] is not frame:
                    converted = (frame, _to_size(frame, out_h, out_w))
                array = converted[1]
            index += 1
            return array

        for frame in container.decode(stream):
            if frame.pts is not None and frame.time_base is not None:
                time = Fraction(frame.pts) * Fraction(frame.time_base)
            else:
                time = decoded * source_period
            decoded += 1
            if start is None:
                start = time
            time -= start
            if previous is not None:
                while index * period < time - tolerance:  # instants before this frame
                    yield emit(previous)
            previous, previous_time = frame, time
        if previous is None:
            raise VideoError("no frames could be decoded")
        end = previous_time + source_period
        while index * period < end - tolerance:
            yield emit(previous)
        promised = _expected_length(stream)
        if promised:
            what, value, slack = promised
            got = decoded if what == "frames" else float(end)
            if got < value - slack:
                unit = "frames" if what == "frames" else "s"
                raise VideoError(f"truncated: decoded {got:.4g} of the {value:.4g} {unit} its "
                                 "header promises")


def clip_shape(path: str, spec: ClipSpec) -> tuple[int, int, int]:
    """(frames, height, width) of the clips of the file at `path`: the spec's square clip, or
    with buckets the bucket of the file's size and promised length."""
    is_image = path.lower().endswith(IMAGE_EXTENSIONS)
    if not spec.buckets:
        if is_image:
            raise VideoError("an image: build with --buckets to ingest images as 1-frame clips")
        return spec.frames, spec.size, spec.size
    height, width, frames = probe(path, spec.fps)
    k = buckets.assign((min(frames, 1 << 30), height, width), list(spec.buckets))
    if k < 0:
        raise VideoError(f"too short: about {frames:.4g} frames at {float(spec.fps):g} fps, "
                         "fewer than every bucket's")
    return spec.buckets[k].shape


def iter_clips(path: str, spec: ClipSpec) -> Iterator[tuple[int, np.ndarray]]:
    """Yields (start_frame, uint8 [frames, height, width, 3]) windows of the file at `path`
    (its `clip_shape`; an image is one 1-frame clip).

    Raises VideoError "too short" when not even one window fits (and other problems as
    `resampled_frames`, after yielding the clips before them).
    """
    frames, height, width = clip_shape(path, spec)
    if path.lower().endswith(IMAGE_EXTENSIONS):
        yield 0, read_image(path, height, width)
        return
    stride = spec.stride or frames
    buffer: list[np.ndarray] = []  # frames next_start, next_start + 1, ...
    next_start, total, clips = 0, 0, 0

    def wanted(k):  # frames before the next window (stride > frames) are never resized
        return k >= next_start

    for frame in resampled_frames(path, spec.fps, (height, width), wanted):
        total += 1
        if frame is None:
            continue
        buffer.append(frame)
        if len(buffer) == frames:
            yield next_start, np.stack(buffer)
            clips += 1
            next_start += stride
            buffer = buffer[stride:]
    if not clips:
        raise VideoError(f"too short: {total} frames at {float(spec.fps):g} fps, "
                         f"fewer than one clip of {frames}")


# --------------------------------------------------------------------------- #
# The TFDS builder.
# --------------------------------------------------------------------------- #

@dataclasses.dataclass
class Report:
    """What happened to every file; `skipped.json` is `to_json()`."""

    files: dict = dataclasses.field(default_factory=lambda: {s: 0 for s in SPLITS})
    clips: dict = dataclasses.field(default_factory=lambda: {s: 0 for s in SPLITS})
    skipped: list = dataclasses.field(default_factory=list)  # [{file, split, reason}]: no clips
    partial: list = dataclasses.field(default_factory=list)  # ... and clips_kept
    unmatched_captions: list = dataclasses.field(default_factory=list)
    settings: dict = dataclasses.field(default_factory=dict)

    def forget(self, split: str) -> None:
        """Drops what is known of `split` (before generating it again)."""
        self.files[split] = self.clips[split] = 0
        self.skipped = [item for item in self.skipped if item["split"] != split]
        self.partial = [item for item in self.partial if item["split"] != split]

    def to_json(self) -> dict:
        return {"settings": self.settings, "files": self.files, "clips": self.clips,
                "skipped": self.skipped, "partial": self.partial,
                "unmatched_captions": self.unmatched_captions}

    def text(self) -> str:
        lines = [f"clips: {self.clips['train']} train / {self.clips['validation']} validation "
                 f"(from {self.files['train']} / {self.files['validation']} usable files)"]
        lines.append(f"skipped {len(self.skipped)} file(s)" + (":" if self.skipped else ""))
        lines += [f"  {item['file']}: {item['reason']}" for item in self.skipped]
        if self.partial:
            lines.append(f"kept part of {len(self.partial)} file(s):")
            lines += [f"  {item['file']}: {item['reason']} ({item['clips_kept']} clip(s) kept)"
                      for item in self.partial]
        missing = [split for split in SPLITS if not self.clips[split]]
        if missing and len(missing) < len(SPLITS):
            lines.append(f"no {' or '.join(missing)} split: no clip came from a file hashed "
                         "into it (see --val_fraction)")
        if self.unmatched_captions:
            shown = ", ".join(self.unmatched_captions[:5])
            more = len(self.unmatched_captions) - 5
            lines.append(f"{len(self.unmatched_captions)} caption(s) match no video file: {shown}"
                         + (f" and {more} more" if more > 0 else ""))
        return "\n".join(lines)


class VideoFolder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Clips of the videos in a folder; `builder_class(name)` gives a subclass named `name`.

    Never registered with TFDS: training opens the dataset from its files
    (`tfds.builder(name, data_dir=...)`), which needs none of the arguments below.
    """

    name = DEFAULT_NAME
    VERSION = tfds.core.Version(VERSION)
    RELEASE_NOTES = {str(VERSION): "Initial release."}
    code_path = epath.Path(__file__)  # see moving_digits.MovingDigits.code_path

    def __init__(self, *, videos: str, spec: ClipSpec, files: dict[str, list[str]],
                 captions: dict[str, str] | None = None, report: Report | None = None,
                 show_progress: bool = True, **kwargs):
        """`files`: {split: relative paths}; every split listed must yield a clip."""
        self._videos = videos
        self._spec = spec
        self._files = files
        self._captions = captions or {}
        self._show_progress = show_progress
        self.report = report or Report()
        self.empty_split = None  # set when a split yields nothing (TFDS then fails)
        kwargs.setdefault("file_format", tfds.core.FileFormat.ARRAY_RECORD)
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        spec = self._spec
        if spec.buckets:
            what = ", ".join(b.name for b in spec.buckets)
            description = (f"Clips at {float(spec.fps):g} fps in the buckets {what} (frames x "
                           f"height x width, RGB), from the videos and images in {self._videos}.")
            shape = (None, None, None, 3)
        else:
            description = (f"Clips of {spec.frames} frames at {float(spec.fps):g} fps, "
                           f"{spec.size}x{spec.size} RGB, from the videos in {self._videos}.")
            shape = (spec.frames, spec.size, spec.size, 3)
        features = {
            # A zlib tensor like moving_digits: TFDS's video codec needs TensorFlow.
            "video": tfds.features.Tensor(shape=shape, dtype=np.uint8, encoding="zlib"),
            "caption": tfds.features.Text(),
            "source": tfds.features.Text(),
            "start_frame": tfds.features.Scalar(dtype=np.int64),
        }
        if spec.buckets:
            features["bucket"] = tfds.features.Text()  # '16x144x256'
        return tfds.core.DatasetInfo(builder=self, description=description,
                                     features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        del dl_manager  # everything is local
        # TFDS generates splits in this order; validation (usually the smaller) goes first, so
        # that if it yields nothing (which TFDS cannot write) little work is redone.
        return {split: self._generate_examples(split, self._files[split])
                for split in ("validation", "train") if split in self._files}

    def _generate_examples(self, split: str, files: list[str]):
        for source in _progress(files, desc=f"{split} files", unit="file",
                                disable=not self._show_progress):
            kept = 0
            try:
                for start, video in iter_clips(os.path.join(self._videos, source), self._spec):
                    example = {"video": video, "caption": self._captions.get(source, ""),
                               "source": source, "start_frame": start}
                    if self._spec.buckets:
                        example["bucket"] = "x".join(str(n) for n in video.shape[:3])
                    yield f"{source}@{start}", example
                    kept += 1
            except Exception as e:  # any decoder failure is one file's problem, not the build's
                reason = str(e) if isinstance(e, VideoError) else (
                    f"decoding failed: {type(e).__name__}: {e}")
                item = {"file": source, "split": split, "reason": reason}
                if kept:
                    self.report.partial.append({**item, "clips_kept": kept})
                else:
                    self.report.skipped.append(item)
            if kept:
                self.report.files[split] += 1
                self.report.clips[split] += kept
        if not self.report.clips[split]:
            self.empty_split = split


def builder_class(name: str) -> type[VideoFolder]:
    """A VideoFolder subclass whose TFDS name (and folder under data_dir) is `name`."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name or ""):
        raise BuildError(f"--name {name!r} must be lower-case letters, digits and underscores, "
                         "starting with a letter (a TFDS dataset name)")
    class_name = "".join(part.capitalize() for part in name.split("_"))
    return type(class_name, (VideoFolder,), {"name": name, "__module__": __name__},
                skip_registration=True)


def parse_buckets(text: str | None) -> tuple:
    """--buckets 'FxHxW,...' -> buckets.Bucket tuple (batch sizes and weights are the trainer's
    business and ignored here)."""
    if not text:
        return ()
    try:
        return tuple(buckets.parse(text, frames=1, height=1, width=1, batch_size=1))
    except buckets.BucketError as e:
        raise BuildError(str(e).replace("config.data.buckets", "--buckets")) from None


def build(videos: str, data_dir: str, *, frames: int = 0, fps, size: int = 0,
          stride: int | None = None, captions: str | None = None, name: str = DEFAULT_NAME,
          val_fraction: float = 0.1, overwrite: bool = False, show_progress: bool = True,
          buckets_: str | None = None) -> tuple[VideoFolder, Report]:
    """Builds the dataset; returns the prepared builder and the report (also in skipped.json).
    `buckets_` ('FxHxW,...') keeps aspect ratios and ingests images (module docstring).

    A split that gets no clip (no file hashed into it, or all of its files skipped) is left out
    of the dataset; if no split gets one, BuildError says so, with the report.
    """
    bucket_list = parse_buckets(buckets_)
    spec = ClipSpec(frames=frames, fps=as_fraction(fps), size=size,
                    stride=(0 if bucket_list else frames) if stride is None else stride,
                    buckets=bucket_list)
    if not 0.0 <= val_fraction <= 1.0:
        raise BuildError(f"--val_fraction must lie in [0, 1], got {val_fraction}")
    cls = builder_class(name)
    videos = os.path.abspath(os.path.expanduser(videos))
    sources = list_videos(videos)
    caption_map, unmatched = read_captions(captions, videos, sources) if captions else ({}, [])
    dest = storage.path(data_dir)
    files = {split: [] for split in SPLITS}
    for source in sources:
        files[split_of(source, val_fraction)].append(source)
    files = {split: paths for split, paths in files.items() if paths}
    report = Report(unmatched_captions=unmatched, settings={
        "videos": videos, "captions": captions, "frames": spec.frames, "fps": float(spec.fps),
        "size": spec.size, "stride": spec.stride, "val_fraction": val_fraction,
        "buckets": [b.name for b in bucket_list],
        "files_found": len(sources)})

    def make(root):
        return cls(videos=videos, spec=spec, files=files, captions=caption_map, report=report,
                   show_progress=show_progress, data_dir=root)

    target = storage.path(make(dest).data_dir)
    if target.exists():
        if not overwrite:
            raise BuildError(f"{target} already exists; pass --overwrite to rebuild it, or "
                             "--name to build another dataset")
        target.rmtree()
    # ArrayRecord writes local files only: a bucket's copy is built locally, then uploaded.
    with storage.staged(dest) as local_root:
        while True:
            builder = make(local_root)
            if os.path.exists(builder.data_dir):  # a half-written earlier attempt
                shutil.rmtree(builder.data_dir)
            try:
                builder.download_and_prepare()
                break
            except Exception:
                empty = builder.empty_split
                if empty is None:
                    raise
            # TFDS cannot write an empty split: build again without it, keeping its report.
            for split in files:
                if split != empty:
                    report.forget(split)  # generated again
            del files[empty]
            if not files:
                raise BuildError(f"no clips: every one of the {len(sources)} video files under "
                                 f"{videos} was skipped\n{report.text()}")
        with open(os.path.join(builder.data_dir, REPORT), "w") as f:
            json.dump(report.to_json(), f, indent=2)
        if bucket_list:  # each record's shape, read by the pipeline's buckets
            for split in files:
                buckets.record_shapes(builder, split)
    return make(dest), report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_pipelines.build_video_folder",
        description="Turn a folder of videos (+ captions) into a TFDS ArrayRecord clip dataset.")
    parser.add_argument("--videos", required=True,
                        help="folder of video files (searched recursively)")
    parser.add_argument("--captions", help="CSV or JSONL file with 'path' and 'caption' fields")
    parser.add_argument("--data_dir", required=True, help="TFDS data root to write into")
    parser.add_argument("--frames", type=int, default=0, help="frames per clip (no --buckets)")
    parser.add_argument("--fps", type=float, required=True, help="frame rate of the clips")
    parser.add_argument("--size", type=int, default=0, help="clip height and width (no --buckets)")
    parser.add_argument("--buckets", help="'FxHxW,...': keep aspect ratios, each file in its "
                        "nearest bucket; images become 1-frame clips")
    parser.add_argument("--stride", type=int,
                        help="frames between the starts of windows (default: --frames)")
    parser.add_argument("--name", default=DEFAULT_NAME,
                        help="dataset name (data.name when training)")
    parser.add_argument("--val_fraction", type=float, default=0.1,
                        help="fraction of files (by hash of the path) in the validation split")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing build")
    args = parser.parse_args(argv)
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)  # TFDS is chatty at INFO
    tfds.disable_progress_bar()  # ours counts files; TFDS's would count examples per split
    try:
        builder, report = build(args.videos, args.data_dir, frames=args.frames, fps=args.fps,
                                size=args.size, stride=args.stride, captions=args.captions,
                                name=args.name, val_fraction=args.val_fraction,
                                overwrite=args.overwrite, buckets_=args.buckets)
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.text())
    shape = (f"--config.data.buckets='{args.buckets}'" if args.buckets else
             f"--config.data.height={args.size} --config.data.width={args.size}")
    print(f"wrote {builder.data_dir} (report: {REPORT} there); train with "
          f"--config.data.name={builder.name} --config.data.data_dir={args.data_dir} "
          f"--config.data.channels=3 --config.model.channels=3 {shape}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
