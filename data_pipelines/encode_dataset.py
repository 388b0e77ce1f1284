"""A derived dataset: every example of a TFDS dataset, put through a jitted function on every
device of every process, written as a new TFDS ArrayRecord dataset (local or gs://).

encode_latents.py (a VAE's latents) and encode_text.py (a frozen text encoder's embeddings) are
this plus their function. How it runs:

- Each split is cut into global batches of `batch_size` examples in stored order (the last one
  padded); a batch is sharded over all devices (one 'data' mesh axis) and computed by one jitted
  call. Each process reads only the rows its devices hold and writes those rows of the result,
  one file per batch and process, written whole.
- Interrupted? Run the same command again: batches whose files exist are skipped, so no example
  is computed twice or lost; the settings of the interrupted run must match.
- When every batch is done, process 0 assembles the dataset from the files (locally, then
  uploaded for a bucket), writes `DONE` in the work folder and deletes the per-batch files.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import time
from typing import Any, Callable

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from vidit import progress as progress_lib, storage

WORK = "_encode_work"  # under the output folder: per-batch files, settings and the DONE marker
DATASET_VERSION = "1.0.0"


class EncodeError(ValueError):
    pass


class DerivedDataset(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A dataset assembled from per-batch files; `builder_class(name)` names it. Opened for
    training from its files (`tfds.builder(name, data_dir=...)`), which needs no argument."""

    VERSION = tfds.core.Version(DATASET_VERSION)
    RELEASE_NOTES = {DATASET_VERSION: "Initial release."}
    code_path = epath.Path(__file__)  # see moving_digits.MovingDigits.code_path

    def __init__(self, *, features: dict, parts: dict[str, list[str]], description: str = "",
                 **kwargs):
        self._features = features
        self._parts = parts
        self._description = description
        kwargs.setdefault("file_format", tfds.core.FileFormat.ARRAY_RECORD)
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, description=self._description,
                                     features=tfds.features.FeaturesDict(self._features))

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(files) for split, files in self._parts.items()}

    def _generate_examples(self, files: list[str]):
        for path in files:
            with np.load(io.BytesIO(epath.Path(path).read_bytes()), allow_pickle=False) as part:
                arrays = {k: part[k] for k in part.files}
            # A feature of varying shape is stored one array per row, as 'name@row'.
            ragged = {k for k in arrays if "@" in k}
            for row in range(len(arrays["index"])):
                example = {k: v[row] for k, v in arrays.items() if k not in ragged}
                example.update({k.split("@")[0]: arrays[k] for k in ragged
                                if int(k.split("@")[1]) == row})
                example = {k: (str(v) if v.dtype.kind == "U" else v) for k, v in example.items()}
                yield int(example["index"]), example


def builder_class(name: str) -> type[DerivedDataset]:
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name or ""):
        raise EncodeError(f"--name {name!r} must be lower-case letters, digits and underscores, "
                          "starting with a letter (a TFDS dataset name)")
    class_name = "".join(part.capitalize() for part in name.split("_"))
    return type(class_name, (DerivedDataset,), {"name": name, "__module__": __name__},
                skip_registration=True)


def carried_features(source_features, skip=()) -> dict:
    """The source's features to copy as they are: labels, text, scalars and tensors."""
    out = {}
    for key, feature in source_features.items():
        if key in skip:
            continue
        if isinstance(feature, tfds.features.ClassLabel):
            out[key] = tfds.features.ClassLabel(num_classes=feature.num_classes)
        elif isinstance(feature, tfds.features.Text):
            out[key] = tfds.features.Text()
        elif isinstance(feature, tfds.features.Tensor) and tuple(feature.shape) == ():
            out[key] = tfds.features.Scalar(dtype=feature.np_dtype)
        elif isinstance(feature, tfds.features.Tensor):
            out[key] = tfds.features.Tensor(shape=feature.shape, dtype=feature.np_dtype,
                                            encoding="zlib")
    return out


def carried(element: dict, keys) -> dict:
    out = {}
    for key in keys:
        value = element[key]
        if isinstance(value, bytes):
            value = value.decode("utf-8")
        out[key] = np.asarray(value)
    return out


def add_arguments(parser, default_name: str) -> None:
    """The flags every derived-dataset command shares (encode_latents, encode_text)."""
    parser.add_argument("--out", required=True, help="TFDS data_dir to write the dataset in")
    parser.add_argument("--data_dir", default=None,
                        help="the source's data_dir (default: vidit's)")
    parser.add_argument("--name", default=None,
                        help=f"output dataset name (default: {default_name})")
    parser.add_argument("--splits", default=None, help="comma-separated (default: all)")
    parser.add_argument("--batch_size", type=int, default=64, help="global batch per call")
    parser.add_argument("--builder_kwargs", default="{}",
                        help="the source builder's arguments, JSON, e.g. '{\"num_train\": 64}'")


def start_command() -> tuple:
    """What such a command does before JAX starts (vidit/cli.py); returns the errors that are
    bad input (printed as one line, not a traceback)."""
    from vidit import cli, host_malloc
    from vidit.errors import ConfigError, LoadError
    host_malloc.tune()  # before JAX starts its threads (vidit/host_malloc.py)
    cli.setup()
    tfds.disable_progress_bar()
    return (EncodeError, ConfigError, LoadError, ValueError)


def _part_name(split: str, batch: int, process: int, processes: int) -> str:
    return f"{split}-{batch:06d}.proc{process:04d}-of-{processes:04d}.npz"


