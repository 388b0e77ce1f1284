"""Grain input pipeline: TFDS ArrayRecord video datasets -> per-process batches.

The pipeline is a chain of random-access `grain.MapDataset`s, so every batch is
a pure function of (seed, step, row):

  records of each bucket -> shuffle(seed) -> repeat (train) -> preprocess(rng of the position)
         -> step s: the bucket it draws, this process's rows of its global batch -> iterator

Without config.data.buckets there is one bucket (data.num_frames x height x width) holding
every record; with them, each record trains in the bucket of its stored shape, and each step's
global batch is one bucket's shape (data_pipelines/buckets.py).

The global batch at a step (its bucket too) does not depend on how many processes read it, and
each iterator's state is just the next step, which Grain checkpoints (alone via
`get_state`/`set_state`, or inside Orbax via `grain.checkpoint.CheckpointSave`
and `CheckpointRestore`, which keep one file per process). A run restarted on a
different number of hosts can therefore set that step on its new iterators and
see the same global batches.

`data_cfg` fields (an `ml_collections.ConfigDict`): see data_config.py, whose defaults fill any
field a caller leaves out.
"""
import dataclasses
import functools
import logging
import os
import threading

import grain
import numpy as np
import tensorflow_datasets as tfds
from absl import flags

from data_pipelines import buckets as bucket_lib, data_config, moving_digits
from vidit.models import byte_tokenizer

log = logging.getLogger("vidit")


@dataclasses.dataclass(frozen=True)
class ClipSpec:
    """The config values the per-element transform needs (small and picklable for workers)."""

    num_frames: int
    frame_stride: int
    height: int
    width: int
    channels: int
    text_len: int

    @property
    def span(self) -> int:
        """Stored frames one clip covers."""
        return self.num_frames * self.frame_stride


def clip_spec(data_cfg) -> ClipSpec:
    return ClipSpec(**{field.name: int(data_cfg[field.name]) for field in dataclasses.fields(ClipSpec)})


def check_span(spec: ClipSpec, clip_length: int) -> None:
    if spec.span > clip_length:
        raise ValueError(
            f"data.num_frames * data.frame_stride = {spec.num_frames} * {spec.frame_stride} = "
            f"{spec.span} exceeds the stored clip length {clip_length}")


# --------------------------------------------------------------------------- #
# Per-element preprocessing (runs in Grain threads or worker processes).
# --------------------------------------------------------------------------- #

@functools.cache  # the same few sizes recur for every clip
def _resize_matrix(n_out: int, n_in: int) -> np.ndarray:
    """[n_out, n_in] triangle-filter weights: bilinear when enlarging, antialiased when shrinking."""
    support = max(1.0, n_in / n_out)  # widen the filter when shrinking so no pixel is skipped
    centres = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
    weights = np.maximum(0.0, 1.0 - np.abs(np.arange(n_in)[None, :] - centres[:, None]) / support)
    return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


def resize_and_crop(video: np.ndarray, height: int, width: int) -> np.ndarray:
    """Scales float [T, H, W, C] to cover (height, width), then centre-crops to it."""
    _, in_h, in_w, _ = video.shape
    scale = max(height / in_h, width / in_w)
    out_h, out_w = max(height, round(in_h * scale)), max(width, round(in_w * scale))
    # Two batched matmuls over [T, C, H, W] (np.einsum is far slower here).
    planes = np.matmul(_resize_matrix(out_h, in_h), video.transpose(0, 3, 1, 2))
    planes = np.matmul(planes, _resize_matrix(out_w, in_w).T)
    top, left = (out_h - height) // 2, (out_w - width) // 2
    return planes[:, :, top:top + height, left:left + width].transpose(0, 2, 3, 1)


def convert_channels(video: np.ndarray, channels: int) -> np.ndarray:
    """Grey -> any (repeat), any -> grey (mean); other mismatches are an error."""
    stored = video.shape[-1]
    if stored == channels:
        return video
    if stored == 1:
        return np.repeat(video, channels, axis=-1)
    if channels == 1:
        return video.mean(axis=-1, keepdims=True)
    raise ValueError(f"data.channels={channels} cannot be made from {stored} stored channels")


def temporal_crop(video: np.ndarray, spec: ClipSpec, rng: np.random.Generator, train: bool):
    """`num_frames` frames `frame_stride` apart: a random window when training, else the first."""
    check_span(spec, len(video))  # also catches variable-length clips that are too short
    start = int(rng.integers(len(video) - spec.span + 1)) if train else 0
    return video[start:start + spec.span:spec.frame_stride]


