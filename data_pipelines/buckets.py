"""Shape buckets: clips of many sizes, every global batch of one shape.

A bucket is a clip shape (frames, height, width) with its own global batch size and a sampling
weight. `config.data.buckets` lists them as one string, comma-separated entries
`FxHxW[:batch[:weight]]`:

    "8x32x32:16, 8x32x48:12:1, 8x48x32:12:1, 1x32x32:64:0.5"

An omitted (or 0) batch keeps the tokens of a batch level with the run's reference shape
(data.num_frames x height x width at data.batch_size), rounded down to a multiple of
data.bucket_batch_multiple (at least one multiple); an omitted weight is 1. The rounding does not
depend on the mesh, so a run resumed on another host count reads the same batches. The empty string is the single bucket
(data.num_frames, data.height, data.width) at data.batch_size.

Which bucket a stored clip belongs to is a pure function of its stored shape (`assign`): the
buckets it is long enough for (images, 1-frame clips, fit only 1-frame buckets), then the nearest
aspect ratio, then the most frames, then the largest area not above the clip's own. Stored
shapes come from the dataset's shape index (`record_shapes`), which the project's builders write
beside their files.

Only numpy, ml_collections-free: Grain worker processes import this.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math

import numpy as np

log = logging.getLogger("vidit")

SHAPES_FILE = "shapes-{split}.npy"  # [n, 3] int32 (frames, height, width) of each record


@dataclasses.dataclass(frozen=True)
class Bucket:
    frames: int
    height: int
    width: int
    batch_size: int
    weight: float = 1.0

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.frames, self.height, self.width)

    @property
    def name(self) -> str:
        """'8x32x48': the bucket's key in logs and TensorBoard."""
        return "x".join(str(n) for n in self.shape)


class BucketError(ValueError):
    """A bucket list that cannot be parsed or used (names the entry and what is wrong)."""


