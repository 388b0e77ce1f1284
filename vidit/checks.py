"""Start-up checks: config errors that would otherwise surface as a shape error deep inside jit,
or hours into a run. Each names the config keys to change (vidit.errors.ConfigError).

`validate` reads what the objective declares it needs (`objective.needs`: an interval input, a
jvp-capable attention backend, a discriminator, ...) and then lets the objective check its own
fields (`objective.check`); the attention backend's platforms come from the backend table.
"""
from __future__ import annotations

from typing import Any

import jax

from data_pipelines import buckets as bucket_lib
from vidit import autoencoder as autoencoder_lib, diffusion, flops, sharding, text_encoders
from vidit.errors import ConfigError
from vidit.models import attention, context_parallel


def check_batch(config: Any, mesh, batch: int | None = None, what: str = "") -> None:
    """A global batch (default config.data.batch_size) divides over the batch mesh axes, the
    processes and the micro-batches; `what` names it in the error (a bucket)."""
    batch = int(config.data.batch_size) if batch is None else batch
    shards = sharding.batch_shards(mesh)
    what = what or f"config.data.batch_size={batch}"
    if batch % shards:
        raise ConfigError(
            f"{what} does not divide over the batch mesh axes data x fsdp = {shards}; use a "
            f"multiple of {shards}")
    if batch % jax.process_count():
        raise ConfigError(f"{what} does not divide over {jax.process_count()} processes")
    accum = config.optim.grad_accum
    if accum < 1 or batch % (accum * shards):
        raise ConfigError(
            f"config.optim.grad_accum={accum}: each micro-batch of {what} (batch / grad_accum) "
            f"must still divide over the {shards} batch shards")


def buckets(config: Any) -> list:
    """config.data's buckets (data_pipelines/buckets.py); a bad bucket list is a ConfigError."""
    try:
        return bucket_lib.from_config(config.data)
    except bucket_lib.BucketError as e:
        raise ConfigError(str(e)) from None


def input_shapes(config: Any, autoencoder: Any = None) -> dict:
    """{bucket: model input shape (frames, height, width, channels)} of every bucket: the
    pixel clip, or with an autoencoder its latent."""
    out = {}
    for b in buckets(config):
        try:
            out[b] = autoencoder_lib.input_shape(config, autoencoder, b.shape)
        except ConfigError as e:
            raise ConfigError(f"bucket {b.name} (config.data.buckets): {e}") from None
    return out


def validate(config: Any, mesh, objective: Any = None, autoencoder: Any = None,
             text_width: int | None = None) -> None:
    """Every start-up check of a run of `config` on `mesh` (vidit.train and vidit.compile);
    `objective` defaults to the one config.objective builds, `autoencoder` is a latent DiT's,
    `text_width` the output width of a frozen caption encoder."""
    objective = objective or diffusion.make_objective(config.objective)
    several = len(buckets(config)) > 1
    for b in buckets(config):
        check_batch(config, mesh, b.batch_size,
                    f"bucket {b.name}'s batch {b.batch_size} (config.data.buckets; omitted "
                    "batch sizes are multiples of config.data.bucket_batch_multiple)"
                    if several else "")
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
    if kind == "wan" and (config.model.cond != "text" or te.get("kind", "byte") == "byte"):
        raise ConfigError("config.model.kind='wan' reads a frozen encoder's caption embeddings: "
                          "set config.model.cond='text' and config.model.text_encoder.kind to "
                          "'t5' (umT5, as Wan) or 'minilm'")
    if kind == "wan" and (needs.interval_input or objective.name != "flow"):
        raise ConfigError(f"config.model.kind='wan' is a flow-matching velocity model: "
                          f"config.objective.name='{objective.name}' is not 'flow'")
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
    for b, (frames, height, width, _) in input_shapes(config, autoencoder).items():
        where = f"bucket {b.name} (config.data.buckets): " if several else ""
        patch = tuple(config.model.patch)
        if frames % patch[0] or height % patch[1] or width % patch[2]:
            raise ConfigError(
                f"{where}the model input (frames, height, width) = {(frames, height, width)} "
                f"does not divide by config.model.patch = {patch}")
        try:
            context_parallel.check_layout(config.model, dict(mesh.shape),
                                          flops.tokens(config.model, frames, height, width))
        except ConfigError as e:
            raise ConfigError(f"{where}{e}") from None


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
    several = len(buckets(config)) > 1
    for b in buckets(config):
        where = (f"bucket {b.name} (config.data.buckets)" if several else
                 f"config.data.num_frames={b.frames}")
        if (b.frames - 1) % st:
            raise ConfigError(
                f"{where}: a VAE with temporal compression {st} needs 1 + k*{st} frames "
                f"({', '.join(str(1 + k * st) for k in range(0, 5))}, ...)")
        if b.height % sh or b.width % sw:
            where = (f"bucket {b.name} (config.data.buckets)" if several else
                     f"config.data.height x width = {b.height}x{b.width}")
            raise ConfigError(f"{where} does not divide by the spatial compression {sh}x{sw} "
                              "(config.model.compression)")
