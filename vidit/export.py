"""Export EMA parameters to a portable format (loaded back by vidit/run.py for inference).

    python -m vidit.export --workdir runs/quickstart --out exports/quickstart

An export is a folder with `model.safetensors` (EMA params, keys like 'blocks/attn/qkv/kernel')
and `config.json` (a VAE run's also `latent_stats.json`); no Orbax, no optimizer state. Loading
checks every shape against the model the config builds and names each mismatch.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from vidit import cli, latent_stats, run as run_lib
from vidit.errors import CheckpointError, LoadError


def flat_params(params: Any) -> dict:
    """{'blocks/0/mlp/fc1/kernel': numpy array} of a parameter tree (the safetensors keys)."""
    return {run_lib.param_key(k): np.asarray(v)
            for k, v in traverse_util.flatten_dict(jax.device_get(params)).items()}


def export(workdir: str, out: str) -> str:
    loaded = run_lib.load(workdir)
    from safetensors.numpy import save_file
    os.makedirs(out, exist_ok=True)
    flat = flat_params(loaded.params)
    save_file(flat, os.path.join(out, run_lib.WEIGHTS),
              metadata={"step": str(loaded.step), "format": "vidit"})
    with open(os.path.join(out, run_lib.CONFIG), "w") as f:
        json.dump(loaded.config.to_dict(), f, indent=2)
    stats = os.path.join(workdir, latent_stats.STATS_FILE)
    if os.path.exists(stats):  # a VAE's latent normalisation travels with its weights
        shutil.copyfile(stats, os.path.join(out, latent_stats.STATS_FILE))
    n = sum(v.size for v in flat.values())
    print(f"exported step {loaded.step}: {len(flat)} tensors, {n:,} parameters -> {out}")
    return out


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
