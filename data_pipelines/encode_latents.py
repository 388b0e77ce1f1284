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

With --buckets (as config.data.buckets, pixel shapes the VAE's compression divides), each clip
is encoded at the bucket of its stored shape (data_pipelines/buckets.py), so latents keep each
clip's aspect ratio and length; images (1-frame clips) go through the causal VAE's first-frame
path. The latent dataset then holds latents of several shapes and a shape index with the pixel
bucket of each, and a latent DiT trains on it with the same config.data.buckets.

How: data_pipelines/encode_dataset.py (sharded over every device and process, resumable,
assembled locally and uploaded when --out is a bucket).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import buckets as bucket_lib, data_config, encode_dataset
from data_pipelines.encode_dataset import EncodeError
from vidit import storage

INFO = "latent_info.json"


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


def encode(autoencoder: str, dataset: str, out: str, *, data_dir: str | None = None,
           name: str | None = None, splits: list[str] | None = None, batch_size: int = 64,
           num_frames: int | None = None, builder_kwargs: dict | None = None,
           progress: bool = True, buckets: str = "") -> str:
    """Encodes `dataset` (or resumes an interrupted encode); returns the dataset's folder.
    `buckets` ('FxHxW,...'): encode each clip at the bucket of its stored shape."""
    import jax
    from data_pipelines import pipeline
    from vidit import run as run_lib
    from vidit import sharding

    mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1, sequence=1))
    ae = run_lib.load_autoencoder(autoencoder, mesh)
    name = name or f"{dataset}_latents"
    encode_dataset.builder_class(name)  # checks the name first
    data_cfg = _data_config(ae.config, dataset, data_dir, num_frames, builder_kwargs)
    spec = pipeline.clip_spec(data_cfg)
    bucket_list = _buckets(buckets, ae)
    latent = ae.latent_shape(spec.num_frames, spec.height, spec.width)
    if spec.channels != ae.channels:
        raise EncodeError(f"the autoencoder takes {ae.channels} channels, data has {spec.channels}")
    source = pipeline.load_builder(data_cfg)
    if "video" not in source.info.features:
        raise EncodeError(f"{dataset} has no 'video' feature (is it a latent dataset already?)")
    stored = source.info.features["video"].shape[0]
    if stored is not None and not bucket_list:
        pipeline.check_span(spec, stored)
    shards = sharding.batch_shards(mesh)
    if batch_size % shards:
        raise EncodeError(f"--batch_size {batch_size} must be a multiple of the {shards} devices")

    rows = encode_dataset.Rows(mesh, batch_size)
    encode_fn = jax.jit(ae.encode_raw, out_shardings=sharding.batch_sharding(mesh, 5))
    zero = np.zeros((spec.num_frames, spec.height, spec.width, spec.channels), np.float32)

    def compute(elements: dict) -> dict:
        if not bucket_list:
            clips = {r: pipeline.video_clip(e, spec) for r, e in elements.items()}
            z = rows.to_local(encode_fn(ae.params, rows.to_global(clips, zero)))
            return {r: {"latent": z[r].astype(np.float32)} for r in elements}
        # Every bucket in the same order on every process (each encode is a collective), the
        # rows of other buckets padded.
        out, assigned = {}, {}
        for r, e in elements.items():
            k = bucket_lib.assign(np.shape(e["video"])[:3], bucket_list, spec.frame_stride)
            if k < 0:
                raise EncodeError(f"a clip of shape {np.shape(e['video'])[:3]} is shorter than "
                                  f"every bucket of --buckets")
            assigned[r] = k
        for k, b in enumerate(bucket_list):
            mine = {r: e for r, e in elements.items() if assigned[r] == k}
            bucket_spec = dataclasses.replace(spec, num_frames=b.frames, height=b.height,
                                              width=b.width)
            clips = {r: pipeline.video_clip(e, bucket_spec) for r, e in mine.items()}
            fill = np.zeros(b.shape + (spec.channels,), np.float32)
            z = rows.to_local(encode_fn(ae.params, rows.to_global(clips, fill)))
            out.update({r: {"latent": z[r].astype(np.float32),
                            "clip_shape": np.asarray(b.shape, np.int32)} for r in mine})
        return out

    job = encode_dataset.Job(
        name=name, out=out, batch_size=batch_size,
        settings={"autoencoder": str(ae.path), "dataset": dataset,
                  "data_dir": data_cfg.data_dir, "builder_kwargs": dict(data_cfg.builder_kwargs),
                  "clip": [spec.num_frames, spec.frame_stride, spec.height, spec.width,
                           spec.channels], "buckets": [b.name for b in bucket_list]},
        features=({"latent": tfds.features.Tensor(shape=latent, dtype=np.float32,
                                                  encoding="zlib")} if not bucket_list else
                  {"latent": tfds.features.Tensor(shape=(None, None, None, latent[-1]),
                                                  dtype=np.float32, encoding="zlib"),
                   # the pixel bucket it was encoded at: the pipeline's buckets read it
                   "clip_shape": tfds.features.Tensor(shape=(3,), dtype=np.int32)}),
        carried=encode_dataset.carried_features(
            source.info.features, skip=[k for k, f in source.info.features.items()
                                        if k == "video" or (isinstance(f, tfds.features.Tensor)
                                                            and f.shape != ())]),
        description=f"Posterior means of {dataset} clips by the VAE in {ae.path}",
        info_file=INFO,
        info={"autoencoder": str(ae.path), "source": dataset,
              "source_data_dir": data_cfg.data_dir,
              "clip": {"num_frames": spec.num_frames, "frame_stride": spec.frame_stride,
                       "height": spec.height, "width": spec.width, "channels": spec.channels},
              "latent_shape": list(latent), "compression": list(ae.compression),
              "buckets": [b.name for b in bucket_list],
              "latent_stats": {"mean": ae.mean.tolist(), "std": ae.std.tolist()},
              "normalised": False})
    folder = encode_dataset.run(job, source, splits or sorted(source.info.splits), mesh,
                                compute, progress)
    if bucket_list and jax.process_index() == 0:  # the shape index: each latent's pixel bucket
        out_builder = tfds.builder_from_directory(str(folder))
        for split in out_builder.info.splits:
            data = out_builder.as_data_source(split)
            bucket_lib.write_shapes(folder, split, [data[i]["clip_shape"]
                                                    for i in range(len(data))])
    return folder


