"""`moving_digits`: a small video dataset that ships with the code.

Clips of one handwritten digit bouncing around a black 32x32 canvas, made from
scikit-learn's bundled 8x8 digits, so tests, tutorials and CPU smoke runs have
real (if tiny) video data without any download. Each clip has a caption such
as "a 3 moving up and to the left", so text conditioning has something
learnable to do; `captions="varied"` (a builder argument) phrases them several ways
("a seven drifting to the left", "the digit 7 moves left", ...), and `captions_for`
writes evaluation prompts, including paraphrases no dataset contains.

Everything is a pure function of a seed: `make_clip` turns (rng, image, label)
into a clip, `generate` yields the examples of a split, and the TFDS builder
`MovingDigits` writes them as ArrayRecord files (readable without TensorFlow)
through `load_builder`, which builds once and then reuses the files.
"""
import contextlib
import dataclasses
import fcntl
import functools
import os
import sys

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from data_pipelines import buckets
from vidit import storage

NAME = "moving_digits"
NUM_FRAMES = 16
CANVAS = 32  # canvas height and width
DIGIT = 16  # side of a digit after upscaling
MAX_SPEED = 2  # pixels per frame along each axis

# The 1797 sklearn digits are split by position so that train and validation
# clips never share a source image.
NUM_TRAIN_IMAGES = 1500
_SPLITS = ("train", "validation")

DEFAULT_DATA_DIR = "~/.cache/vidit/tensorflow_datasets"
DATA_DIR_ENV = "VIDIT_DATA_DIR"


def default_data_dir() -> str:
    """Where datasets live unless told otherwise: $VIDIT_DATA_DIR or ~/.cache/vidit/..."""
    return os.path.expanduser(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR)


