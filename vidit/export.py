"""Export EMA parameters to a portable format, and load them (or a workdir) back for inference.

    python -m vidit.export --workdir runs/quickstart --out exports/quickstart

An export is a folder with `model.safetensors` (EMA params, keys like 'blocks/attn/qkv/kernel')
and `config.json` (a VAE run's also `latent_stats.json`); no Orbax, no optimizer state. Loading checks every shape against the model the
config builds and names each mismatch.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from vidit import checkpoint, cli, sharding
from vidit.train_state import Setup

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


class LoadError(RuntimeError):
    pass


def read_config(path: str) -> ml_collections.ConfigDict:
    file = os.path.join(path, CONFIG)
    if not os.path.exists(file):
        raise LoadError(f"{path} is neither a vidit workdir nor an export: no {CONFIG}")
    with open(file) as f:
        return ml_collections.ConfigDict(checkpoint.with_added_keys(json.load(f)))


def param_key(path: tuple) -> str:
    """'blocks/0/mlp/fc1/kernel' for a flattened parameter path."""
    return "/".join(str(k) for k in path)  # list items (the VAE's layers) have int keys


def _flat(params: Any) -> dict:
    return {param_key(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}


def check_shapes(loaded: dict, expected: dict, source: str) -> None:
    """Refuses missing, unexpected or mis-shaped parameters, naming each one."""
    problems = [f"missing {k} {v.shape}" for k, v in expected.items() if k not in loaded]
    problems += [f"unexpected {k}" for k in loaded if k not in expected]
    problems += [f"{k}: file {loaded[k].shape} vs model {expected[k].shape}"
                 for k in loaded if k in expected and loaded[k].shape != expected[k].shape]
    if problems:
        raise LoadError(f"{source} does not match the model its config builds:\n  "
                        + "\n  ".join(problems[:20]))


def load(path: str, mesh=None, step: int | None = None
         ) -> tuple[ml_collections.ConfigDict, Setup, Any, int | None]:
    """(config, setup, EMA params, step) from an export folder or a training workdir (its
    newest checkpoint, or the one at `step`)."""
    config = read_config(path)
    mesh = mesh or sharding.make_mesh({"fsdp": -1})
    config.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, sequence=1))
    setup = Setup(config, mesh)
    weights = os.path.join(path, WEIGHTS)
    if os.path.exists(weights):
        if step is not None:
            raise LoadError(f"{path} is an export (one set of weights); it has no step {step}")
        from safetensors.numpy import load_file
        loaded = load_file(weights)
        abstract = traverse_util.flatten_dict(setup.abstract.params)
        paths = {param_key(k): k for k in abstract}
        expected = {param_key(k): v for k, v in abstract.items()}
        check_shapes(loaded, expected, weights)
        params = traverse_util.unflatten_dict({paths[k]: v for k, v in loaded.items()})
        params = jax.device_put(params, setup.shardings.params)
        return config, setup, params, None
    ckpt_dir = os.path.join(path, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise LoadError(f"{path} has a config but neither {WEIGHTS} nor checkpoints/")
    if step is not None and not os.path.isdir(os.path.join(ckpt_dir, str(step))):
        have = sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
        raise LoadError(f"{path} has no checkpoint at step {step}; it has steps {have}")
    step, state = checkpoint.restore_params(ckpt_dir, setup.abstract, step)
    return config, setup, state.ema_params, step


def export(workdir: str, out: str) -> str:
    config, _, params, step = load(workdir)
    from safetensors.numpy import save_file
    os.makedirs(out, exist_ok=True)
    flat = _flat(jax.device_get(params))
    save_file(flat, os.path.join(out, WEIGHTS), metadata={"step": str(step), "format": "vidit"})
    with open(os.path.join(out, CONFIG), "w") as f:
        json.dump(config.to_dict(), f, indent=2)
    from vidit import autoencoder
    stats = os.path.join(workdir, autoencoder.STATS_FILE)
    if os.path.exists(stats):  # a VAE's latent normalisation travels with its weights
        shutil.copyfile(stats, os.path.join(out, autoencoder.STATS_FILE))
    n = sum(v.size for v in flat.values())
    print(f"exported step {step}: {len(flat)} tensors, {n:,} parameters -> {out}")
    return out


def main(argv):
    del argv
    from absl import flags
    cli.setup()
    try:
        export(flags.FLAGS.workdir, flags.FLAGS.out)
    except (LoadError, checkpoint.CheckpointError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    from absl import app, flags
    flags.DEFINE_string("workdir", None, "Training workdir to export (its newest checkpoint).")
    flags.DEFINE_string("out", None, "Output folder.")
    flags.mark_flags_as_required(["workdir", "out"])
    app.run(main)