def video_clip(element: dict, spec: ClipSpec, rng: np.random.Generator | None = None,
               train: bool = False) -> np.ndarray:
    """A stored example's clip as the model sees it: float32 [T, H, W, C] in [-1, 1], a random
    window when training, else the first frames."""
    video = temporal_crop(np.asarray(element["video"]), spec, rng, train)
    video = video.astype(np.float32)
    if video.shape[1:3] != (spec.height, spec.width):
        video = resize_and_crop(video, spec.height, spec.width)
    return convert_channels(video, spec.channels) / 127.5 - 1.0


def _preprocess(element: dict, rng: np.random.Generator, *, spec: ClipSpec, train: bool,
                tokenizer=None) -> dict:
    """One stored example -> {'video' float32 [-1, 1] (or a latent dataset's 'latent'),
    'label' int32, and the caption: 'text' token ids + 'text_mask', or a dataset's cached
    'text_embedding' + 'text_mask' (data_pipelines/encode_text.py)}."""
    if "latent" in element:  # a latent dataset (encode_latents.py): the stored latent as is
        out = {"latent": np.asarray(element["latent"], np.float32)}
    else:
        out = {"video": video_clip(element, spec, rng, train)}
    out["label"] = np.int32(element.get("label", -1))  # -1: unlabelled (build_video_folder)
    out.update(_caption(element, spec.text_len, tokenizer))
    return out


def _caption(element: dict, length: int, tokenizer=None) -> dict:
    if "text_embedding" in element:  # cached by encode_text: the frozen encoder's output
        return {"text_embedding": np.asarray(element["text_embedding"], np.float32),
                "text_mask": np.asarray(element["text_mask"], bool)}
    caption = element.get("caption", "")  # datasets without captions get the empty one
    if isinstance(caption, bytes):
        caption = caption.decode("utf-8")
    ids, mask = (tokenizer or byte_tokenizer.tokens_and_mask)(caption, length)
    return {"text": ids, "text_mask": mask}


# A record that fails to decode or to preprocess is replaced by the next one; this many failures
# in a row mean the data (or its config) is broken, not a few records.
MAX_REPLACEMENTS = 16


def _read_example(position: int, rng: np.random.Generator, *, records: np.ndarray, source,
                  spec: ClipSpec, train: bool, where: str, tokenizer=None) -> dict:
    """The preprocessed example of record `records[position]`. A record that cannot be decoded
    or does not fit the clip spec (too short, wrong channels, ...) is logged by index and
    replaced by the next record of `records` (its bucket) that works; 'bad' counts the replaced
    records (the trainer sums it and stops past config.data.max_bad_fraction)."""
    n = len(records)
    for k in range(MAX_REPLACEMENTS):
        index = int(records[(int(position) + k) % n])
        try:
            example = _preprocess(source[index], rng, spec=spec, train=train,
                                  tokenizer=tokenizer)
        except Exception as e:  # pylint: disable=broad-except  (any decode or shape error)
            log.warning("%s record %d skipped: %s: %s", where, index, type(e).__name__,
                        str(e).splitlines()[0][:300] if str(e) else "")
            continue
        example["bad"] = np.int32(k)
        return example
    raise ValueError(f"{where}: records {int(records[int(position) % n])} to {index} all failed "
                     "to read or preprocess (see the warnings); check the dataset and config.data")


# --------------------------------------------------------------------------- #
# Global batches of one bucket each, and this process's rows of them.
# --------------------------------------------------------------------------- #

