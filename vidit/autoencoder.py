"""The frozen video autoencoder of a latent DiT run, and the latent statistics of a VAE run.

A DiT trains in a VAE's latent space when its config names a VAE run: config.data.autoencoder =
a `vidit.train` workdir of a config with model.kind = 'vae' (or its `vidit.export` folder). Then

  * the model's input is the latent [T', H', W', C'] of a data.num_frames x height x width clip
    (`input_shape`), normalised per channel with the VAE run's `latent_stats.json`:
    z = (posterior_mean - mean) / std;
  * online: the pipeline delivers pixel clips ('video') and the frozen encoder runs inside the
    jitted train step (`Setup.model_input`); cached: a dataset written by
    `data_pipelines/encode_latents.py` delivers the raw posterior means ('latent'), which are only
    normalised. Both give the same model input, so the same loss, on the same clips;
  * sampling denoises latents and the decoder turns them (denormalised) back into video.

The encoder's parameters (EMA of the VAE run, its 'vae' subtree) are an argument of the train
step, never part of the train state: the optimizer does not see them and the DiT's checkpoints do
not hold them. Latents are the posterior mean (no sampling), as in the cached dataset.

A VAE run writes `latent_stats.json` (per-channel mean and std of posterior means over training
clips) into its workdir when it finishes (`write_stats`); `vidit.export` copies it.
"""
from __future__ import annotations

import functools
import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

log = logging.getLogger("vidit")

STATS_FILE = "latent_stats.json"


def _load_error():
    from vidit import export
    return export.LoadError


def read_stats(path: str) -> dict:
    file = os.path.join(path, STATS_FILE)
    if not os.path.exists(file):
        raise _load_error()(
            f"{path} has no {STATS_FILE}: it is written when a VAE run (model.kind='vae') "
            "finishes; run the same vidit.train command again to finish it")
    with open(file) as f:
        return json.load(f)


