"""Loading a run for inference: a training workdir or an export folder, and what it names.

    run = load("runs/quickstart")             # newest checkpoint's EMA params
    run = load("exports/quickstart")          # an export (model.safetensors + config.json)
    videos = steps.sample(run.setup, objective, run.params, noise, cond, run.frozen(), ...)

One `Run` holds the config, the model structure and shardings (`Setup`), the EMA parameters,
the checkpoint step, and the frozen networks it names: a latent DiT's autoencoder (the VAE run
config.data.autoencoder names, loaded the same way, with its latent statistics) and a frozen
caption encoder (checked against the one the run was trained with). `vidit.sample`,
`vidit.evaluate`, `vidit.export`, a distillation's teacher and `encode_latents` all load through
here, so a missing file or a mismatched tensor is reported the same way everywhere.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import jax
import ml_collections
from flax import traverse_util

from vidit import checkpoint, latent_stats, sharding, storage, text_encoders
from vidit.autoencoder import Autoencoder
from vidit.errors import CheckpointError, LoadError
from vidit.train_state import Setup

log = logging.getLogger("vidit")

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


@dataclasses.dataclass
class Run:
    path: Any  # str or epath.Path
    config: ml_collections.ConfigDict
    setup: Setup
    params: Any  # EMA parameters, laid out by setup.shardings.params
    step: int | None  # the checkpoint's step; None for an export
    autoencoder: Autoencoder | None = None  # a latent DiT's frozen VAE, with its params
    text_encoder: Any = None  # a frozen caption encoder (vidit/text_encoders.py)
    _frozen: dict | None = dataclasses.field(default=None, repr=False)

    @property
    def is_vae(self) -> bool:
        return self.config.model.get("kind", "dit") == "vae"

    def frozen(self) -> dict:
        """The frozen inputs of its jitted functions (vidit/steps.py); the empty caption's
        embedding is computed on the first call only."""
        if self._frozen is None:
            self._frozen = {}
            if self.autoencoder is not None:
                self._frozen["autoencoder"] = self.autoencoder.params
            if self.text_encoder is not None:
                self._frozen["text_encoder"] = self.text_encoder.params
                self._frozen["null_text"] = self.text_encoder.null(int(self.config.data.text_len))
        return self._frozen


def read_config(path) -> ml_collections.ConfigDict:
    """The config a workdir or export was written with (keys added since are backfilled)."""
    file = storage.path(path) / CONFIG
    if not file.exists():
        raise LoadError(f"{path} is neither a vidit workdir nor an export: no {CONFIG}")
    return ml_collections.ConfigDict(checkpoint.with_added_keys(json.loads(file.read_text())))


def param_key(path: tuple) -> str:
    """'blocks/0/mlp/fc1/kernel' for a flattened parameter path."""
    return "/".join(str(k) for k in path)  # list items (the VAE's layers) have int keys


def check_shapes(loaded: dict, expected: dict, source: str) -> None:
    """Refuses missing, unexpected or mis-shaped parameters, naming each one."""
    problems = [f"missing {k} {v.shape}" for k, v in expected.items() if k not in loaded]
    problems += [f"unexpected {k}" for k in loaded if k not in expected]
    problems += [f"{k}: file {loaded[k].shape} vs model {expected[k].shape}"
                 for k in loaded if k in expected and loaded[k].shape != expected[k].shape]
    if problems:
        raise LoadError(f"{source} does not match the model its config builds:\n  "
                        + "\n  ".join(problems[:20]))


def autoencoder_path(config) -> str:
    """The VAE run a latent DiT's config names ('' for a pixel-space model, or a VAE itself)."""
    if config.model.get("kind", "dit") == "vae":
        return ""
    return config.data.get("autoencoder") or ""