@functools.cache
def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """[n_out, n_in] linear-interpolation weights with half-pixel centres (as image resizers use)."""
    src = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
    src = np.clip(src, 0, n_in - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    weights = np.zeros((n_out, n_in))
    weights[np.arange(n_out), lo] += 1 - frac
    weights[np.arange(n_out), hi] += frac
    return weights


def upscale_digit(image: np.ndarray) -> np.ndarray:
    """Bilinear 8x8 (grey levels 0..16) -> uint8 [DIGIT, DIGIT] in 0..255."""
    image = np.asarray(image, dtype=np.float64)
    rows = _interp_matrix(DIGIT, image.shape[0])
    cols = _interp_matrix(DIGIT, image.shape[1])
    big = rows @ image @ cols.T  # separable bilinear resize
    return np.clip(np.round(big * (255.0 / 16.0)), 0, 255).astype(np.uint8)


def _direction_words(vy: int, vx: int) -> str:
    """Caption words for a velocity in image coordinates (rows grow downwards)."""
    vertical = "up" if vy < 0 else "down" if vy > 0 else ""
    horizontal = "to the left" if vx < 0 else "to the right" if vx > 0 else ""
    if vertical and horizontal:
        return f"{vertical} and {horizontal}"
    # A lone horizontal move reads better without "to the".
    return vertical or horizontal.removeprefix("to the ")


def _sample_velocity(rng: np.random.Generator) -> np.ndarray:
    """Per-axis speed in {0, 1, 2} with a random sign, never both zero."""
    while True:
        velocity = rng.integers(-MAX_SPEED, MAX_SPEED + 1, size=2)
        if velocity.any():
            return velocity


# Caption styles (builder_kwargs captions=...). 'plain' is one phrasing ("a 3 moving up");
# 'varied' mixes several phrasings, digit symbols and number words, so a text encoder has to
# map different sentences to the same clip. 'paraphrase' is never written to a dataset: its
# phrasings use words no training caption has ("number", "numeral", "going", "heading", ...),
# to test whether a conditioning generalises beyond the captions it was trained on.
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CAPTION_TEMPLATES = {
    "plain": ("a {digit} moving {direction}",),
    "varied": ("a {digit} moving {direction}",
               "{a_word} drifting {direction}",
               "the digit {digit} moves {direction}",
               "{a_word} sliding {direction}",
               "the {word} drifts {direction}",
               "digit {digit} slides {direction}"),
    "paraphrase": ("number {word} going {direction}",
                   "the numeral {digit} heading {direction}",
                   "a handwritten {word} travelling {direction}"),
}
TRAIN_CAPTIONS = ("plain", "varied")


def caption(label: int, velocity, style: str, rng: np.random.Generator) -> str:
    """A caption of a clip of digit `label` moving at `velocity` in one of `style`'s phrasings."""
    templates = CAPTION_TEMPLATES[style]
    template = templates[int(rng.integers(len(templates)))] if len(templates) > 1 else templates[0]
    word = NUMBER_WORDS[int(label)]
    a_word = ("an " if word[0] in "aeiou" else "a ") + word  # "an eight"
    return template.format(digit=int(label), word=word, a_word=a_word,
                           direction=_direction_words(*velocity))


def captions_for(labels, style: str, seed: int = 0) -> list:
    """Captions for clips of `labels` with random directions (an evaluation's prompts)."""
    rng = np.random.default_rng(seed)
    return [caption(label, _sample_velocity(rng), style, rng) for label in labels]


def _trajectory(start: np.ndarray, velocity: np.ndarray, num_frames: int,
                canvas: tuple[int, int] = (CANVAS, CANVAS)) -> np.ndarray:
    """[num_frames, 2] top-left corners moving at `velocity`, reflecting off the walls."""
    corners = np.empty((num_frames, 2), dtype=np.int64)
    for axis in range(2):  # the axes bounce independently
        limit = canvas[axis] - DIGIT
        position, speed = int(start[axis]), int(velocity[axis])
        for t in range(num_frames):
            corners[t, axis] = position
            position += speed
            # Speeds are far below `limit`, so a single reflection always suffices.
            if position < 0 or position > limit:
                position = -position if position < 0 else 2 * limit - position
                speed = -speed
    return corners


def make_clip(rng: np.random.Generator, image: np.ndarray, label: int, captions: str = "plain",
              shape: tuple[int, int, int] = (NUM_FRAMES, CANVAS, CANVAS)):
    """Makes one clip of `image` (an 8x8 sklearn digit) moving on a black canvas.

    Returns:
      video: uint8 [frames, height, width, 1] of `shape` (default [NUM_FRAMES, CANVAS, CANVAS]).
      caption: e.g. "a 3 moving up and to the left", describing the velocity in one of the
        phrasings of `captions` (CAPTION_TEMPLATES). The phrasing is drawn after the video,
        so the same rng gives the same video in every caption style.
    """
    digit = upscale_digit(image)
    velocity = _sample_velocity(rng)
    # Start at least one step away from every wall, so the first move is never
    # a bounce and the caption describes the motion actually seen first.
    speed = np.abs(velocity)
    frames, height, width = shape
    start = rng.integers(speed, np.array([height, width]) - DIGIT - speed + 1)
    video = np.zeros((frames, height, width, 1), dtype=np.uint8)
    for frame, (y, x) in zip(video, _trajectory(start, velocity, frames, (height, width))):
        frame[y:y + DIGIT, x:x + DIGIT, 0] = digit
    return video, caption(label, velocity, captions, rng)


def _source_images(split: str):
    """(images [n, 8, 8], labels [n]) of the sklearn digits reserved for `split`."""
    from sklearn.datasets import load_digits  # deferred: slow import, only needed to build

    digits = load_digits()
    if split == "train":
        return digits.images[:NUM_TRAIN_IMAGES], digits.target[:NUM_TRAIN_IMAGES]
    if split == "validation":
        return digits.images[NUM_TRAIN_IMAGES:], digits.target[NUM_TRAIN_IMAGES:]
    raise ValueError(f"unknown split {split!r}; expected one of {_SPLITS}")


# Clip shapes of the 'mixed' builder config: (frames, (height, width)) drawn per clip. A 1-frame
# clip is an image; the canvases are square, wide and tall.
MIXED_FRAMES = ((1, 0.25), (4, 0.15), (8, 0.2), (16, 0.4))  # (frames, probability)
MIXED_CANVASES = ((32, 32), (32, 48), (48, 32))
SHAPES = ("square", "mixed")


def clip_shape(rng: np.random.Generator, shapes: str) -> tuple[int, int, int]:
    """(frames, height, width) of the next clip: the stock square clip, or a 'mixed' draw."""
    if shapes == "square":
        return (NUM_FRAMES, CANVAS, CANVAS)
    frames = MIXED_FRAMES[rng.choice(len(MIXED_FRAMES), p=[p for _, p in MIXED_FRAMES])][0]
    return (int(frames),) + MIXED_CANVASES[int(rng.integers(len(MIXED_CANVASES)))]


def generate(split: str, num: int, seed: int, captions: str = "plain", shapes: str = "square"):
    """Yields `num` examples {'video', 'label', 'caption'} of `split`.

    Clip i depends only on (seed, split, i), so any prefix of the split can be
    regenerated exactly, with or without the TFDS files.
    """
    images, labels = _source_images(split)
    split_id = _SPLITS.index(split)
    for index in range(num):
        rng = np.random.default_rng((seed, split_id, index))
        source = int(rng.integers(len(images)))
        shape = clip_shape(rng, shapes)
        video, text = make_clip(rng, images[source], labels[source], captions, shape)
        yield {"video": video, "label": int(labels[source]), "caption": text}


@dataclasses.dataclass(kw_only=True)
class MovingDigitsConfig(tfds.core.BuilderConfig):
    """Sizes of the splits, the generation seed, the caption style (CAPTION_TEMPLATES) and the
    clip shapes ('square': 16 x 32 x 32; 'mixed': MIXED_FRAMES x MIXED_CANVASES)."""

    num_train: int = 8192
    num_validation: int = 512
    seed: int = 0
    captions: str = "plain"
    shapes: str = "square"


_DEFAULT_CONFIG = MovingDigitsConfig(name="default", description="8192 train / 512 validation clips")


def _config_for(num_train: int, num_validation: int, seed: int,
                captions: str = "plain", shapes: str = "square") -> MovingDigitsConfig:
    """The stock config for default sizes, else a custom one whose name keeps its files apart."""
    if shapes not in SHAPES:
        raise ValueError(f"moving_digits shapes={shapes!r} is unknown; valid: {SHAPES}")
    if captions not in TRAIN_CAPTIONS:
        raise ValueError(f"moving_digits captions={captions!r} is unknown; valid: {TRAIN_CAPTIONS} "
                         "('paraphrase' phrasings are kept out of every dataset for evaluation)")
    default = _DEFAULT_CONFIG
    if (num_train, num_validation, seed, captions, shapes) == (
            default.num_train, default.num_validation, default.seed, default.captions,
            default.shapes):
        return default
    style = "" if captions == "plain" else f"_captions{captions}"
    style += "" if shapes == "square" else f"_shapes{shapes}"
    return MovingDigitsConfig(
        name=f"train{num_train}_validation{num_validation}_seed{seed}{style}",
        description=f"{num_train} train / {num_validation} validation clips, seed {seed}, "
                    f"{captions} captions, {shapes} shapes",
        num_train=num_train, num_validation=num_validation, seed=seed, captions=captions,
        shapes=shapes,
    )


class MovingDigits(tfds.core.GeneratorBasedBuilder):
    """TFDS builder for `moving_digits`; nothing to download, written as ArrayRecord.

    Sizes and the caption style are constructor keyword arguments (so `tfds.builder(NAME,
    num_train=64, num_validation=16)` works); each gets its own config and directory.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [_DEFAULT_CONFIG]
    # TFDS finds this file itself (to look for download checksums) via a path
    # that imports `importlib_resources`, which is not always installed; the
    # answer is simply this file.
    code_path = epath.Path(__file__)

    def __init__(self, *, num_train: int = _DEFAULT_CONFIG.num_train,
                 num_validation: int = _DEFAULT_CONFIG.num_validation,
                 seed: int = _DEFAULT_CONFIG.seed, captions: str = _DEFAULT_CONFIG.captions,
                 shapes: str = _DEFAULT_CONFIG.shapes, **kwargs):
        kwargs.setdefault("config", _config_for(num_train, num_validation, seed, captions,
                                                shapes))
        # Grain worker processes rebuild the builder from a pickled copy of its config; TFDS
        # refuses a copy that shares a stock config's name, so the stock one goes by name.
        if getattr(kwargs["config"], "name", None) == _DEFAULT_CONFIG.name:
            kwargs["config"] = _DEFAULT_CONFIG.name
        # ArrayRecord supports random access, which Grain needs, and needs no TensorFlow.
        kwargs.setdefault("file_format", tfds.core.FileFormat.ARRAY_RECORD)
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        square = self.builder_config.shapes == "square"
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                # A plain zlib tensor: TFDS's image/video codecs need TensorFlow
                # to encode, and a mostly black clip compresses well anyway.
                "video": tfds.features.Tensor(
                    shape=(NUM_FRAMES, CANVAS, CANVAS, 1) if square else (None, None, None, 1),
                    dtype=np.uint8, encoding="zlib"),
                "label": tfds.features.ClassLabel(num_classes=10),
                "caption": tfds.features.Text(),
            }),
            supervised_keys=("video", "label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # everything is generated locally
        sizes = {"train": self.builder_config.num_train,
                 "validation": self.builder_config.num_validation}
        return {split: self._generate_examples(split, num) for split, num in sizes.items()}

    def _generate_examples(self, split: str, num: int):
        # TFDS wants a unique key per example; the clip's index is one.
        config = self.builder_config
        return enumerate(generate(split, num, config.seed, config.captions, config.shapes))


@contextlib.contextmanager
def _build_lock(data_dir: str):
    """An exclusive flock on a file in a local data_dir; nothing for remote (gs://) roots."""
    if "://" in data_dir:
        yield
        return
    os.makedirs(data_dir, exist_ok=True)
    with open(os.path.join(data_dir, f".{NAME}.build.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


def load_builder(data_dir=None, **kwargs) -> MovingDigits:
    """Returns a prepared `MovingDigits` builder, generating the files on first use.

    Args:
      data_dir: TFDS data root; None means `default_data_dir()`.
      **kwargs: `num_train`, `num_validation`, `seed`, `captions`, `shapes` (see
        `MovingDigitsConfig`).
    """
    data_dir = data_dir or default_data_dir()
    builder = MovingDigits(data_dir=data_dir, **kwargs)
    if builder.is_prepared():
        return builder
    # Runs started together (two seeds on one machine) would both build, and the second to
    # finish failed renaming onto the first's files: the first to take the lock builds, the
    # others wait for it and then read its files (a local lock: not for gs:// roots).
    with _build_lock(str(data_dir)):
        builder = MovingDigits(data_dir=data_dir, **kwargs)
        if not builder.is_prepared():
            config = builder.builder_config
            print(f"Building {NAME} ({config.num_train} train / {config.num_validation} "
                  f"validation clips) in {builder.data_dir} ...", flush=True)
            # ArrayRecord writes local files only: a bucket's copy is built locally, then
            # uploaded (vidit/storage.py); readers read it from the bucket.
            if not sys.stderr.isatty():  # logs (CI, SLURM): the two lines around it suffice,
                tfds.display_progress_bar(False)  # not a bar redrawn into the file
            with storage.staged(data_dir) as local_dir:
                local = MovingDigits(data_dir=local_dir, **kwargs)
                local.download_and_prepare()
                if config.shapes != "square":  # the shape index buckets read (buckets.py)
                    for split in local.info.splits:
                        buckets.record_shapes(local, split)
            builder = MovingDigits(data_dir=data_dir, **kwargs)
            print(f"Built {NAME} in {builder.data_dir}", flush=True)
    return builder