class Autoencoder:
    """The static part of a trained VAE (structure, compression, latent statistics); its
    parameters come from `load_params` and are passed to `encode` / `decode`."""

    def __init__(self, path: str):
        from vidit import export
        from vidit.models import vae
        self.path = os.path.abspath(os.path.expanduser(path))
        if not os.path.isdir(self.path):
            raise export.LoadError(f"config.data.autoencoder={path!r} does not exist")
        self.config = export.read_config(self.path)
        if self.config.model.get("kind", "dit") != "vae":
            raise export.LoadError(
                f"config.data.autoencoder={path!r} is not a VAE run (its config.model.kind is "
                f"{self.config.model.get('kind', 'dit')!r}, not 'vae')")
        self.model_cfg = vae.vae_model_config(self.config.model)
        self.compression = tuple(int(f) for f in self.model_cfg.compression)
        self.channels = int(self.model_cfg.channels)
        self.latent_channels = int(self.model_cfg.latent_channels)
        stats = read_stats(self.path)
        self.mean = np.asarray(stats["mean"], np.float32)
        self.std = np.asarray(stats["std"], np.float32)
        if self.mean.shape != (self.latent_channels,) or self.std.shape != self.mean.shape:
            raise export.LoadError(f"{self.path}/{STATS_FILE} does not hold {self.latent_channels} "
                                   "channel means and stds")
        abstract = nnx.eval_shape(lambda: vae.VideoVAE(self.model_cfg, nnx.Rngs(0)))
        self.graphdef = nnx.split(abstract, nnx.Param)[0]

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        st, sh, sw = self.compression
        if (frames - 1) % st or height % sh or width % sw:
            raise _sharding().ConfigError(
                f"config.data.num_frames={frames}, height={height}, width={width} do not fit the "
                f"autoencoder's compression {self.compression}: frames must be 1 + k*{st}, "
                f"height a multiple of {sh}, width of {sw}")
        return (1 + (frames - 1) // st, height // sh, width // sw, self.latent_channels)

    def load_params(self, mesh) -> Any:
        """The VAE's EMA parameters ('vae' subtree), laid out on `mesh` by the VAE run's rules."""
        from vidit import export
        _, _, params, step = export.load(self.path, mesh=mesh)
        log.info("autoencoder: EMA params%s from %s (frozen; not checkpointed)",
                 f" of step {step}" if step is not None else "", self.path)
        return params["vae"]

    def module(self, params):
        return nnx.merge(self.graphdef, params)

    def normalize(self, z):
        return ((z.astype(jnp.float32) - self.mean) / self.std).astype(jnp.float32)

    def denormalize(self, z):
        return z.astype(jnp.float32) * self.std + self.mean

    def encode(self, params, video):
        """Normalised posterior means of pixel clips [B, T, H, W, C] in [-1, 1] (no gradient)."""
        mean, _ = self.module(jax.lax.stop_gradient(params)).encode(video)
        return jax.lax.stop_gradient(self.normalize(mean))

    def encode_raw(self, params, video):
        """Posterior means, not normalised (what encode_latents stores)."""
        return self.module(params).encode(video)[0]

    def decode(self, params, z):
        """Pixel clips in [-1, 1] of normalised latents."""
        return jnp.clip(self.module(params).decode(self.denormalize(z)), -1.0, 1.0)


def _sharding():
    from vidit import sharding
    return sharding


@functools.lru_cache(maxsize=8)
def _cached(path: str) -> Autoencoder:
    return Autoencoder(path)


def get(config: Any) -> Autoencoder | None:
    """The autoencoder config.data.autoencoder names (read once per path), or None."""
    path = config.data.get("autoencoder") or ""
    return _cached(os.path.abspath(os.path.expanduser(path))) if path else None


def input_shape(config: Any) -> tuple[int, int, int, int]:
    """(frames, height, width, channels) of one model input: the pixel clip, or its latent."""
    d = config.data
    ae = get(config) if config.model.get("kind", "dit") != "vae" else None
    if ae is None:
        return (int(d.num_frames), int(d.height), int(d.width), int(d.channels))
    return ae.latent_shape(int(d.num_frames), int(d.height), int(d.width))


# ---------------------------------------------------------------------------------------------
def measure_stats(config: Any, encode_fn, params: Any, mesh, num_batches: int) -> dict:
    """Per-channel mean/std of posterior means over up to num_batches training batches (first
    frames of each clip, no augmentation). encode_fn(params, video) -> posterior means."""
    from data_pipelines import pipeline
    from vidit import sharding
    from vidit import train as train_lib
    from vidit.models import vae
    it = pipeline.make_iterator(config.data, "train", seed=config.seed, train=False)
    fn = jax.jit(encode_fn)
    means = []
    with sharding.use(mesh, config.sharding_rules):
        for _, local in zip(range(num_batches), it):
            batch = train_lib.global_batch({"video": local["video"]}, mesh)
            means.append(train_lib.to_host(fn(params, batch["video"])))
    mean, std = vae.latent_stats(means)
    count = int(sum(np.prod(m.shape[:-1]) for m in means))
    clips = int(sum(m.shape[0] for m in means))
    return {"mean": [float(v) for v in np.asarray(mean)], "std": [float(v) for v in np.asarray(std)],
            "num_clips": clips, "num_latents": count, "split": "train",
            "note": "per-channel statistics of posterior means; the DiT sees (z - mean) / std"}


def write_stats(workdir: str, config: Any, setup: Any, params: Any, step: int) -> dict:
    """Measures the latent statistics of a finished VAE run (params: its whole EMA tree) and
    writes WORKDIR/latent_stats.json (process 0 writes; every process computes)."""
    num = int(config.train.get("latent_stats_batches", 32))
    stats = measure_stats(config, lambda p, x: setup.model(p).vae.encode(x)[0], params,
                          setup.mesh, num)
    stats["step"] = int(step)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, STATS_FILE), "w") as f:
            json.dump(stats, f, indent=2)
        log.info("latent stats over %d clips: mean %s std %s -> %s", stats["num_clips"],
                 np.round(stats["mean"], 3), np.round(stats["std"], 3),
                 os.path.join(workdir, STATS_FILE))
    _cached.cache_clear()
    return stats
