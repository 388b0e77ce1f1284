"""Encode a video dataset with a trained VAE into a latent dataset (cached latent DiT training).

    python -m data_pipelines.encode_latents --autoencoder runs/vae_digits \
        --dataset moving_digits --out runs/vae_digits/latents [--data_dir DIR] \
        [--name moving_digits_latents] [--splits train,validation] [--batch_size 64]

then train on it with `configs/latent_digits.py` (data.name = the --name, data.data_dir = --out).

What is written. A TFDS ArrayRecord dataset `NAME` under `--out` with, per source example, its
`latent` (float32 [T', H', W', C]: the VAE's posterior mean, NOT normalised; the DiT's trainer
normalises with the autoencoder's latent_stats.json, exactly as online encoding does), the
source's label / caption and other scalar or text features carried over as they are, and
`index` (the example's position in the source split). `latent_info.json` beside it records the
autoencoder, its statistics, and the clip geometry. The clip of each example is its first
`num_frames` frames (the autoencoder run's data.num_frames unless --num_frames), resized and
converted like the Grain pipeline's validation clips.

How. Every split is cut into global batches of --batch_size examples in stored order (the last
one padded); each batch is sharded over every device of every process (one 'data' mesh axis) and
encoded by one jitted call. Each process loads only the rows its devices hold and writes those
rows of the result (jax.process_index names its files), one file per batch and process, written
atomically. Interrupted? Run the same command again: batches whose files exist are skipped, so no
example is encoded twice or lost. When every batch is done, process 0 assembles the TFDS dataset
from the files, writes `DONE` in the work folder, and deletes the per-batch files.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from data_pipelines import data_config
from vidit import storage

WORK = "_encode_work"  # under --out: per-batch files and the DONE marker
INFO = "latent_info.json"
DATASET_VERSION = "1.0.0"


class EncodeError(ValueError):
    pass


# ---------------------------------------------------------------------------------------------
# The output builder: one TFDS dataset read back from the per-batch files.
class LatentDataset(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Latents of a video dataset; `builder_class(name)` names it. Opened for training from its
    files (`tfds.builder(name, data_dir=...)`), which needs no constructor argument."""

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
            for row in range(len(arrays["index"])):
                example = {k: v[row] for k, v in arrays.items()}
                example = {k: (str(v) if v.dtype.kind == "U" else v) for k, v in example.items()}
                yield int(example["index"]), example


def builder_class(name: str) -> type[LatentDataset]:
    import re
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name or ""):
        raise EncodeError(f"--name {name!r} must be lower-case letters, digits and underscores, "
                          "starting with a letter (a TFDS dataset name)")
    class_name = "".join(part.capitalize() for part in name.split("_"))
    return type(class_name, (LatentDataset,), {"name": name, "__module__": __name__},
                skip_registration=True)


def _carried_features(source_features) -> dict:
    """The source's scalar and text features (label, caption, source, ...), same types."""
    out = {}
    for key, feature in source_features.items():
        if key == "video":
            continue
        if isinstance(feature, tfds.features.ClassLabel):
            out[key] = tfds.features.ClassLabel(num_classes=feature.num_classes)
        elif isinstance(feature, tfds.features.Text):
            out[key] = tfds.features.Text()
        elif isinstance(feature, tfds.features.Tensor) and tuple(feature.shape) == ():
            out[key] = tfds.features.Scalar(dtype=feature.np_dtype)
    return out


# ---------------------------------------------------------------------------------------------
def _data_config(ae_config, dataset: str, data_dir: str | None, num_frames: int | None,
                 builder_kwargs: dict | None):
    cfg = data_config.defaults()
    for key in ("num_frames", "frame_stride", "height", "width", "channels"):
        cfg[key] = ae_config.data[key]
    cfg.name = dataset
    cfg.data_dir = data_dir or ""
    cfg.builder_kwargs = dict(builder_kwargs or {})
    if num_frames:
        cfg.num_frames = int(num_frames)
    return cfg


def _carried(element: dict, keys) -> dict:
    out = {}
    for key in keys:
        value = element[key]
        if isinstance(value, bytes):
            value = value.decode("utf-8")
        out[key] = np.asarray(value)
    return out


def _save_atomic(path, arrays: dict) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    storage.write_atomic(path, buf.getvalue())


def _part_name(split: str, batch: int, process: int, processes: int) -> str:
    return f"{split}-{batch:06d}.proc{process:04d}-of-{processes:04d}.npz"


