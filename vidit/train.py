"""Train a video DiT from a config file.

    python -m vidit.train --config configs/quickstart.py --workdir runs/quickstart
    python -m vidit.train --config configs/moving_digits.py:smoke --workdir /tmp/x \
        --config.train.steps=20

The run resumes from the newest good checkpoint in --workdir. Ctrl-C or SIGTERM (preemption)
saves a checkpoint and exits cleanly.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vidit import (autoencoder as autoencoder_lib, checkpoint, cli, diffusion, distributed, flops,
                   metrics, sharding, steps, teacher as teacher_lib, video_io)
from vidit.train_state import Setup
from vidit.models import attention, context_parallel

log = logging.getLogger("vidit")


# ---------------------------------------------------------------------------------------------
def validate(config: Any, mesh) -> None:
    """Config errors that would otherwise surface as a shape error deep inside jit."""
    sharding.check_batch(config.data.batch_size, mesh)
    if config.data.batch_size % jax.process_count():
        raise sharding.ConfigError(
            f"config.data.batch_size={config.data.batch_size} does not divide over "
            f"{jax.process_count()} processes")
    if config.model.get("kind", "dit") == "dit":
        frames, height, width, channels = autoencoder_lib.input_shape(config)
        what = ("the autoencoder's latent_channels" if config.data.get("autoencoder")
                else "config.data.channels")
        if config.model.channels != channels:
            raise sharding.ConfigError(
                f"config.model.channels={config.model.channels} differs from {what}={channels}")
    if config.model.cond == "text" and config.model.text_len != config.data.text_len:
        raise sharding.ConfigError(
            f"config.model.text_len={config.model.text_len} differs from "
            f"config.data.text_len={config.data.text_len}")
    accum = config.optim.grad_accum
    if accum < 1 or config.data.batch_size % (accum * sharding.batch_shards(mesh)):
        raise sharding.ConfigError(
            f"config.optim.grad_accum={accum}: each micro-batch (batch_size / grad_accum) must "
            f"still divide over the {sharding.batch_shards(mesh)} batch shards")
    if config.train.nonfinite not in ("skip", "stop"):
        raise sharding.ConfigError(
            f"config.train.nonfinite='{config.train.nonfinite}' is not one of ['skip', 'stop']")
    objective = diffusion.make_objective(config.objective)
    if config.model.get("kind", "dit") == "vae":
        validate_vae(config, objective)
        return
    if objective.name == "vae":
        raise sharding.ConfigError("config.objective.name='vae' trains a VAE: set "
                                   "config.model.kind='vae' and a VAE model config "
                                   "(configs/vae_moving_digits.py)")
    if objective.needs_interval and not config.model.get("interval_input"):
        raise sharding.ConfigError(
            f"config.objective.name='{objective.name}' trains an average-velocity model; set "
            "config.model.interval_input=True")
    if objective.needs_jvp and config.model.attention in attention.NO_JVP:
        raise sharding.ConfigError(
            f"config.objective.name='{objective.name}' takes a jax.jvp through the model and "
            f"config.model.attention='{config.model.attention}' has no JVP rule (its kernel is "
            "a custom_vjp); use config.model.attention='xla', 'chunked' or 'dense', or "
            "config.objective.name='shortcut' (no jvp)")
    if getattr(objective, "adversarial", False) and not config.model.get("disc_width", 0):
        raise sharding.ConfigError(
            f"config.objective.adversarial_weight={objective.adversarial_weight} trains against a "
            "discriminator: set config.model.disc_width > 0 (e.g. 32)")
    guidance = getattr(objective, "guidance", 1.0)
    if guidance != 1.0 and config.model.cond == "none":
        raise sharding.ConfigError(
            f"config.objective.guidance={guidance} trains guidance in, which needs a conditional "
            "model (config.model.cond='class' or 'text'), or set it to 1")
    if guidance != 1.0 and objective.target_model is None and not config.train.cond_drop_prob > 0:
        raise sharding.ConfigError(
            f"config.objective.guidance={guidance} mixes in the model's own unconditional "
            "velocity, which it learns only from dropped conditions: set "
            "config.train.cond_drop_prob > 0")
    if objective.target_model == "teacher" and not config.objective.get("teacher_workdir"):
        raise sharding.ConfigError(
            f"config.objective.name='{objective.name}' distils a trained flow model: set "
            "config.objective.teacher_workdir to its vidit.train workdir or vidit.export folder")
    platform = mesh.devices.flat[0].platform
    needs = {"cudnn": "gpu", "splash": "tpu"}.get(config.model.attention)
    if needs and platform != needs:
        raise sharding.ConfigError(
            f"config.model.attention='{config.model.attention}' runs on {needs} only and this "
            f"mesh is {platform}; use 'chunked' (any device) or 'xla'")
    tokens = flops.tokens(config.model, frames, height, width)
    context_parallel.check_layout(config.model, dict(mesh.shape), tokens)


def validate_vae(config: Any, objective: Any) -> None:
    """Config errors of a VAE run (config.model.kind = 'vae')."""
    if objective.name != "vae":
        raise sharding.ConfigError(
            f"config.model.kind='vae' trains with config.objective.name='vae', not "
            f"'{objective.name}' (use diffusion.default_config('vae'))")
    if config.data.get("autoencoder"):
        raise sharding.ConfigError("a VAE run trains on pixels: config.data.autoencoder must be ''")
    d, m = config.data, config.model
    if m.channels != d.channels:
        raise sharding.ConfigError(
            f"config.model.channels={m.channels} differs from config.data.channels={d.channels}")
    st, sh, sw = (int(f) for f in m.compression)
    if (d.num_frames - 1) % st:
        raise sharding.ConfigError(
            f"config.data.num_frames={d.num_frames}: a VAE with temporal compression {st} needs "
            f"1 + k*{st} frames ({', '.join(str(1 + k * st) for k in range(1, 5))}, ...)")
    if d.height % sh or d.width % sw:
        raise sharding.ConfigError(
            f"config.data.height x width = {d.height}x{d.width} does not divide by the spatial "
            f"compression {sh}x{sw} (config.model.compression)")


def to_host(tree: Any) -> Any:
    """numpy copies of (replicated or sharded) global arrays, on every process."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(tree, tiled=True)


