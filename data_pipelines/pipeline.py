"""Grain input pipeline: TFDS ArrayRecord video datasets -> per-process batches.

The pipeline is a chain of random-access `grain.MapDataset`s, so every batch is
a pure function of (seed, step, row):

  source -> shuffle(seed) -> repeat (train) -> preprocess(rng of the global index)
         -> this process's rows of each global batch -> batch -> iterator

The global batch at a step does not depend on how many processes read it, and
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

import grain
import numpy as np
import tensorflow_datasets as tfds
from absl import flags

from data_pipelines import data_config, moving_digits
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


def _read_example(record: int, rng: np.random.Generator, *, source, spec: ClipSpec, train: bool,
                  where: str, tokenizer=None) -> dict:
    """The preprocessed example of `record`. A record that cannot be decoded or does not fit
    the clip spec (too short, wrong channels, ...) is logged by index and replaced by the next
    record that works; 'bad' counts the replaced records (the trainer sums it and stops past
    config.data.max_bad_fraction)."""
    n = len(source)
    for k in range(MAX_REPLACEMENTS):
        index = (int(record) + k) % n
        try:
            example = _preprocess(source[index], rng, spec=spec, train=train,
                                  tokenizer=tokenizer)
        except Exception as e:  # pylint: disable=broad-except  (any decode or shape error)
            log.warning("%s record %d skipped: %s: %s", where, index, type(e).__name__,
                        str(e).splitlines()[0][:300] if str(e) else "")
            continue
        example["bad"] = np.int32(k)
        return example
    raise ValueError(f"{where}: records {int(record) % n} to {index} all failed to read or "
                     "preprocess (see the warnings); check the dataset and config.data")


# --------------------------------------------------------------------------- #
# Multi-host slicing.
# --------------------------------------------------------------------------- #

class ProcessRowsMapDataset(grain.MapDataset):
    """This process's rows of every global batch, in order.

    Element k is global element (k // b) * B + p * b + k % b, where B is the
    global batch, b = B / process_count and p the process index, so batching
    this by b gives rows [p*b, (p+1)*b) of global batch k // b. Unlike
    `ds[p::P]`, the global batches do not depend on the number of processes.
    Only whole global batches are kept.
    """

    _MUTATES_ELEMENT_SPEC = False  # only reorders elements (informs Grain's statistics)

    def __init__(self, parent: grain.MapDataset, *, global_batch: int,
                 process_index: int, process_count: int):
        super().__init__(parent)
        self._global_batch = global_batch
        self._local_batch = global_batch // process_count
        self._offset = process_index * self._local_batch
        self._length = len(parent) // global_batch * self._local_batch

    def __len__(self) -> int:
        return self._length

    def _parent_index(self, index: int) -> int:
        step, row = divmod(index, self._local_batch)
        return step * self._global_batch + self._offset + row

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        with self._stats.record_self_time():
            parent_index = self._parent_index(index)
        return self._parent[parent_index]

    def _getitems(self, indices):
        with self._stats.record_self_time(num_elements=len(indices)):
            parent_indices = [self._parent_index(index) for index in indices]
        return self._parent._getitems(parent_indices)  # pylint: disable=protected-access

    def __str__(self) -> str:
        return (f"ProcessRowsMapDataset(global_batch={self._global_batch}, "
                f"local_batch={self._local_batch}, offset={self._offset})")


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


def _data_source(data_cfg, split: str, spec: ClipSpec):
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
        check_span(spec, stored_length)
    return builder.as_data_source(split)


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
      `video` float32 [b, num_frames, height, width, channels] in [-1, 1],
      `label` int32 [b] (-1 where the dataset has no labels), `text` int32 [b, text_len]
      caption tokens with `text_mask` bool [b, text_len], and `bad` int32 [b] (records replaced
      because they could not be read, see _read_example), b = batch_size / process_count.
      A latent dataset (data_pipelines/encode_latents.py) gives `latent` float32
      [b, T', H', W', C] instead of `video`; a dataset with cached caption embeddings
      (data_pipelines/encode_text.py) gives `text_embedding` [b, text_len, D] instead of `text`.
    """
    cfg = data_config.defaults()
    cfg.update(data_cfg)
    process_index, process_count = _process_index_and_count(process_index, process_count)
    if cfg.batch_size % process_count:
        raise ValueError(f"data.batch_size={cfg.batch_size} does not divide by "
                         f"process_count={process_count}")
    spec = clip_spec(cfg)
    # Independent streams for the order and the augmentations, both from `seed`.
    shuffle_seed, augment_seed = (int(s) for s in np.random.SeedSequence(seed).generate_state(2))

    source = _data_source(cfg, split, spec)
    # Record indices, shuffled: the same order as shuffling the source itself, with the record
    # index at hand to name and replace a bad record.
    ds = grain.MapDataset.range(len(source)).shuffle(seed=shuffle_seed)
    if train:
        ds = ds.repeat()  # reshuffled every epoch
    # After `repeat`, the index random_map seeds from is the global element index.
    ds = ds.random_map(functools.partial(_read_example, source=source, spec=spec, train=train,
                                         where=f"{cfg.name}/{split}", tokenizer=tokenizer),
                       seed=augment_seed)
    ds = ProcessRowsMapDataset(ds, global_batch=cfg.batch_size,
                               process_index=process_index, process_count=process_count)
    ds = ds.batch(cfg.batch_size // process_count, drop_remainder=True)
    iter_ds = ds.to_iter_dataset(_read_options())
    if cfg.num_workers > 0:
        _ensure_flags_parsed()
        # Workers take whole batches round-robin, so the output order is unchanged.
        iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers))
    return iter(iter_ds)
