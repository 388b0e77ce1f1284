"""Export EMA parameters to a portable format (loaded back by vidit/run.py for inference).

    python -m vidit.export --workdir runs/quickstart --out exports/quickstart

An export is a folder with `model.safetensors` (EMA params, keys like 'blocks/attn/qkv/kernel')
and `config.json` (a VAE run's also `latent_stats.json`; a Wan model's also `transformer/`, the
diffusers WanTransformer3DModel folder, and `vae/` when its autoencoder is a Wan VAE); no Orbax,
no optimizer state. Loading checks every shape against the model the config builds and names
each mismatch.
"""
from __future__ import annotations

import json
import sys
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from vidit import cli, latent_stats, run as run_lib, storage, text_encoders
from vidit.errors import CheckpointError, LoadError


def flat_params(params: Any) -> dict:
    """{'blocks/0/mlp/fc1/kernel': numpy array} of a parameter tree (the safetensors keys)."""
    return {run_lib.param_key(k): np.asarray(v)
            for k, v in traverse_util.flatten_dict(jax.device_get(params)).items()}


def export(workdir, out) -> str:
    """Writes the export of `workdir` (local or gs://) to `out` (local or gs://)."""
    loaded = run_lib.load(workdir)
    from safetensors.numpy import save
    out = storage.path(out)
    flat = flat_params(loaded.params)
    storage.write_atomic(out / run_lib.WEIGHTS,
                         save(flat, metadata={"step": str(loaded.step), "format": "vidit"}))
    storage.write_atomic(out / run_lib.CONFIG, json.dumps(loaded.config.to_dict(), indent=2))
    # A VAE's latent normalisation, a DiT's text encoder identity: they travel with the weights.
    for name in (latent_stats.STATS_FILE, text_encoders.IDENTITY_FILE):
        if (storage.path(workdir) / name).exists():
            storage.write_atomic(out / name, (storage.path(workdir) / name).read_bytes())
    if loaded.config.model.get("kind", "dit") == "wan":  # also as diffusers loads it
        from vidit import wan_weights
        from vidit.models import lora
        params = (lora.merged(loaded.params, loaded.config.model)  # diffusers has no adapters
                  if lora.enabled(loaded.config.model) else loaded.params)
        wan_weights.export_transformer(loaded.config.model, params, out / "transformer")
        ae = loaded.autoencoder
        if ae is not None and ae.config.model.kind == "wan_vae":  # its Wan VAE beside it
            wan_weights.export_vae(ae.config.model, ae.params, out / "vae")
    n = sum(v.size for v in flat.values())
    print(f"exported step {loaded.step}: {len(flat)} tensors, {n:,} parameters -> {out}")
    return str(out)


def main(argv):
    del argv
    from absl import flags
    cli.setup()
    try:
        export(flags.FLAGS.workdir, flags.FLAGS.out)
    except (LoadError, CheckpointError) as e:
        sys.exit(f"error: {e}")


def define_flags():
    from absl import flags
    flags.DEFINE_string("workdir", None, "Training workdir to export (its newest checkpoint).")
    flags.DEFINE_string("out", None, "Output folder.")
    flags.mark_flags_as_required(["workdir", "out"])


def entry_point():
    cli.run(main, define_flags)


if __name__ == "__main__":
    entry_point()
