"""The frozen video autoencoder of a latent DiT run.

A DiT trains in a VAE's latent space when its config names a VAE run: config.data.autoencoder =
a `vidit.train` workdir of a config with model.kind = 'vae' (or its `vidit.export` folder),
loaded by `vidit.run.load_autoencoder`. Then

  * the model's input is the latent [T', H', W', C'] of a data.num_frames x height x width clip
    (`input_shape`), normalised per channel with the VAE run's latent statistics
    (vidit/latent_stats.py): z = (posterior_mean - mean) / std;
  * online: the pipeline delivers pixel clips ('video') and the frozen encoder runs inside the
    jitted train step (`Setup.model_input`); cached: a dataset written by
    `data_pipelines/encode_latents.py` delivers the raw posterior means ('latent'), which are only
    normalised. Both give the same model input, so the same loss, on the same clips;
  * sampling denoises latents and the decoder turns them (denormalised) back into video.

The encoder's parameters (EMA of the VAE run, its 'vae' subtree) are a frozen input of the train
step, never part of the train state: the optimizer does not see them and the DiT's checkpoints do
not hold them. Latents are the posterior mean (no sampling), as in the cached dataset.

config.data.autoencoder may also be a diffusers AutoencoderKLWan folder (a Wan 2.1 model's
`vae/`, or the model folder above it): the Wan VAE (vidit/models/wan_vae.py) with the latent
mean and std of its config.json, normalised as Wan's pipelines do.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vidit.errors import ConfigError, LoadError
from vidit.latent_stats import STATS_FILE
from vidit.models import vae


class Autoencoder:
    """A trained VAE, frozen: its structure, compression, latent statistics and parameters.

    The parameters are passed to `encode` / `decode` explicitly (the train step takes them as an
    argument, so jit does not bake them in as constants); `params` holds the loaded ones.
    `config.data` is the pixel clip geometry the VAE was trained on (encode_latents' default)."""

    def __init__(self, path: str, config: Any, stats: dict, params: Any = None,
                 build=None):
        self.path = path
        self.config = config
        self.model_cfg = vae.vae_model_config(config.model)
        build = build or (lambda: vae.VideoVAE(self.model_cfg, nnx.Rngs(0)))
        abstract = nnx.eval_shape(build)
        self.compression = tuple(int(f) for f in abstract.compression)
        self.channels = int(abstract.channels)
        self.latent_channels = int(abstract.latent_channels)
        self.mean = np.asarray(stats["mean"], np.float32)
        self.std = np.asarray(stats["std"], np.float32)
        if self.mean.shape != (self.latent_channels,) or self.std.shape != self.mean.shape:
            raise LoadError(f"{path}: the latent statistics do not hold {self.latent_channels} "
                            "channel means and stds")
        self.graphdef = nnx.split(abstract, nnx.Param)[0]
        self.params = params

    @classmethod
    def wan(cls, path: str, vae_cfg: Any, params: Any = None) -> "Autoencoder":
        """The Wan 2.1 VAE of a diffusers folder (vidit/wan_weights.load_vae), its latents
        normalised with the config's latents_mean / latents_std. Its default clip is Wan's:
        81 frames of 480x832."""
        import ml_collections

        from vidit.models import wan_vae
        config = ml_collections.ConfigDict(dict(
            model={"kind": "wan_vae", **vae_cfg.to_dict()},
            data=dict(num_frames=81, frame_stride=1, height=480, width=832,
                      channels=int(vae_cfg.in_channels), name="", builder_kwargs={})))
        stats = {"mean": vae_cfg.latents_mean, "std": vae_cfg.latents_std}
        return cls(path, config, stats, params, build=lambda: wan_vae.build(vae_cfg))

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        st, sh, sw = self.compression
        if (frames - 1) % st or height % sh or width % sw:
            raise ConfigError(
                f"config.data.num_frames={frames}, height={height}, width={width} do not fit the "
                f"autoencoder's compression {self.compression}: frames must be 1 + k*{st}, "
                f"height a multiple of {sh}, width of {sw}")
        return (1 + (frames - 1) // st, height // sh, width // sw, self.latent_channels)

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


def input_shape(config: Any, autoencoder: Autoencoder | None = None,
                clip: tuple[int, int, int] | None = None) -> tuple[int, int, int, int]:
    """(frames, height, width, channels) of one model input: the pixel clip (default
    config.data's num_frames x height x width; a bucket's shape, a sampler's size), or with an
    autoencoder its latent."""
    d = config.data
    frames, height, width = clip or (int(d.num_frames), int(d.height), int(d.width))
    if autoencoder is None:
        return (int(frames), int(height), int(width), int(d.channels))
    return autoencoder.latent_shape(int(frames), int(height), int(width))