def _buckets(text: str, ae) -> list:
    """--buckets parsed, each checked against the VAE's compression."""
    if not text:
        return []
    try:
        parsed = bucket_lib.parse(text, frames=1, height=1, width=1, batch_size=1)
    except bucket_lib.BucketError as e:
        raise EncodeError(str(e).replace("config.data.buckets", "--buckets")) from None
    for b in parsed:
        try:
            ae.latent_shape(*b.shape)
        except ValueError as e:
            raise EncodeError(f"--buckets {b.name}: {e}") from None
    return parsed


def read_info(folder) -> dict:
    return json.loads((storage.path(folder) / INFO).read_text())


# ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--autoencoder", required=True, help="VAE run workdir or its export")
    p.add_argument("--dataset", required=True, help="source TFDS dataset name (with 'video')")
    p.add_argument("--num_frames", type=int, default=None,
                   help="clip frames (default: the autoencoder run's data.num_frames)")
    p.add_argument("--buckets", default="", help="'FxHxW,...': encode each clip at the bucket "
                   "of its stored shape (as config.data.buckets)")
    encode_dataset.add_arguments(p, "DATASET_latents")
    args = p.parse_args(argv)
    bad_input = encode_dataset.start_command()
    try:
        folder = encode(args.autoencoder, args.dataset, args.out, data_dir=args.data_dir,
                        name=args.name, splits=args.splits.split(",") if args.splits else None,
                        batch_size=args.batch_size, num_frames=args.num_frames,
                        builder_kwargs=json.loads(args.builder_kwargs), buckets=args.buckets)
    except bad_input as e:
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
