"""Cache a frozen text encoder's caption embeddings in a copy of a dataset.

    python -m data_pipelines.encode_text --encoder minilm --dataset moving_digits \
        --out runs/text_cache [--encoder_path HF_FOLDER] [--data_dir DIR] [--text_len 40] \
        [--name moving_digits_minilm] [--splits train,validation] [--batch_size 64]

then train with config.model.text_encoder.kind set to the same encoder and online=False,
config.data.name = the --name, config.data.data_dir = --out: the train step reads the
embeddings and never runs the encoder.

What is written. A TFDS ArrayRecord dataset NAME under --out with, per source example, every
feature of the source (its video or latent, label, caption, ...) and `text_embedding` (float32
[text_len, width]: the encoder's output for the caption, tokenized and padded to --text_len)
and `text_mask` (bool [text_len]), plus `index`. `text_info.json` beside it records the
encoder's identity (kind, path, weight fingerprint) and `null_text_embedding.npz` the empty
caption's embedding, the unconditional input of classifier-free guidance. The source may be a
latent dataset from encode_latents.

How: data_pipelines/encode_dataset.py (sharded over every device and process, resumable,
assembled locally and uploaded when --out is a bucket).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import data_config, encode_dataset
from data_pipelines.encode_dataset import EncodeError
from vidit import storage

INFO = "text_info.json"
NULL_FILE = "null_text_embedding.npz"


def encode(encoder: str, dataset: str, out, *, encoder_path: str = "",
           data_dir: str | None = None, text_len: int = 40, name: str | None = None,
           splits: list[str] | None = None, batch_size: int = 64,
           builder_kwargs: dict | None = None, progress: bool = True) -> str:
    """Writes `dataset` with cached embeddings (or resumes); returns the dataset's folder."""
    import jax
    import ml_collections
    from data_pipelines import pipeline
    from vidit import sharding, text_encoders

    mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1, sequence=1))
    model_cfg = ml_collections.ConfigDict(dict(
        cond="text", dtype="float32", param_dtype="float32",
        text_encoder=dict(kind=encoder, path=encoder_path, online=True, dtype="")))
    rules = [list(r) for r in sharding.DEFAULT_RULES]
    te = text_encoders.load(model_cfg, mesh, rules)
    name = name or f"{dataset}_{encoder}"
    encode_dataset.builder_class(name)  # checks the name first
    data_cfg = data_config.defaults()
    data_cfg.update(dict(name=dataset, data_dir=data_dir or ""))
    data_cfg.builder_kwargs = dict(builder_kwargs or {})
    source = pipeline.load_builder(data_cfg)
    if "text_embedding" in source.info.features:
        raise EncodeError(f"{dataset} already holds text embeddings")
    shards = sharding.batch_shards(mesh)
    if batch_size % shards:
        raise EncodeError(f"--batch_size {batch_size} must be a multiple of the {shards} devices")

    rows = encode_dataset.Rows(mesh, batch_size)
    encode_fn = jax.jit(te.encode, out_shardings=sharding.batch_sharding(mesh, 3))
    no_ids, no_mask = (np.zeros(text_len, np.int32), np.zeros(text_len, bool))

    def compute(elements: dict) -> dict:
        tokens = {}
        for r, e in elements.items():
            caption = e.get("caption", "")
            tokens[r] = te.tokenizer(caption.decode() if isinstance(caption, bytes) else caption,
                                     text_len)
        ids = rows.to_global({r: t[0] for r, t in tokens.items()}, no_ids)
        mask = rows.to_global({r: t[1] for r, t in tokens.items()}, no_mask)
        emb = rows.to_local(encode_fn(te.params, ids, mask))
        return {r: {"text_embedding": emb[r].astype(np.float32), "text_mask": tokens[r][1]}
                for r in elements}

    job = encode_dataset.Job(
        name=name, out=out, batch_size=batch_size,
        settings={"encoder": te.identity, "dataset": dataset, "data_dir": data_cfg.data_dir,
                  "builder_kwargs": dict(data_cfg.builder_kwargs), "text_len": text_len},
        features={"text_embedding": tfds.features.Tensor(shape=(text_len, te.width),
                                                         dtype=np.float32, encoding="zlib"),
                  "text_mask": tfds.features.Tensor(shape=(text_len,), dtype=np.bool_)},
        carried=encode_dataset.carried_features(source.info.features),
        description=f"{dataset} with the caption embeddings of the {encoder} text encoder",
        info_file=INFO,
        info={"encoder": te.identity, "source": dataset, "source_data_dir": data_cfg.data_dir,
              "text_len": text_len, "width": te.width})
    folder = encode_dataset.run(job, source, splits or sorted(source.info.splits), mesh,
                                compute, progress)
    if jax.process_index() == 0:  # the empty caption: the null input of guidance
        null = te.null(text_len)
        buf = io.BytesIO()
        np.savez(buf, **{k: np.asarray(v) for k, v in null.items()})
        storage.write_atomic(storage.path(folder) / NULL_FILE, buf.getvalue())
    return folder


def _folder(data_cfg):
    from data_pipelines import pipeline
    cfg = data_config.defaults()
    cfg.update(data_cfg)
    return storage.path(pipeline.load_builder(cfg).data_dir)


def read_null(data_cfg) -> dict:
    """The empty caption's cached embedding of the dataset config.data names:
    {'text_embedding' [1, L, D], 'text_mask' [1, L]}."""
    with np.load(io.BytesIO((_folder(data_cfg) / NULL_FILE).read_bytes())) as f:
        return {k: f[k] for k in f.files}


def read_dataset_info(data_cfg) -> dict:
    """text_info.json of the dataset config.data names (its encoder, text_len, width)."""
    return read_info(_folder(data_cfg))


def read_info(folder) -> dict:
    return json.loads((storage.path(folder) / INFO).read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", required=True, choices=["t5", "minilm"], help="encoder kind")
    p.add_argument("--encoder_path", default="",
                   help="its Hugging Face folder (minilm: the packaged copy by default)")
    p.add_argument("--dataset", required=True, help="source TFDS dataset name (with 'caption')")
    p.add_argument("--text_len", type=int, default=40, help="caption tokens (config.data.text_len)")
    encode_dataset.add_arguments(p, "DATASET_ENCODER")
    args = p.parse_args(argv)
    bad_input = encode_dataset.start_command()
    try:
        folder = encode(args.encoder, args.dataset, args.out, encoder_path=args.encoder_path,
                        data_dir=args.data_dir, text_len=args.text_len, name=args.name,
                        splits=args.splits.split(",") if args.splits else None,
                        batch_size=args.batch_size, builder_kwargs=json.loads(args.builder_kwargs))
    except bad_input as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    info = read_info(folder)
    print(f"wrote {folder}: {info['examples']} examples with {info['width']}-wide embeddings; "
          f"train with --config.data.name={os.path.basename(os.path.dirname(folder))} "
          f"--config.data.data_dir={os.path.dirname(os.path.dirname(folder))} "
          f"--config.model.text_encoder.kind={args.encoder} --config.model.text_width="
          f"{info['width']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