def parse(text: str, *, frames: int, height: int, width: int, batch_size: int,
          multiple: int = 1) -> list[Bucket]:
    """The buckets of `config.data.buckets` (see the module docstring); the reference shape
    (frames, height, width, batch_size) fills omitted batch sizes and is the one bucket of ''."""
    if not text.strip():
        return [Bucket(frames, height, width, batch_size)]
    reference_pixels = frames * height * width * batch_size
    buckets = []
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        parts = entry.split(":")
        try:
            shape = tuple(int(n) for n in parts[0].lower().split("x"))
            batch = int(parts[1]) if len(parts) > 1 and parts[1] else 0
            weight = float(parts[2]) if len(parts) > 2 else 1.0
        except ValueError:
            shape, batch, weight = (), 0, 0.0
        if len(shape) != 3 or len(parts) > 3 or min(shape) < 1 or batch < 0 or weight < 0:
            raise BucketError(
                f"config.data.buckets entry {entry!r} is not FRAMESxHEIGHTxWIDTH[:batch[:weight]] "
                "with positive sizes (e.g. '8x32x48:12:1')")
        if not batch:  # tokens per batch level with the reference shape
            batch = max(multiple, reference_pixels // math.prod(shape) // multiple * multiple)
        buckets.append(Bucket(*shape, batch, weight))
    if not buckets or not sum(b.weight for b in buckets) > 0:
        raise BucketError(f"config.data.buckets={text!r} has no bucket with a positive weight")
    names = [b.name for b in buckets]
    if len(set(names)) != len(names):
        raise BucketError(f"config.data.buckets={text!r} lists a shape twice")
    return buckets


def from_config(data_cfg) -> list[Bucket]:
    return parse(str(data_cfg.get("buckets", "")), frames=int(data_cfg.num_frames),
                 height=int(data_cfg.height), width=int(data_cfg.width),
                 batch_size=int(data_cfg.batch_size),
                 multiple=int(data_cfg.get("bucket_batch_multiple", 8)))


def assign(shape, buckets: list[Bucket], frame_stride: int = 1) -> int:
    """The index of the bucket a clip of stored `shape` (frames, height, width) trains in, or
    -1 when it is too short for every bucket."""
    frames, height, width = (int(n) for n in shape)
    fits = [i for i, b in enumerate(buckets)
            if (b.frames - 1) * frame_stride + 1 <= frames and (b.frames == 1) == (frames == 1)]
    if not fits:  # a video too short for its own kind: any bucket it is long enough for
        fits = [i for i, b in enumerate(buckets) if (b.frames - 1) * frame_stride + 1 <= frames]
    if not fits:
        return -1
    aspect = math.log(height / width)

    def key(i):
        b = buckets[i]
        area = b.height * b.width
        return (round(abs(math.log(b.height / b.width) - aspect), 6), -b.frames,
                (0, -area) if area <= height * width else (1, area))

    return min(fits, key=key)


def assign_all(shapes: np.ndarray, buckets: list[Bucket], frame_stride: int = 1) -> np.ndarray:
    """`assign` of every row of shapes [n, 3] (distinct shapes computed once)."""
    shapes = np.asarray(shapes).reshape(-1, 3)
    unique, inverse = np.unique(shapes, axis=0, return_inverse=True)
    return np.array([assign(s, buckets, frame_stride) for s in unique],
                    np.int64)[inverse.reshape(-1)]


# --------------------------------------------------------------------------- #
# The stored shape of every record.
# --------------------------------------------------------------------------- #

def write_shapes(data_dir, split: str, shapes) -> None:
    """Writes the shape index of `split` into a dataset folder (local or gs://)."""
    from etils import epath  # pylint: disable=g-import-not-at-top
    path = epath.Path(data_dir) / SHAPES_FILE.format(split=split)
    with path.open("wb") as f:
        np.save(f, np.asarray(shapes, np.int32).reshape(-1, 3))


def record_shapes(builder, split: str, source=None) -> np.ndarray:
    """[n, 3] (frames, height, width) of every record of `split` (a split name without slicing):
    from the feature's static shape, else the shape index a builder wrote beside its files, else
    by reading every record once (then written there for next time, where that is allowed)."""
    from etils import epath  # pylint: disable=g-import-not-at-top
    feature = builder.info.features["video"] if "video" in builder.info.features else None
    n = builder.info.splits[split].num_examples
    if feature is not None and None not in feature.shape[:3]:
        return np.tile(np.asarray(feature.shape[:3], np.int32), (n, 1))
    path = epath.Path(builder.data_dir) / SHAPES_FILE.format(split=split)
    if path.exists():
        with path.open("rb") as f:
            shapes = np.load(f)
        if len(shapes) != n:
            raise BucketError(f"{path} lists {len(shapes)} shapes for {n} records: the shape "
                              "index is stale; delete it and it is rebuilt")
        return shapes
    if feature is None:
        raise BucketError(f"{builder.info.full_name}/{split} holds latents of several shapes but "
                          f"no shape index {path.name}: rewrite it with encode_latents")
    log.info("%s/%s has no shape index: reading every record's shape once",
                builder.info.full_name, split)
    source = source if source is not None else builder.as_data_source(split)
    shapes = np.array([np.shape(source[i]["video"])[:3] for i in range(len(source))], np.int32)
    try:
        write_shapes(builder.data_dir, split, shapes)
    except OSError as e:  # a read-only dataset: keep it in memory
        log.warning("could not write the shape index %s: %s", path, e)
    return shapes


def describe(buckets: list[Bucket], counts) -> str:
    """One line per bucket: shape, batch, weight and how many records fall in it."""
    return json.dumps({b.name: {"batch": b.batch_size, "weight": b.weight, "records": int(c)}
                       for b, c in zip(buckets, counts)})


# --------------------------------------------------------------------------- #
# Which bucket each step draws, and where in that bucket's stream it reads.
# --------------------------------------------------------------------------- #

class Schedule:
    """Step -> (bucket, offset of the step's first row in that bucket's example stream).

    Training: the bucket of step s is drawn with the buckets' weights from a generator seeded by
    (seed, s // BLOCK), so it is a pure function of (seed, s); the offset counts the rows of the
    earlier steps that drew the same bucket, kept as per-block prefix sums (a resume at step s
    computes s / BLOCK blocks, milliseconds for a million steps). With one bucket the offset is
    s * batch, the plain pipeline's order.

    Evaluation (`train=False`): every whole batch of every bucket once, buckets interleaved in
    proportion to their sizes, so the first few batches already cover every shape.
    """

    BLOCK = 4096

    def __init__(self, buckets: list[Bucket], sizes, seed: int, train: bool):
        self.batches = np.array([b.batch_size for b in buckets], np.int64)
        self.train, self.seed = train, int(seed)
        if train:
            live = np.array([b.weight if s else 0.0 for b, s in zip(buckets, sizes)])
            self.probs = live / live.sum()
            self._prefix = [np.zeros(len(buckets), np.int64)]  # rows drawn before block k
            self._blocks: dict[int, np.ndarray] = {}
        else:
            full = np.asarray(sizes, np.int64) // self.batches
            # Batch j of bucket k sits at (j + 0.5) / full[k] of the pass; sort by that.
            keys = [((j + 0.5) / f, k, j) for k, f in enumerate(full) for j in range(f)]
            self._order = [(k, j * int(self.batches[k])) for _, k, j in sorted(keys)]

    def __len__(self) -> int:
        return 2**62 if self.train else len(self._order)

    def _block(self, k: int) -> np.ndarray:
        if k not in self._blocks:
            rng = np.random.default_rng((self.seed, k))
            if len(self.probs) == 1:
                self._blocks[k] = np.zeros(self.BLOCK, np.int64)
            else:
                self._blocks[k] = rng.choice(len(self.probs), self.BLOCK, p=self.probs)
            if len(self._blocks) > 64:  # keep memory flat on long runs
                self._blocks.pop(next(iter(self._blocks)))
        return self._blocks[k]

    def locate(self, step: int) -> tuple[int, int]:
        if not self.train:
            return self._order[step]
        block, within = divmod(int(step), self.BLOCK)
        while len(self._prefix) <= block:  # prefix sums of rows per bucket, block by block
            k = len(self._prefix) - 1
            drawn = np.bincount(self._block(k), minlength=len(self.probs)) * self.batches
            self._prefix.append(self._prefix[-1] + drawn)
        choices = self._block(block)
        bucket = int(choices[within])
        earlier = int(np.count_nonzero(choices[:within] == bucket))
        return bucket, int(self._prefix[block][bucket] + earlier * self.batches[bucket])
