"""Generate videos from a trained run (its newest checkpoint's EMA params) or an export.

    python -m vidit.sample --workdir runs/quickstart --num 10 --out samples.gif
    python -m vidit.sample --workdir exports/quickstart --label 3 --num 4 --out threes.mp4
    python -m vidit.sample --workdir runs/text --prompt "a 7 moving left" --out seven.gif
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


def generate(path: str, *, num: int, label=None, prompt=None, steps_: int | None = None,
             guidance: float | None = None, seed: int = 0):
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
    shape = (num,) + autoencoder.input_shape(config, run.autoencoder)
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
                                  steps_=f.steps, guidance=f.guidance, seed=f.seed)
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
    flags.DEFINE_integer("scale", 4, "Nearest-neighbour upscaling of the written frames.")
    flags.mark_flags_as_required(["workdir"])


def entry_point():
    cli.run(main, define_flags)


if __name__ == "__main__":
    entry_point()