def _barrier(name: str) -> None:
    import jax
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def encode(autoencoder: str, dataset: str, out: str, *, data_dir: str | None = None,
           name: str | None = None, splits: list[str] | None = None, batch_size: int = 64,
           num_frames: int | None = None, builder_kwargs: dict | None = None,
           progress: bool = True) -> str:
    """Encodes `dataset` (or resumes an interrupted encode); returns the dataset's folder."""
    import jax
    from data_pipelines import pipeline
    from vidit import run as run_lib
    from vidit import sharding

    mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1, sequence=1))
    ae = run_lib.load_autoencoder(autoencoder, mesh)
    name = name or f"{dataset}_latents"
    cls = builder_class(name)
    out = storage.path(out)
    work = out / WORK / name
    done_file = work / "DONE"
    if done_file.exists():
        folder = json.loads(done_file.read_text())["folder"]
        print(f"{name} is already encoded in {folder} (delete {work} to encode again)")
        return folder

    data_cfg = _data_config(ae.config, dataset, data_dir, num_frames, builder_kwargs)
    spec = pipeline.clip_spec(data_cfg)
    latent = ae.latent_shape(spec.num_frames, spec.height, spec.width)
    if spec.channels != ae.channels:
        raise EncodeError(f"the autoencoder takes {ae.channels} channels, data has {spec.channels}")
    source = pipeline.load_builder(data_cfg)
    if "video" not in source.info.features:
        raise EncodeError(f"{dataset} has no 'video' feature (is it a latent dataset already?)")
    stored = source.info.features["video"].shape[0]
    if stored is not None:
        pipeline.check_span(spec, stored)
    splits = splits or sorted(source.info.splits)
    carried = _carried_features(source.info.features)

    shards = sharding.batch_shards(mesh)
    if batch_size % shards:
        raise EncodeError(f"--batch_size {batch_size} must be a multiple of the {shards} devices")
    processes, me = jax.process_count(), jax.process_index()
    settings = {"autoencoder": str(ae.path), "dataset": dataset, "data_dir": data_cfg.data_dir,
                "builder_kwargs": dict(data_cfg.builder_kwargs), "splits": splits,
                "batch_size": batch_size, "processes": processes,
                "clip": [spec.num_frames, spec.frame_stride, spec.height, spec.width,
                         spec.channels]}
    manifest = work / "settings.json"
    if manifest.exists():
        saved = json.loads(manifest.read_text())
        if saved != json.loads(json.dumps(settings)):
            raise EncodeError(f"{work} holds an interrupted encode with other settings "
                              f"({saved}); resume with those or delete {work}")
    _barrier("encode_latents settings read")
    if me == 0:
        storage.write_atomic(manifest, json.dumps(settings, indent=2))

    params = ae.params
    batch_sh = sharding.batch_sharding(mesh, 5)
    encode_fn = jax.jit(ae.encode_raw, out_shardings=batch_sh)
    global_shape = (batch_size, spec.num_frames, spec.height, spec.width, spec.channels)
    # The global rows this process's devices hold (the same for every batch).
    index_map = batch_sh.addressable_devices_indices_map(global_shape)
    my_rows = sorted({r for idx in index_map.values() for r in range(*idx[0].indices(batch_size))})

    from tqdm import tqdm
    parts: dict[str, list[str]] = {}
    for split in splits:
        data = source.as_data_source(split)
        n = len(data)
        num_batches = -(-n // batch_size)
        todo = [b for b in range(num_batches)
                if not (work / _part_name(split, b, me, processes)).exists()]
        bar = tqdm(total=num_batches, initial=num_batches - len(todo), unit="batch",
                   desc=f"encode {split}", disable=not progress or me != 0, file=sys.stderr)
        for b in todo:
            rows = {r: b * batch_size + r for r in my_rows}
            valid = {r: i for r, i in rows.items() if i < n}
            elements = {r: data[i] for r, i in valid.items()}
            clips = {r: pipeline.video_clip(e, spec) for r, e in elements.items()}
            zero = np.zeros(global_shape[1:], np.float32)

            def piece(idx):
                return np.stack([clips.get(r, zero) for r in range(*idx[0].indices(batch_size))])

            video = jax.make_array_from_callback(global_shape, batch_sh, piece)
            z = encode_fn(params, video)
            local = {}
            for shard in z.addressable_shards:
                start = shard.index[0].start or 0
                data_np = np.asarray(shard.data)
                for k in range(data_np.shape[0]):
                    local[start + k] = data_np[k]
            keep = sorted(valid)
            arrays = {"latent": np.stack([local[r] for r in keep]).astype(np.float32)
                      if keep else np.zeros((0,) + latent, np.float32),
                      "index": np.asarray([valid[r] for r in keep], np.int64)}
            for key in carried:  # (a part can be empty: a process's rows past the end)
                arrays[key] = np.asarray([_carried(elements[r], [key])[key] for r in keep])
            _write_part(work / _part_name(split, b, me, processes), arrays)
            bar.update(1)
        bar.close()
        parts[split] = sorted(str(f) for f in work.glob(f"{split}-*.npz"))

    _barrier("encode_latents encoded")
    folder = None
    if me == 0:
        features = {"latent": tfds.features.Tensor(shape=latent, dtype=np.float32,
                                                   encoding="zlib"),
                    "index": tfds.features.Scalar(dtype=np.int64), **carried}
        description = f"Posterior means of {dataset} clips by the VAE in {ae.path}"
        target = storage.path(cls(features=features, parts=parts, data_dir=out,
                                  description=description).data_dir)
        if target.exists():  # a half-written earlier assembly
            target.rmtree()
        # ArrayRecord writes local files only: a bucket's copy is built locally, then uploaded.
        with storage.staged(out) as local_root:
            builder = cls(features=features, parts=parts, data_dir=local_root,
                          description=description)
            builder.download_and_prepare()
            folder = str(out / os.path.relpath(builder.data_dir, local_root))
            info = {"autoencoder": str(ae.path), "source": dataset,
                    "source_data_dir": data_cfg.data_dir,
                    "clip": {"num_frames": spec.num_frames, "frame_stride": spec.frame_stride,
                             "height": spec.height, "width": spec.width,
                             "channels": spec.channels},
                    "latent_shape": list(latent), "compression": list(ae.compression),
                    "latent_stats": {"mean": ae.mean.tolist(), "std": ae.std.tolist()},
                    "normalised": False,
                    "examples": {s: builder.info.splits[s].num_examples for s in parts}}
            with open(os.path.join(builder.data_dir, INFO), "w") as f:
                json.dump(info, f, indent=2)
        storage.write_atomic(done_file, json.dumps(
            {"folder": folder, "finished": time.time(), **info}, indent=2))
        for files in parts.values():
            for path in files:
                epath.Path(path).unlink()
    _barrier("encode_latents assembled")
    if folder is None:
        folder = json.loads(done_file.read_text())["folder"]
    return folder


def _write_part(path, arrays: dict) -> None:
    """One batch's rows of this process (a seam for tests that interrupt an encode)."""
    _save_atomic(path, arrays)


def read_info(folder) -> dict:
    return json.loads((storage.path(folder) / INFO).read_text())


# ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--autoencoder", required=True, help="VAE run workdir or its export")
    p.add_argument("--dataset", required=True, help="source TFDS dataset name (with 'video')")
    p.add_argument("--out", required=True, help="TFDS data_dir to write the latent dataset in")
    p.add_argument("--data_dir", default=None, help="the source's data_dir (default: vidit's)")
    p.add_argument("--name", default=None, help="output dataset name (default: DATASET_latents)")
    p.add_argument("--splits", default=None, help="comma-separated (default: all)")
    p.add_argument("--batch_size", type=int, default=64, help="global batch per encoder call")
    p.add_argument("--num_frames", type=int, default=None,
                   help="clip frames (default: the autoencoder run's data.num_frames)")
    p.add_argument("--builder_kwargs", default="{}", help="JSON, e.g. '{\"num_train\": 64}'")
    args = p.parse_args(argv)
    from vidit import cli, host_malloc
    from vidit.errors import LoadError
    host_malloc.tune()  # before JAX starts its threads (vidit/host_malloc.py)
    cli.setup()
    tfds.disable_progress_bar()
    try:
        folder = encode(args.autoencoder, args.dataset, args.out, data_dir=args.data_dir,
                        name=args.name, splits=args.splits.split(",") if args.splits else None,
                        batch_size=args.batch_size, num_frames=args.num_frames,
                        builder_kwargs=json.loads(args.builder_kwargs))
    except (EncodeError, LoadError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    info = read_info(folder)
    print(f"wrote {folder}: {info['examples']} examples of latents {info['latent_shape']}; "
          f"train with --config.data.name={os.path.basename(os.path.dirname(folder))} "
          f"--config.data.data_dir={os.path.dirname(os.path.dirname(folder))} "
          f"--config.data.autoencoder={info['autoencoder']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