def _barrier(name: str) -> None:
    import jax
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def write_part(path, arrays: dict) -> None:
    """One batch's rows of this process, written whole (a seam for tests that interrupt)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    storage.write_atomic(path, buf.getvalue())


class Rows:
    """The rows of each global batch that this process's devices hold, and the conversions
    between them and one global array sharded over every device."""

    def __init__(self, mesh, batch_size: int):
        from vidit import sharding
        self.batch_size = batch_size
        self.mesh = mesh
        index_map = sharding.batch_sharding(mesh, 1).addressable_devices_indices_map(
            (batch_size,))
        self.mine = sorted({r for idx in index_map.values()
                            for r in range(*idx[0].indices(batch_size))})

    def to_global(self, per_row: dict, fill: np.ndarray):
        """{row: array} (this process's rows; missing ones get `fill`) -> a global array."""
        import jax
        from vidit import sharding
        shape = (self.batch_size,) + fill.shape
        sh = sharding.batch_sharding(self.mesh, len(shape))

        def piece(idx):
            return np.stack([per_row.get(r, fill) for r in range(*idx[0].indices(self.batch_size))])

        return jax.make_array_from_callback(shape, sh, piece)

    @staticmethod
    def to_local(array) -> dict:
        """A global batch-sharded array -> {row: numpy array} of this process's rows."""
        out = {}
        for shard in array.addressable_shards:
            start = shard.index[0].start or 0
            data = np.asarray(shard.data)
            for k in range(data.shape[0]):
                out[start + k] = data[k]
        return out


@dataclasses.dataclass
class Job:
    name: str  # the output dataset's name
    out: Any  # its data_dir (local or gs://)
    batch_size: int
    settings: dict  # what a resumed run must match
    features: dict  # computed features: name -> tfds feature
    carried: dict  # source features copied as they are
    description: str
    info_file: str  # written beside the dataset's files
    info: dict  # its content (plus 'examples')


def run(job: Job, source, splits: list[str], mesh,
        compute: Callable[[dict], dict], progress: bool = True) -> str:
    """Computes `compute({row: element}) -> {row: {feature: array}}` for every batch of every
    split (or resumes), then assembles the dataset; returns its folder."""
    import jax
    out = storage.path(job.out)
    work = out / WORK / job.name
    done_file = work / "DONE"
    if done_file.exists():
        folder = json.loads(done_file.read_text())["folder"]
        print(f"{job.name} is already written in {folder} (delete {work} to write it again)")
        return folder
    processes, me = jax.process_count(), jax.process_index()
    settings = {**job.settings, "batch_size": job.batch_size, "processes": processes,
                "splits": splits}
    manifest = work / "settings.json"
    if manifest.exists():
        saved = json.loads(manifest.read_text())
        if saved != json.loads(json.dumps(settings)):
            raise EncodeError(f"{work} holds an interrupted run with other settings ({saved}); "
                              f"resume with those or delete {work}")
    _barrier("encode settings read")
    if me == 0:
        storage.write_atomic(manifest, json.dumps(settings, indent=2))

    rows = Rows(mesh, job.batch_size)
    parts: dict[str, list[str]] = {}
    for split in splits:
        data = source.as_data_source(split)
        n = len(data)
        num_batches = -(-n // job.batch_size)
        todo = [b for b in range(num_batches)
                if not (work / _part_name(split, b, me, processes)).exists()]
        bar = progress_lib.bar(num_batches, initial=num_batches - len(todo), unit="batch",
                               desc=f"{job.name} {split}", enabled=progress and me == 0)
        for b in todo:
            index = {r: b * job.batch_size + r for r in rows.mine}
            elements = {r: data[i] for r, i in index.items() if i < n}
            results = compute(elements)
            keep = sorted(elements)
            arrays = {"index": np.asarray([index[r] for r in keep], np.int64)}
            for key, feature in job.features.items():  # (a part can be empty: rows past the end)
                if None in tuple(feature.shape):  # varying shapes (buckets): one array per row
                    arrays.update({f"{key}@{j}": results[r][key] for j, r in enumerate(keep)})
                    continue
                arrays[key] = (np.stack([results[r][key] for r in keep]) if keep else
                               np.zeros((0,) + tuple(feature.shape), feature.np_dtype))
            for key in job.carried:
                arrays[key] = np.asarray([carried(elements[r], [key])[key] for r in keep])
            write_part(work / _part_name(split, b, me, processes), arrays)
            bar.update(1)
        bar.close()
        parts[split] = sorted(str(f) for f in work.glob(f"{split}-*.npz"))

    _barrier("encode computed")
    folder = None
    if me == 0:
        cls = builder_class(job.name)
        features = {**job.features, "index": tfds.features.Scalar(dtype=np.int64), **job.carried}
        target = storage.path(cls(features=features, parts=parts, data_dir=out,
                                  description=job.description).data_dir)
        if target.exists():  # a half-written earlier assembly
            target.rmtree()
        # ArrayRecord writes local files only: a bucket's copy is built locally, then uploaded.
        with storage.staged(out) as local_root:
            builder = cls(features=features, parts=parts, data_dir=local_root,
                          description=job.description)
            builder.download_and_prepare()
            folder = str(out / os.path.relpath(builder.data_dir, local_root))
            info = {**job.info,
                    "examples": {s: builder.info.splits[s].num_examples for s in parts}}
            with open(os.path.join(builder.data_dir, job.info_file), "w") as f:
                json.dump(info, f, indent=2)
        storage.write_atomic(done_file, json.dumps(
            {"folder": folder, "finished": time.time(), **info}, indent=2))
        for files in parts.values():
            for path in files:
                epath.Path(path).unlink()
    _barrier("encode assembled")
    if folder is None:
        folder = json.loads(done_file.read_text())["folder"]
    return folder