def global_batch(local: dict, mesh) -> dict:
    """This process's rows -> global arrays sharded over the batch axes."""
    return {k: jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, v.ndim), v)
            for k, v in local.items()}


def validation_clips(config: Any, num: int) -> np.ndarray:
    """The first `num` validation clips (first frames), the inputs of a VAE's samples."""
    from data_pipelines import pipeline
    it = pipeline.make_iterator(config.data, "validation", seed=0, train=False,
                                process_index=0, process_count=1)
    clips = []
    for batch in it:
        clips.append(batch["video"])
        if sum(len(c) for c in clips) >= num:
            break
    return np.concatenate(clips)[:num]


def sample_conditions(config: Any, num: int) -> dict:
    """Conditions for the periodic samples: digits 0..9 in turn, or validation captions."""
    if config.model.cond == "class":
        return {"label": np.arange(num, dtype=np.int32) % config.model.num_classes}
    if config.model.cond == "text":
        from data_pipelines import pipeline
        it = pipeline.make_iterator(config.data, "validation", seed=0, train=False,
                                    process_index=0, process_count=1)
        return {"text": next(iter(it))["text"][:num]}
    return {}


class Preemption:
    """Turns SIGTERM/SIGINT into a flag the loop checks, so a checkpoint is written first."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        del frame
        if self.requested:  # a second Ctrl-C means: stop now
            raise KeyboardInterrupt
        log.warning("signal %d received: saving a checkpoint and exiting", signum)
        self.requested = True


# ---------------------------------------------------------------------------------------------
def train(config: Any, workdir: str, stop_at: int | None = None) -> dict:
    """Runs (or resumes) training; returns a summary of the run.

    `stop_at` ends this invocation early at that step with a checkpoint, as a preemption would;
    the learning-rate schedule still spans config.train.steps, so calling again resumes exactly.
    """
    from data_pipelines import pipeline  # imported late: it pulls in TFDS

    started = time.perf_counter()
    os.makedirs(workdir, exist_ok=True)
    mesh = sharding.make_mesh(config.mesh)
    validate(config, mesh)
    objective = diffusion.make_objective(config.objective)
    setup = Setup(config, mesh)
    is_main = jax.process_index() == 0
    log.info("mesh %s, %d parameters, %d devices", dict(mesh.shape), setup.num_params(),
             jax.device_count())

    train_iter = pipeline.make_iterator(config.data, "train", seed=config.seed, train=True)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                   keep=config.train.keep_ckpts)
    restored = ckpt.restore(setup.abstract, train_iter, config)
    # Distillation: the frozen teacher, an extra train-step argument (not in the state).
    teacher = teacher_lib.load(config, setup) if objective.target_model == "teacher" else None
    if restored:
        start_step, state = restored
        log.info("resumed from step %d", start_step)
    else:
        start_step, state = 0, setup.init()
        if teacher is not None:
            state = teacher.init_student(setup, state)
    # Latent DiT: the frozen autoencoder's params, another train-step argument.
    ae_params = setup.autoencoder.load_params(mesh) if setup.autoencoder is not None else None
    step_args = ((teacher.params if teacher is not None else None, ae_params)
                 if ae_params is not None else () if teacher is None else (teacher.params,))
    is_vae = config.model.get("kind", "dit") == "vae"
    input_shape = autoencoder_lib.input_shape(config)
    if is_main:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(config.to_dict(), f, indent=2, default=str)

    train_step = distributed.CompiledOnce(steps.jit_train_step(setup, objective), "train_step")
    eval_step = distributed.CompiledOnce(
        jax.jit(functools.partial(steps.eval_step, setup, objective)), "eval_step")
    sample_fn = distributed.CompiledOnce(
        jax.jit(functools.partial(steps.sample, setup, objective),
                static_argnames=("steps", "guidance")), "sample")

    total = int(config.train.steps)
    step_flops, tokens_per_step = flops.train_cost(config, input_shape)
    # Simulated CPU devices share one host's cores: the peak is per host there, per chip elsewhere.
    on_cpu = jax.devices()[0].platform == "cpu"
    peak = metrics.measure_matmul_peak() * (jax.process_count() if on_cpu else jax.device_count())
    writer = metrics.MetricWriter(os.path.join(workdir, "tensorboard"))
    preempt = Preemption()

    def evaluate(step):
        it = pipeline.make_iterator(config.data, "validation", seed=config.seed, train=False)
        outs = []
        # A VAE is judged by its EMA params (what is exported and encodes latents).
        params = state.ema_params if is_vae else state.params
        for i, local in zip(range(config.train.eval_batches), it):
            with sharding.use(mesh, config.sharding_rules):
                outs.append(eval_step(params, global_batch(local, mesh),
                                      jax.random.key(1000 + i), ae_params))
        outs = to_host(outs)
        mean = {k: np.mean([o[k] for o in outs], axis=0) for k in outs[0]}
        if "loss_t" in mean:  # diffusion: fixed-t losses
            per_t = mean["loss_t"]
            values = {"eval/loss": float(per_t.mean())}
            values.update({f"eval/loss_t{t:.3f}": float(v) for t, v in
                           zip(np.asarray(objective.eval_times(len(per_t))), per_t)})
        else:  # the objective's own metrics (VAE: loss, l1, psnr, ssim)
            values = {f"eval/{k}": float(v) for k, v in mean.items()}
        writer.scalars(step, values)
        log.info(metrics.format_metrics(step, {k.replace("eval/", "eval_"): v
                                               for k, v in values.items() if "loss_t" not in k}))
        if is_main:
            with open(os.path.join(workdir, "eval.jsonl"), "a") as f:
                f.write(json.dumps({"step": step, **values}) + "\n")
        return values["eval/loss"]

    def write_samples(step):
        num = int(config.sample.num)
        if is_vae:  # reconstructions of the first validation clips, beside them
            noise, cond = jnp.asarray(validation_clips(config, num)), {}
        else:
            noise = jax.random.normal(jax.random.key(config.sample.seed), (num,) + input_shape)
            cond = jax.tree.map(jnp.asarray, sample_conditions(config, num))
        with sharding.use(mesh, config.sharding_rules):
            videos = np.asarray(to_host(sample_fn(
                state.ema_params, noise, cond, ae_params, steps=int(config.sample.steps),
                guidance=float(config.sample.guidance))))
        if is_main:
            base = os.path.join(workdir, "samples", f"step_{step:07d}")
            for ext in (".gif", ".mp4"):
                video_io.write_grid(base + ext, videos, fps=config.sample.fps)
            writer.image(step, "samples/first_frames", video_io.tile(
                video_io.to_uint8(videos[:, :1]))[0].repeat(3 // videos.shape[-1], -1))
            log.info("wrote samples to %s.{gif,mp4}", base)
        return videos

    history, eval_loss, skipped = [], None, 0
    pending: list = []  # (step, device metrics) fetched at log time, so the loop never blocks
    last_time, last_step = time.perf_counter(), start_step
    progress = _progress(config, start_step, total)
    step = start_step
    stopped_for = None
    while step < total:
        local = next(train_iter)
        with sharding.use(mesh, config.sharding_rules):
            state, step_metrics = train_step(state, global_batch(local, mesh), *step_args)
        step += 1
        pending.append((step, step_metrics))
        progress.update(1)

        if (step % config.train.log_every == 0 or step in (total, stop_at)
                or preempt.requested):
            fetched = to_host([m for _, m in pending])
            now = time.perf_counter()
            rate = (step - last_step) / max(now - last_time, 1e-9)
            last_time, last_step = now, step
            bad = [s for (s, _), m in zip(pending, fetched) if not m["finite"]]
            skipped += len(bad)
            pending = []
            last = fetched[-1]
            history.extend(float(m["loss"]) for m in fetched)
            values = {"train/loss": last["loss"], "train/grad_norm": last["grad_norm"],
                      "train/lr": last["lr"], "perf/steps_per_s": rate,
                      "perf/tokens_per_s": rate * tokens_per_step,
                      "perf/mfu": rate * step_flops / peak, "train/skipped_steps": skipped}
            writer.scalars(step, values)
            progress.set_postfix(loss=f"{float(last['loss']):.4f}", refresh=False)
            if not config.train.progress:
                log.info(metrics.format_metrics(step, values))
            if bad:
                log.warning("non-finite loss or gradient at steps %s: update%s skipped", bad,
                            "s" if len(bad) > 1 else "")
                if config.train.nonfinite == "stop":
                    stopped_for = f"non-finite loss at step {bad[0]}"
                    break

        if config.train.eval_every and step % config.train.eval_every == 0:
            eval_loss = evaluate(step)
        if config.train.sample_every and step % config.train.sample_every == 0 and step < total:
            write_samples(step)
        interrupt = preempt.requested or step == stop_at
        if (config.train.ckpt_every and step % config.train.ckpt_every == 0) or step == total \
                or interrupt:
            ckpt.save(step, state, train_iter, config, force=interrupt)
        if interrupt:
            stopped_for = "preemption signal" if preempt.requested else f"stop_at={stop_at}"
            break
    progress.close()

    if stopped_for is None:
        if not (config.train.eval_every and step % config.train.eval_every == 0):
            eval_loss = evaluate(step)
        if config.sample.num:
            write_samples(step)
        if is_vae:  # what a latent DiT normalises with (vidit/autoencoder.py)
            autoencoder_lib.write_stats(workdir, config, setup, state.ema_params, step)
    ckpt.close()
    writer.close()
    if stopped_for:
        log.warning("stopped at step %d: %s (last checkpoint: step %s)", step, stopped_for,
                    ckpt.latest_step())
    summary = {"step": step, "losses": history, "eval_loss": eval_loss, "skipped": skipped,
               "stopped_for": stopped_for}
    if stopped_for is None and is_main:  # what sweeps (vidit/sweep.py) read back
        tail = history[-max(1, len(history) // 10):]
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump({"step": step, "final_train_loss": float(np.mean(tail)) if tail else None,
                       "eval_loss": eval_loss, "params": setup.num_params(),
                       "train_flops": step_flops * total, "tokens": tokens_per_step * total,
                       "wall_s": time.perf_counter() - started, "skipped": skipped}, f, indent=2)
    return summary


def _progress(config, start, total):
    from tqdm import tqdm
    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True,
                disable=not config.train.progress or jax.process_index() != 0, file=sys.stderr)


# ---------------------------------------------------------------------------------------------
def main(argv):
    from absl import flags
    del argv
    cli.setup()
    config = flags.FLAGS.config
    summary = train(config, flags.FLAGS.workdir, stop_at=flags.FLAGS.stop_at)
    if summary["stopped_for"] and summary["stopped_for"].startswith("non-finite"):
        sys.exit(1)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Experiment config file (path[:variant]).",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
    flags.DEFINE_integer("stop_at", None, "Stop with a checkpoint at this step (the schedule "
                         "still spans train.steps); the same command later resumes the run.")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
