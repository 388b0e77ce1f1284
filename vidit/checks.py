"""Start-up checks: config errors that would otherwise surface as a shape error deep inside jit,
or hours into a run. Each names the config keys to change (vidit.errors.ConfigError).

`validate` reads what the objective declares it needs (`objective.needs`: an interval input, a
jvp-capable attention backend, a discriminator, ...) and then lets the objective check its own
fields (`objective.check`); the attention backend's platforms come from the backend table.
"""
from __future__ import annotations

from typing import Any

import jax

from vidit import autoencoder as autoencoder_lib, diffusion, flops, sharding, text_encoders
from vidit.errors import ConfigError
from vidit.models import attention, context_parallel


def check_batch(config: Any, mesh) -> None:
    """The global batch divides over the batch mesh axes, the processes and the micro-batches."""
    batch, shards = int(config.data.batch_size), sharding.batch_shards(mesh)
    if batch % shards:
        raise ConfigError(
            f"config.data.batch_size={batch} does not divide over the batch mesh axes "
            f"data x fsdp = {shards}; use a multiple of {shards}")
    if batch % jax.process_count():
        raise ConfigError(f"config.data.batch_size={batch} does not divide over "
                          f"{jax.process_count()} processes")
    accum = config.optim.grad_accum
    if accum < 1 or batch % (accum * shards):
        raise ConfigError(
            f"config.optim.grad_accum={accum}: each micro-batch (batch_size / grad_accum) must "
            f"still divide over the {shards} batch shards")


def validate(config: Any, mesh, objective: Any = None, autoencoder: Any = None,
             text_width: int | None = None) -> None:
    """Every start-up check of a run of `config` on `mesh` (vidit.train and vidit.compile);
    `objective` defaults to the one config.objective builds, `autoencoder` is a latent DiT's,
    `text_width` the output width of a frozen caption encoder."""
    objective = objective or diffusion.make_objective(config.objective)
    check_batch(config, mesh)
    if config.train.nonfinite not in ("skip", "stop"):
        raise ConfigError(
            f"config.train.nonfinite='{config.train.nonfinite}' is not one of ['skip', 'stop']")
    kind, needs = config.model.get("kind", "dit"), objective.needs
    if kind == "vae" or needs.model == "vae":
        _validate_vae(config, objective)
        return
    frames, height, width, channels = autoencoder_lib.input_shape(config, autoencoder)
    what = ("the autoencoder's latent_channels" if config.data.get("autoencoder")
            else "config.data.channels")
    if config.model.channels != channels:
        raise ConfigError(
            f"config.model.channels={config.model.channels} differs from {what}={channels}")
    if config.model.cond == "text" and config.model.text_len != config.data.text_len:
        raise ConfigError(
            f"config.model.text_len={config.model.text_len} differs from "
            f"config.data.text_len={config.data.text_len}")
    te = config.model.get("text_encoder", {})
    if config.model.cond == "text" and te.get("kind", "byte") not in text_encoders.KINDS:
        raise ConfigError(f"config.model.text_encoder.kind='{te.get('kind')}' is not one of "
                          f"{text_encoders.KINDS}")
    if text_width is not None and config.model.text_width != text_width:
        raise ConfigError(
            f"config.model.text_width={config.model.text_width} differs from the output width "
            f"of the {te.get('kind')} text encoder ({text_width}); set "
            f"config.model.text_width={text_width}")
    if needs.interval_input and not config.model.get("interval_input"):
        raise ConfigError(
            f"config.objective.name='{objective.name}' trains an average-velocity model; set "
            "config.model.interval_input=True")
    backend = attention.lookup(config.model.attention)
    if needs.jvp and not backend.jvp:
        jvp_ok = [name for name, b in attention.BACKENDS.items() if b.jvp]
        raise ConfigError(
            f"config.objective.name='{objective.name}' takes a jax.jvp through the model and "
            f"config.model.attention='{config.model.attention}' has no JVP rule (its kernel is "
            f"a custom_vjp); use config.model.attention={jvp_ok}, or an objective without a "
            "jvp (config.objective.name='shortcut')")
    if needs.discriminator and not config.model.get("disc_width", 0):
        raise ConfigError(
            f"config.objective.name='{objective.name}' as configured trains against a "
            "discriminator: set config.model.disc_width > 0 (e.g. 32)")
    objective.check(config)
    platform = mesh.devices.flat[0].platform
    if platform not in backend.platforms:
        raise ConfigError(
            f"config.model.attention='{config.model.attention}' runs on "
            f"{'/'.join(backend.platforms)} only and this mesh is {platform}; use 'chunked' "
            "(any device) or 'xla'")
    tokens = flops.tokens(config.model, frames, height, width)
    context_parallel.check_layout(config.model, dict(mesh.shape), tokens)


def _validate_vae(config: Any, objective: Any) -> None:
    """Config errors of a VAE run (config.model.kind = 'vae')."""
    if config.model.get("kind", "dit") != "vae":
        raise ConfigError(f"config.objective.name='{objective.name}' trains a VAE: set "
                          "config.model.kind='vae' and a VAE model config "
                          "(configs/vae_moving_digits.py)")
    if objective.needs.model != "vae":
        raise ConfigError(
            f"config.model.kind='vae' trains with config.objective.name='vae', not "
            f"'{objective.name}' (use diffusion.default_config('vae'))")
    if config.data.get("autoencoder"):
        raise ConfigError("a VAE run trains on pixels: config.data.autoencoder must be ''")
    d, m = config.data, config.model
    if m.channels != d.channels:
        raise ConfigError(
            f"config.model.channels={m.channels} differs from config.data.channels={d.channels}")
    st, sh, sw = (int(f) for f in m.compression)
    if (d.num_frames - 1) % st:
        raise ConfigError(
            f"config.data.num_frames={d.num_frames}: a VAE with temporal compression {st} needs "
            f"1 + k*{st} frames ({', '.join(str(1 + k * st) for k in range(1, 5))}, ...)")
    if d.height % sh or d.width % sw:
        raise ConfigError(
            f"config.data.height x width = {d.height}x{d.width} does not divide by the spatial "
            f"compression {sh}x{sw} (config.model.compression)")
    objective.check(config)