def load(path, *, mesh=None, step: int | None = None) -> Run:
    """The run at `path` (local or gs://): an export folder, or a training workdir's newest
    checkpoint (or the one at `step`). Its parameters are laid out over `mesh` (default: FSDP
    over all devices)."""
    root = storage.path(path)
    if not root.exists():
        raise LoadError(f"{path} does not exist")
    config = read_config(root)
    mesh = mesh or sharding.make_mesh({"fsdp": -1})
    config.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, sequence=1))
    ae_path = autoencoder_path(config)
    autoencoder = load_autoencoder(ae_path, mesh) if ae_path else None
    text_encoder = load_text_encoder(root, config, mesh)
    setup = Setup(config, mesh, autoencoder=autoencoder, text_encoder=text_encoder)
    weights = root / WEIGHTS
    if weights.exists():
        if step is not None:
            raise LoadError(f"{path} is an export (one set of weights); it has no step {step}")
        from safetensors.numpy import load_file
        with storage.local_copy(weights) as local:  # load_file reads every dtype (bfloat16)
            loaded = load_file(local)
        abstract = traverse_util.flatten_dict(setup.abstract.params)
        paths = {param_key(k): k for k in abstract}
        check_shapes(loaded, {param_key(k): v for k, v in abstract.items()}, weights)
        params = traverse_util.unflatten_dict({paths[k]: v for k, v in loaded.items()})
        params = jax.device_put(params, setup.shardings.params)
        return Run(path, config, setup, params, None, autoencoder, text_encoder)
    ckpt_dir = root / "checkpoints"
    if not ckpt_dir.exists():
        raise LoadError(f"{path} has a config but neither {WEIGHTS} nor checkpoints/")
    try:
        step, state = checkpoint.restore_params(ckpt_dir, setup.abstract, step)
    except CheckpointError as e:
        raise LoadError(f"{path}: {e}") from None
    return Run(path, config, setup, state.ema_params, step, autoencoder, text_encoder)


def load_text_encoder(root, config, mesh):
    """The frozen caption encoder a run was trained with, or None. It must be the same one:
    its weights' fingerprint is checked against the run's text_encoder.json."""
    if not text_encoders.is_frozen(config.model):
        return None
    encoder = text_encoders.load(config.model, mesh, config.sharding_rules)
    saved = root / text_encoders.IDENTITY_FILE
    if saved.exists():
        trained = json.loads(saved.read_text())
        if trained.get("sha256") != encoder.identity["sha256"]:
            raise LoadError(
                f"{root} was trained with the {trained.get('kind')} text encoder at "
                f"{trained.get('path')!r} (weights {trained.get('sha256', '')[:12]}...), but "
                f"config.model.text_encoder now finds different weights at {encoder.path!r} "
                f"({encoder.identity['sha256'][:12]}...): point it at the encoder the run used")
    return encoder


def load_autoencoder(path: str, mesh) -> Autoencoder:
    """The VAE run (workdir or export) a latent DiT names in config.data.autoencoder, frozen:
    its EMA parameters ('vae' subtree) on `mesh` and its latent statistics."""
    where = f"config.data.autoencoder={path!r}"
    full = storage.path(path)
    if not full.exists():
        raise LoadError(f"{where} does not exist")
    from vidit import wan_weights
    for folder in (full, full / "vae"):  # a diffusers Wan VAE folder, or the model above it
        if wan_weights.is_vae_folder(folder):
            vae_cfg, params = wan_weights.load_vae(folder)
            log.info("autoencoder: the Wan VAE of %s (frozen)", folder)
            # 127M frozen parameters (0.5 GB in f32): a copy on every device is simplest.
            replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
            return Autoencoder.wan(str(folder), vae_cfg, jax.device_put(params, replicated))
    config = read_config(full)
    if config.model.get("kind", "dit") != "vae":
        raise LoadError(f"{where} is not a VAE run (its config.model.kind is "
                        f"{config.model.get('kind', 'dit')!r}, not 'vae')")
    stats = latent_stats.read(full)
    run = load(full, mesh=mesh)
    log.info("autoencoder: EMA params%s from %s (frozen; not checkpointed)",
             f" of step {run.step}" if run.step is not None else "", full)
    return Autoencoder(str(full), config, stats, run.params["vae"])