class BucketBatchesMapDataset(grain.MapDataset):
    """Element s is this process's rows of global batch s, all of one bucket.

    `streams[k]` is bucket k's example stream (shuffled, repeated when training); the schedule
    says which bucket step s draws and where its rows start in that stream (buckets.Schedule).
    Process p of P reads rows [p*b, (p+1)*b) of the bucket's global batch B, b = B / P, so the
    global batches do not depend on the number of processes.
    """

    _MUTATES_ELEMENT_SPEC = True  # examples -> batches

    def __init__(self, streams, schedule: bucket_lib.Schedule, buckets, *,
                 process_index: int, process_count: int):
        super().__init__(list(streams))
        self._streams, self._schedule = list(streams), schedule
        self._local = [b.batch_size // process_count for b in buckets]
        self._process_index = process_index
        self._lock = threading.Lock()  # Grain's read threads share the schedule's caches

    def __len__(self) -> int:
        return len(self._schedule)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        with self._stats.record_self_time():
            with self._lock:
                bucket, offset = self._schedule.locate(index)
            local = self._local[bucket]
            first = offset + self._process_index * local
        rows = [self._streams[bucket][first + r] for r in range(local)]
        with self._stats.record_self_time():
            return {k: np.stack([row[k] for row in rows]) for k in rows[0]}

    def __getstate__(self):  # pickled for Grain's worker processes: locks do not pickle
        state = self.__dict__.copy()
        state.pop("_lock")
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __str__(self) -> str:
        return f"BucketBatchesMapDataset(buckets={len(self._streams)})"


# --------------------------------------------------------------------------- #
# Assembly.
# --------------------------------------------------------------------------- #

def load_builder(data_cfg) -> tfds.core.DatasetBuilder:
    """The prepared TFDS builder for `data.name`; moving_digits is generated on first use."""
    builder_kwargs = dict(data_cfg.get("builder_kwargs") or {})
    if data_cfg.name == moving_digits.NAME:
        return moving_digits.load_builder(data_cfg.data_dir, **builder_kwargs)
    data_dir = data_cfg.data_dir or moving_digits.default_data_dir()
    builder = tfds.builder(data_cfg.name, data_dir=data_dir, **builder_kwargs)
    if not builder.is_prepared():
        raise ValueError(
            f"data.name={data_cfg.name!r} is not prepared under data.data_dir={data_dir!r}; "
            "prepare it first with builder.download_and_prepare(file_format='array_record')")
    return builder


def splits(data_cfg) -> list[str]:
    """The split names the dataset config.data names has."""
    cfg = data_config.defaults()
    cfg.update(data_cfg)
    return sorted(load_builder(cfg).info.splits)


def features(data_cfg) -> list[str]:
    """The feature names of the dataset config.data names ('video' or 'latent', 'caption',
    'text_embedding', ...)."""
    cfg = data_config.defaults()
    cfg.update(data_cfg)
    return sorted(load_builder(cfg).info.features)


def _data_source(data_cfg, split: str, specs: list[ClipSpec]):
    """Random-access source for `split`, after checking the split and the clip length."""
    builder = load_builder(data_cfg)
    base_split = split.split("[")[0]  # allow TFDS slicing such as "train[:10%]"
    if base_split not in builder.info.splits:
        raise ValueError(f"split={split!r} does not exist in data.name={data_cfg.name!r}; "
                         f"available: {sorted(builder.info.splits)}")
    if "latent" in builder.info.features:  # latents of whole clips: nothing to crop
        return builder.as_data_source(split)
    stored_length = builder.info.features["video"].shape[0]
    if stored_length is not None:  # variable-length clips are checked per element
        for spec in specs:
            check_span(spec, stored_length)
    return builder.as_data_source(split)


def _bucket_members(data_cfg, split: str, source, buckets) -> list[np.ndarray]:
    """The record indices of `split` in each bucket (all records when there is one bucket)."""
    if len(buckets) == 1:
        return [np.arange(len(source))]
    if "[" in split:
        raise ValueError(f"split={split!r}: a sliced split cannot be read in buckets "
                         "(config.data.buckets); use the whole split")
    # A latent dataset's index holds the pixel shapes its latents were encoded from.
    shapes = bucket_lib.record_shapes(load_builder(data_cfg), split, source)
    assigned = bucket_lib.assign_all(shapes, buckets, int(data_cfg.frame_stride))
    members = [np.flatnonzero(assigned == k) for k in range(len(buckets))]
    dropped = int(np.count_nonzero(assigned < 0))
    log.info("%s/%s in buckets: %s%s", data_cfg.name, split,
             bucket_lib.describe(buckets, [len(m) for m in members]),
             f"; {dropped} records shorter than every bucket left out" if dropped else "")
    for b, records in zip(buckets, members):
        if not len(records) and b.weight > 0:
            log.warning("%s/%s: no record falls in bucket %s: it is never drawn",
                        data_cfg.name, split, b.name)
    if not any(len(m) for m in members):
        raise ValueError(f"{data_cfg.name}/{split}: no record fits any bucket of "
                         f"config.data.buckets={data_cfg.buckets!r}")
    return members


def _process_index_and_count(process_index, process_count):
    """Defaults to JAX's view of the job; imported lazily so worker processes skip JAX."""
    if process_index is None or process_count is None:
        import jax  # pylint: disable=g-import-not-at-top

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must lie in [0, process_count={process_count})")
    return process_index, process_count


def _read_options() -> grain.ReadOptions:
    """A few threads and a short buffer: each element is already a whole batch."""
    threads = min(8, os.cpu_count() or 1)
    return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads)


