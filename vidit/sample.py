"""Generate videos from a trained run (its newest checkpoint's EMA params) or an export.

    python -m vidit.sample --workdir runs/quickstart --num 10 --out samples.gif
    python -m vidit.sample --workdir exports/quickstart --label 3 --num 4 --out threes.mp4
    python -m vidit.sample --workdir runs/text --prompt "a 7 moving left" --out seven.gif
    python -m vidit.sample --workdir runs/mixed --frames 8 --height 32 --width 48 --out wide.gif
    python -m vidit.sample --workdir runs/i2v --image first.png --out continued.gif

--frames/--height/--width (default: the config's data.num_frames x height x width) may be any
size the patch (and a latent DiT's VAE) divides, trained or not (docs/buckets says how quality
holds up off the trained sizes). --image (models trained with model.first_frame) starts every
sample from that picture, resized and centre-cropped to the sample's size.
"""
from __future__ import annotations

import functools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from vidit import (autoencoder, cli, diffusion, run as run_lib, sharding, steps, text_encoders,
                   video_io)
from vidit.errors import CheckpointError, LoadError


def conditions(config, num: int, label: int | None, prompt: str | None) -> dict:
    cond = config.model.cond
    if cond == "class":
        if prompt is not None:
            raise ValueError("this model is class-conditional: use --label, not --prompt")
        if label is not None and not 0 <= label < config.model.num_classes:
            raise ValueError(f"--label must be in [0, {config.model.num_classes})")
        labels = (np.full(num, label) if label is not None
                  else np.arange(num) % config.model.num_classes)
        return {"label": labels.astype(np.int32)}
    if cond == "text":
        if label is not None:
            raise ValueError("this model is text-conditional: use --prompt, not --label")
        ids, mask = text_encoders.tokenizer_for(config.model)(prompt or "", config.model.text_len)
        return {"text": np.tile(ids[None], (num, 1)), "text_mask": np.tile(mask[None], (num, 1))}
    if label is not None or prompt is not None:
        raise ValueError("this model is unconditional: drop --label/--prompt")
    return {}


def read_image(path: str, height: int, width: int, channels: int) -> np.ndarray:
    """An image file -> float32 [1, height, width, channels] in [-1, 1] (scaled to cover the
    size, centre-cropped; grey or RGB converted to `channels`)."""
    import imageio.v3 as iio
    from data_pipelines import pipeline
    try:
        image = np.asarray(iio.imread(path), np.float32)
    except Exception as e:  # pylint: disable=broad-except  (missing, unreadable, not an image)
        raise ValueError(f"--image {path!r} could not be read as an image: {e}") from None
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3:
        raise ValueError(f"--image {path!r} has shape {image.shape}; expected one picture")
    image = image[..., :3] if image.shape[-1] == 4 else image  # drop alpha
    image = pipeline.resize_and_crop(image[None], height, width)
    return pipeline.convert_channels(image, channels) / 127.5 - 1.0


def sample_shape(config, run, num: int, frames=None, height=None, width=None) -> tuple:
    """The noise shape of `num` samples of (frames, height, width) pixels (default: config.data's
    clip), checked against the patch and the VAE."""
    d = config.data
    clip = (int(frames or d.num_frames), int(height or d.height), int(width or d.width))
    shape = autoencoder.input_shape(config, run.autoencoder, clip)
    patch = tuple(config.model.patch)
    if any(n % p for n, p in zip(shape[:3], patch)):
        raise ValueError(f"a {'x'.join(map(str, clip))} sample has model input "
                         f"{shape[:3]}, which config.model.patch={patch} does not divide")
    return (num,) + tuple(shape)


def generate(path: str, *, num: int, label=None, prompt=None, steps_: int | None = None,
             guidance: float | None = None, seed: int = 0, frames=None, height=None,
             width=None, image: str | None = None):
    """Returns (videos [num, T, H, W, C] in [-1, 1], config)."""
    run = run_lib.load(path)
    config, setup = run.config, run.setup
    if run.is_vae:
        raise ValueError(f"{path} is a VAE run: its reconstructions are under samples/; "
                         "vidit.sample generates with a DiT")
    objective = diffusion.make_objective(config.objective)
    frozen = run.frozen()
    # Labels, or the prompt's tokens (a frozen text encoder runs inside the sampler).
    cond = jax.tree.map(jnp.asarray, conditions(config, num, label, prompt))
    # A latent DiT samples latents, which the autoencoder's decoder turns into video.
    shape = sample_shape(config, run, num, frames, height, width)
    if image is not None:
        if not config.model.get("first_frame", False):
            raise ValueError(f"{path} was not trained with a first-frame condition "
                             "(config.model.first_frame): it cannot continue --image")
        d = config.data
        picture = read_image(image, height or d.height, width or d.width, d.channels)
        cond["first_frame"] = jnp.asarray(np.repeat(picture[None], num, axis=0))
    noise = jax.random.normal(jax.random.key(seed), shape)
    fn = jax.jit(functools.partial(steps.sample, setup, objective),
                 static_argnames=("steps", "guidance"))
    with sharding.use(setup.mesh, config.sharding_rules):
        videos = fn(run.params, noise, cond, frozen,
                    steps=int(steps_ or config.sample.steps),
                    guidance=float(config.sample.guidance if guidance is None else guidance))
    return np.asarray(jax.device_get(videos)), config


def main(argv):
    del argv
    from absl import flags
    f = flags.FLAGS
    cli.setup()
    start = time.perf_counter()
    try:
        videos, config = generate(f.workdir, num=f.num, label=f.label, prompt=f.prompt,
                                  steps_=f.steps, guidance=f.guidance, seed=f.seed,
                                  frames=f.frames, height=f.height, width=f.width, image=f.image)
    except (LoadError, CheckpointError, ValueError) as e:
        sys.exit(f"error: {e}")
    video_io.write_grid(f.out, videos, fps=config.sample.fps, scale=f.scale)
    print(f"wrote {len(videos)} videos to {f.out} in {time.perf_counter() - start:.1f}s")


def define_flags():
    from absl import flags
    flags.DEFINE_string("workdir", None, "Training workdir or export folder.")
    flags.DEFINE_integer("num", 8, "Number of videos (tiled into one file).")
    flags.DEFINE_string("out", "samples.gif", "Output .gif or .mp4.")
    flags.DEFINE_integer("label", None, "Class label (class-conditional models).")
    flags.DEFINE_string("prompt", None, "Caption (text-conditional models).")
    flags.DEFINE_integer("steps", None, "Sampling steps (default: the config's).")
    flags.DEFINE_float("guidance", None, "Classifier-free guidance scale (default: config's).")
    flags.DEFINE_integer("seed", 0, "Noise seed.")
    flags.DEFINE_integer("frames", None, "Frames per sample (default: config.data.num_frames).")
    flags.DEFINE_integer("height", None, "Sample height in pixels (default: config.data's).")
    flags.DEFINE_integer("width", None, "Sample width in pixels (default: config.data's).")
    flags.DEFINE_string("image", None, "A picture every sample starts from (image-to-video "
                        "models, config.model.first_frame).")
    flags.DEFINE_integer("scale", 4, "Nearest-neighbour upscaling of the written frames.")
    flags.mark_flags_as_required(["workdir"])


def entry_point():
    cli.run(main, define_flags)


if __name__ == "__main__":
    entry_point()
