"""The data config's fields and defaults: one table for the trainer's base config
(vidit/config_lib.py) and the Grain pipeline (pipeline.py), which fills any field a caller
leaves out from here. Only ml_collections is imported: the pipeline's worker processes read it.
"""
import ml_collections


def defaults() -> ml_collections.ConfigDict:
    """config.data with every field at its default (the tiny embedded moving-digits set)."""
    return ml_collections.ConfigDict(dict(
        name="moving_digits",  # a TFDS dataset name (ArrayRecord files)
        data_dir="",  # '' = $VIDIT_DATA_DIR or ~/.cache/vidit/tensorflow_datasets
        num_frames=8,
        frame_stride=1,
        height=32,
        width=32,
        channels=1,
        batch_size=16,  # global: summed over all processes
        # Shape buckets, 'FxHxW[:batch[:weight]]' comma-separated (data_pipelines/buckets.py):
        # each record trains at the bucket of its stored shape, each global batch is one
        # bucket, drawn by weight. '' = one bucket, num_frames x height x width at batch_size.
        buckets="",
        # A bucket without a batch size gets tokens per batch level with num_frames x height x
        # width at batch_size, rounded down to a multiple of this (keep it a multiple of the
        # mesh's data x fsdp shards: the start-up check says when it is not).
        bucket_batch_multiple=8,
        text_len=40,  # caption tokens (the byte tokenizer's BOS + bytes + padding)
        num_workers=0,  # 0: preprocess in this process; > 0: Grain worker processes
        builder_kwargs={},  # passed to the TFDS builder (moving_digits: num_train, ...)
        # An unreadable or misshapen record is replaced by the next good one, counted and
        # logged; past this share of the examples read the run stops.
        max_bad_fraction=0.01,
        # A VAE run (workdir or export) to train a DiT in its latent space: online encoding,
        # or cached with a dataset from data_pipelines/encode_latents.py (vidit/autoencoder.py).
        autoencoder="",
    ))