def _ensure_flags_parsed() -> None:
    """Grain reads absl flags when starting workers; outside `absl.app.run` (pytest,
    notebooks, plain scripts) nothing has parsed them, so take their defaults."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_iterator(data_cfg, split: str, *, seed: int, train: bool,
                  process_index: int | None = None, process_count: int | None = None,
                  tokenizer=None) -> grain.DatasetIterator:
    """Iterator over this process's rows of each global batch of `split`.

    Args:
      data_cfg: data config (fields as in data_config.py; missing ones take its defaults).
      split: TFDS split name, e.g. "train", "validation" or "train[:10%]".
      seed: fixes the shuffle order and the augmentations.
      train: repeat forever with random temporal crops; otherwise one pass
        (whole global batches only) with the first frames of every clip.
      process_index, process_count: this process's place among the data-loading
        processes; default to `jax.process_index()` / `jax.process_count()`.
      tokenizer: caption -> (ids, mask) at text_len (vidit/text_encoders.py); None is the byte
        tokenizer.

    Returns:
      A checkpointable `grain.DatasetIterator` of dicts with numpy arrays
      `video` float32 [b, num_frames, height, width, channels] in [-1, 1] (with
      config.data.buckets: each batch one bucket's frames, height, width and batch size),
      `label` int32 [b] (-1 where the dataset has no labels), `text` int32 [b, text_len]
      caption tokens with `text_mask` bool [b, text_len], and `bad` int32 [b] (records replaced
      because they could not be read, see _read_example), b = batch_size / process_count
      (the bucket's batch size with buckets).
      A latent dataset (data_pipelines/encode_latents.py) gives `latent` float32
      [b, T', H', W', C] instead of `video`; a dataset with cached caption embeddings
      (data_pipelines/encode_text.py) gives `text_embedding` [b, text_len, D] instead of `text`.
    """
    cfg = data_config.defaults()
    cfg.update(data_cfg)
    process_index, process_count = _process_index_and_count(process_index, process_count)
    buckets = bucket_lib.from_config(cfg)
    for b in buckets:
        if b.batch_size % process_count:
            what = (f"bucket {b.name}'s batch size {b.batch_size} (config.data.buckets)"
                    if len(buckets) > 1 else f"data.batch_size={b.batch_size}")
            raise ValueError(f"{what} does not divide by process_count={process_count}")
    base_spec = clip_spec(cfg)
    specs = [dataclasses.replace(base_spec, num_frames=b.frames, height=b.height,
                                 width=b.width) for b in buckets]
    source = _data_source(cfg, split, specs)
    members = _bucket_members(cfg, split, source, buckets)
    where = f"{cfg.name}/{split}"
    # Independent streams for the order and the augmentations, both from `seed`; bucket 0 keeps
    # the seeds of a run without buckets, so such a run reads exactly what it always read.
    streams = []
    for k, (records, spec) in enumerate(zip(members, specs)):
        if not len(records):
            continue
        shuffle_seed, augment_seed = (int(s) for s in np.random.SeedSequence(
            seed if k == 0 else (seed, k)).generate_state(2))
        # Positions in the bucket's record list, shuffled; each read names its record, so a
        # bad one can be reported and replaced.
        stream = grain.MapDataset.range(len(records)).shuffle(seed=shuffle_seed)
        if train:
            stream = stream.repeat()  # reshuffled every epoch
        # After `repeat`, the index random_map seeds from is the stream's global position.
        streams.append(stream.random_map(
            functools.partial(_read_example, records=records, source=source, spec=spec,
                              train=train, where=where, tokenizer=tokenizer),
            seed=augment_seed))
    live = [b for b, records in zip(buckets, members) if len(records)]
    schedule = bucket_lib.Schedule(live, [len(m) for m in members if len(m)],
                                   seed=int(np.random.SeedSequence([seed, 0xB0C])
                                            .generate_state(1)[0]), train=train)
    ds = BucketBatchesMapDataset(streams, schedule, live, process_index=process_index,
                                 process_count=process_count)
    iter_ds = ds.to_iter_dataset(_read_options())
    if cfg.num_workers > 0:
        _ensure_flags_parsed()
        # Workers take whole batches round-robin, so the output order is unchanged.
        iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers))
    return iter(iter_ds)
