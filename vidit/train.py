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

from vidit import (autoencoder as autoencoder_lib, batches, checkpoint, checks, cli, diffusion,
                   distributed, flops, latent_stats, metrics, progress as progress_lib,
                   run as run_lib, sharding, steps, storage, teacher as teacher_lib,
                   text_encoders, video_io)
from vidit.errors import ConfigError
from vidit.train_state import Setup

log = logging.getLogger("vidit")


# ---------------------------------------------------------------------------------------------
def first_clips(config: Any, num: int, split: str) -> np.ndarray:
    """The first `num` clips of `split` (first frames), the inputs of a VAE's samples."""
    from data_pipelines import pipeline
    it = pipeline.make_iterator(config.data, split, seed=0, train=False,
                                process_index=0, process_count=1)
    clips = []
    for batch in it:  # with buckets: the first batch's shape only
        if clips and batch["video"].shape[1:] != clips[0].shape[1:]:
            continue
        clips.append(batch["video"])
        if sum(len(c) for c in clips) >= num:
            break
    return np.concatenate(clips)[:num]


def sample_batch(config: Any, num: int, split: str, tokenizer) -> dict:
    """What the periodic samples are conditioned on, as a batch: digits 0..9 in turn, or the
    first captions of `split` (tokens or cached embeddings; steps.sample conditions on it)."""
    if config.model.cond == "class":
        return {"label": np.arange(num, dtype=np.int32) % config.model.num_classes}
    if config.model.cond == "text":
        from data_pipelines import pipeline
        it = pipeline.make_iterator(config.data, split, seed=0, train=False,
                                    process_index=0, process_count=1, tokenizer=tokenizer)
        keys, rows = ("text", "text_mask", "text_embedding"), []
        for batch in it:  # as many batches as `num` captions take
            rows.append({k: batch[k] for k in keys if k in batch})
            if sum(len(r["text_mask"]) for r in rows) >= num:
                break
        return {k: np.concatenate([r[k] for r in rows])[:num] for k in rows[0]}
    return {}


class Preemption:
    """SIGTERM (preemption) or Ctrl-C: save a checkpoint at an agreed step and exit cleanly.

    One process: a signal sets a flag the loop reads after each step. Several processes: each
    must save at the same step, or the first collective of the save hangs. JAX's preemption
    service does that: a SIGTERM that reaches any process is spread by the coordination
    service, and `reached(step)` turns True on every process at the same step (Orbax and
    maxtext use the same sync point). Ctrl-C is turned into a SIGTERM of this process so that it
    goes the same way.
    """

    def __init__(self):
        self.requested = False
        self.multi_host = jax.process_count() > 1
        if self.multi_host:  # SIGTERM stays with JAX's notifier (installed by initialize)
            signal.signal(signal.SIGINT, lambda *_: os.kill(os.getpid(), signal.SIGTERM))
        else:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        del frame
        if self.requested:  # a second Ctrl-C means: stop now
            raise KeyboardInterrupt
        log.warning("signal %d received: saving a checkpoint and exiting", signum)
        self.requested = True

    def reached(self, step: int) -> bool:
        """Whether every process stops at `step` (call it after every step, on every process)."""
        if self.multi_host:
            from jax.experimental import multihost_utils
            if multihost_utils.reached_preemption_sync_point(step):
                self.requested = True
                log.warning("preemption: every process saves step %d and exits", step)
        return self.requested


def _cached_text(config: Any) -> dict:
    """What a dataset with cached caption embeddings (encode_text) says of its encoder: its
    identity, output width and empty-caption embedding. Refuses a dataset without them or
    written by another kind of encoder."""
    from data_pipelines import encode_text, pipeline
    if "text_embedding" not in pipeline.features(config.data):
        raise ConfigError(
            f"config.data.name={config.data.name!r} has no cached caption embeddings: write "
            "them with data_pipelines/encode_text.py, or set "
            "config.model.text_encoder.online=True to run the encoder in the train step")
    info = encode_text.read_dataset_info(config.data)
    kind = config.model.text_encoder.kind
    if info["encoder"]["kind"] != kind:
        raise ConfigError(f"config.data.name={config.data.name!r} holds embeddings of the "
                          f"{info['encoder']['kind']} encoder, not of "
                          f"config.model.text_encoder.kind='{kind}'")
    if int(info["text_len"]) != int(config.data.text_len):
        raise ConfigError(f"the cached embeddings have {info['text_len']} tokens; set "
                          f"config.data.text_len={info['text_len']} (and config.model.text_len)")
    return {"identity": info["encoder"], "width": int(info["width"]),
            "null": encode_text.read_null(config.data)}


# ---------------------------------------------------------------------------------------------
def train(config: Any, workdir: str, stop_at: int | None = None) -> dict:
    """Runs (or resumes) training; returns a summary of the run.

    `stop_at` ends this invocation early at that step with a checkpoint, as a preemption would;
    the learning-rate schedule still spans config.train.steps, so calling again resumes exactly.
    """
    from data_pipelines import pipeline  # imported late: it pulls in TFDS

    started = time.perf_counter()
    workdir = storage.path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)  # (a bucket has no folders: nothing to do there)
    mesh = sharding.make_mesh(config.mesh)
    objective = diffusion.make_objective(config.objective)
    is_vae = config.model.get("kind", "dit") == "vae"
    # Frozen networks the model input comes through (a latent DiT's VAE) or the targets come
    # from (a distillation's teacher): loaded once, passed to the jitted steps, not trained.
    ae_path = "" if is_vae else config.data.get("autoencoder", "")
    autoencoder = run_lib.load_autoencoder(ae_path, mesh) if ae_path else None
    text_encoder, cached_text = None, None
    if text_encoders.is_frozen(config.model):
        # Cached embeddings (data_pipelines/encode_text.py) carry the encoder's identity and
        # its empty caption, so the encoder itself is loaded only to run it online.
        cached_text = None if config.model.text_encoder.online else _cached_text(config)
        if cached_text is None:
            text_encoder = text_encoders.load(config.model, mesh, config.sharding_rules)
    tokenizer = text_encoders.tokenizer_for(config.model)
    checks.validate(config, mesh, objective, autoencoder,
                    text_width=(text_encoder.width if text_encoder is not None else
                                cached_text["width"] if cached_text else None))
    setup = Setup(config, mesh, autoencoder=autoencoder, text_encoder=text_encoder)
    is_main = jax.process_index() == 0
    log.info("mesh %s, %d parameters, %d devices", dict(mesh.shape), setup.num_params(),
             jax.device_count())

    train_iter = pipeline.make_iterator(config.data, "train", seed=config.seed, train=True,
                                        tokenizer=tokenizer)
    ckpt = checkpoint.Checkpointer(workdir / "checkpoints", keep=config.train.keep_ckpts)
    restored = ckpt.restore(setup.abstract, train_iter, config)
    teacher = (teacher_lib.load(config, setup) if objective.needs.target == "teacher"
               else None)
    if restored:
        start_step, state = restored
        log.info("resumed from step %d", start_step)
    else:
        start_step, state = 0, setup.init()
        if config.model.get("init_from"):  # pretrained weights (a diffusers Wan folder)
            from vidit import wan_weights
            state = setup.with_params(state, wan_weights.load_for(config.model,
                                                                  config.model.init_from))
            log.info("initialised from %s", config.model.init_from)
        if teacher is not None:
            state = teacher.init_student(setup, state)
    frozen = {}
    if autoencoder is not None:
        frozen["autoencoder"] = autoencoder.params
    if teacher is not None:
        frozen["teacher"] = teacher.params
    if text_encoder is not None:
        frozen["text_encoder"] = text_encoder.params
        frozen["null_text"] = text_encoder.null(int(config.data.text_len))
    elif cached_text is not None:
        frozen["null_text"] = jax.tree.map(jnp.asarray, cached_text["null"])
    input_shape = autoencoder_lib.input_shape(config, autoencoder)
    if is_main:
        storage.write_atomic(workdir / "config.json",
                             json.dumps(config.to_dict(), indent=2, default=str))
        identity = (text_encoder.identity if text_encoder is not None else
                    cached_text["identity"] if cached_text else None)
        if identity:  # which encoder the samplers of this run must use
            storage.write_atomic(workdir / text_encoders.IDENTITY_FILE,
                                 json.dumps(identity, indent=2))

    train_step = distributed.CompiledOnce(steps.jit_train_step(setup, objective), "train_step")
    eval_step = distributed.CompiledOnce(
        jax.jit(functools.partial(steps.eval_step, setup, objective)), "eval_step")
    sample_fn = distributed.CompiledOnce(
        jax.jit(functools.partial(steps.sample, setup, objective),
                static_argnames=("steps", "guidance")), "sample")

    total = int(config.train.steps)
    several = len(checks.buckets(config)) > 1
    costs = {}  # bucket name -> (model FLOPs, tokens, global batch) of one step

    def bucket_of(local: dict) -> str:
        """The batch's bucket ('8x32x48', its clip or latent shape), costed on first sight."""
        x = local["latent"] if "latent" in local else local["video"]
        name = "x".join(str(n) for n in x.shape[1:4])
        if name not in costs:
            shape = (x.shape[1:] if "latent" in local or autoencoder is None else
                     autoencoder_lib.input_shape(config, autoencoder, x.shape[1:4]))
            batch = x.shape[0] * jax.process_count()
            costs[name] = flops.train_cost(config, shape, batch) + (batch,)
        return name
    # Simulated CPU devices share one host's cores: the peak is per host there, per chip elsewhere.
    on_cpu = jax.devices()[0].platform == "cpu"
    peak = metrics.measure_matmul_peak() * (jax.process_count() if on_cpu else jax.device_count())
    writer = metrics.MetricWriter(workdir / "tensorboard")
    step_times = metrics.StepTimes()  # per bucket, off the loop's thread
    preempt = Preemption()

    has_validation = "validation" in pipeline.splits(config.data)
    if not has_validation:
        log.warning("%s has no validation split: no eval loss, and samples take their "
                    "conditions from the train split", config.data.name)
    sample_split = "validation" if has_validation else "train"

    def evaluate(step):
        if not has_validation:
            return None
        it = pipeline.make_iterator(config.data, "validation", seed=config.seed, train=False,
                                    tokenizer=tokenizer)
        outs = []
        # A VAE is judged by its EMA params (what is exported and encodes latents).
        params = state.ema_params if is_vae else state.params
        for i, local in zip(range(config.train.eval_batches), it):
            with sharding.use(mesh, config.sharding_rules):
                outs.append(eval_step(params, batches.global_batch(local, mesh),
                                      jax.random.key(1000 + i), frozen))
        if not outs:
            log.warning("no whole validation batch (of any bucket): no eval loss")
            return None
        outs = batches.to_host(outs)
        values = {f"eval/{k}": float(np.mean([o[k] for o in outs])) for k in outs[0]}
        writer.scalars(step, values)
        log.info(metrics.format_metrics(step, {k.replace("eval/", "eval_"): v
                                               for k, v in values.items() if "loss_t" not in k}))
        if is_main:
            storage.append_line(workdir / "eval.jsonl", json.dumps({"step": step, **values}))
        return values["eval/loss"]

    def write_samples(step):
        num = int(config.sample.num)
        if is_vae:  # reconstructions of the first validation clips, beside them
            noise, cond = jnp.asarray(first_clips(config, num, sample_split)), {}
        else:
            noise = jax.random.normal(jax.random.key(config.sample.seed), (num,) + input_shape)
            cond = jax.tree.map(jnp.asarray, sample_batch(config, num, sample_split, tokenizer))
        with sharding.use(mesh, config.sharding_rules):
            videos = np.asarray(batches.to_host(sample_fn(
                state.ema_params, noise, cond, frozen, steps=int(config.sample.steps),
                guidance=float(config.sample.guidance))))
        if is_main:
            base = workdir / "samples" / f"step_{step:07d}"
            for ext in (".gif", ".mp4"):
                video_io.write_grid(f"{base}{ext}", videos, fps=config.sample.fps)
            writer.image(step, "samples/first_frames", video_io.tile(
                video_io.to_uint8(videos[:, :1]))[0].repeat(3 // videos.shape[-1], -1))
            log.info("wrote samples to %s.{gif,mp4}", base)
        return videos

    history, eval_loss, skipped, nonfinite_run = [], None, 0, 0
    bad_examples, examples = 0, 0
    pending: list = []  # (step, bucket, device metrics) fetched at log time: no blocking
    done_flops = done_tokens = 0.0
    last_time, last_step = time.perf_counter(), start_step
    progress = _progress(config, start_step, total)
    step = start_step
    stopped_for, failed = None, False
    try:
        while step < total:
            local = next(train_iter)
            bucket = bucket_of(local)
            with sharding.use(mesh, config.sharding_rules):
                state, step_metrics = train_step(state, batches.global_batch(local, mesh),
                                                 frozen)
            step_times.add(bucket, step_metrics["loss"])
            step += 1
            pending.append((step, bucket, step_metrics))
            progress.update(1)
            interrupt = preempt.reached(step) or step == stop_at

            if step % config.train.log_every == 0 or step == total or interrupt:
                fetched = batches.to_host([m for _, _, m in pending])
                now = time.perf_counter()
                elapsed = max(now - last_time, 1e-9)
                rate = (step - last_step) / elapsed
                last_time, last_step = now, step
                interval_flops = sum(costs[b][0] for _, b, _ in pending)
                interval_tokens = sum(costs[b][1] for _, b, _ in pending)
                done_flops += interval_flops
                done_tokens += interval_tokens
                bad = [s for (s, _, _), m in zip(pending, fetched) if not m["finite"]]
                for m in fetched:  # the current run of consecutive skipped updates
                    nonfinite_run = 0 if m["finite"] else nonfinite_run + 1
                skipped += len(bad)
                bad_examples += int(sum(m["bad_examples"] for m in fetched))
                examples += sum(costs[b][2] for _, b, _ in pending)
                pending = []
                last = fetched[-1]
                history.extend(float(m["loss"]) for m in fetched)
                values = {"train/loss": last["loss"], "train/grad_norm": last["grad_norm"],
                          "train/lr": last["lr"], "perf/steps_per_s": rate,
                          "perf/tokens_per_s": interval_tokens / elapsed,
                          "perf/mfu": interval_flops / elapsed / peak,
                          "train/skipped_steps": skipped, "data/bad_examples": bad_examples}
                times_by_bucket = step_times.take()
                if several:  # each bucket's own step time (device time: compiles excluded)
                    for name, times in sorted(times_by_bucket.items()):
                        seconds = float(np.median(times))
                        values[f"perf/{name}/step_s"] = seconds
                        values[f"perf/{name}/tokens_per_s"] = costs[name][1] / seconds
                        values[f"perf/{name}/mfu"] = costs[name][0] / seconds / peak
                writer.scalars(step, values)
                postfix = {"loss": f"{float(last['loss']):.4f}"}
                if several:  # per bucket: step time and MFU
                    postfix["buckets"] = " ".join(
                        f"{name}:{1e3 * values[f'perf/{name}/step_s']:.0f}ms/"
                        f"{values[f'perf/{name}/mfu']:.0%}" for name in sorted(times_by_bucket))
                progress.set_postfix(**postfix, refresh=False)
                if not config.train.progress:
                    log.info(metrics.format_metrics(step, values))
                if bad:
                    log.warning("non-finite loss or gradient at steps %s: update%s skipped", bad,
                                "s" if len(bad) > 1 else "")
                stopped_for = _stop_reason(config, bad, nonfinite_run, bad_examples, examples)
                if stopped_for:
                    failed = True
                    break

            if config.train.eval_every and step % config.train.eval_every == 0:
                eval_loss = evaluate(step)
            if (config.train.sample_every and step % config.train.sample_every == 0
                    and step < total):
                write_samples(step)
            if (config.train.ckpt_every and step % config.train.ckpt_every == 0) or \
                    step == total or interrupt:
                ckpt.save(step, state, train_iter, config, force=interrupt)
            if interrupt:
                stopped_for = "preemption signal" if preempt.requested else f"stop_at={stop_at}"
                break

        if stopped_for is None:
            if not (config.train.eval_every and step % config.train.eval_every == 0):
                eval_loss = evaluate(step)
            if config.sample.num:
                write_samples(step)
            if is_vae:  # what a latent DiT normalises with (vidit/latent_stats.py)
                latent_stats.write(workdir, config,
                                   lambda p, x: setup.model(p).vae.encode(x)[0],
                                   state.ema_params, mesh, step)
    finally:  # an error anywhere still finishes the saves in flight before it is raised
        progress.close()
        step_times.close()
        ckpt.close()
        writer.close()
    if stopped_for:
        log.warning("stopped at step %d: %s (last checkpoint: step %s)", step, stopped_for,
                    ckpt.latest_step())
    summary = {"step": step, "losses": history, "eval_loss": eval_loss, "skipped": skipped,
               "stopped_for": stopped_for, "failed": failed, "bad_examples": bad_examples}
    if stopped_for is None and is_main:  # what sweeps (vidit/sweep.py) read back
        tail = history[-max(1, len(history) // 10):]
        # Per step as measured in this invocation (buckets differ), else the config's shape.
        steps_done = max(step - start_step, 1)
        step_flops, tokens_per_step = ((done_flops / steps_done, done_tokens / steps_done)
                                       if several else flops.train_cost(config, input_shape))
        storage.write_atomic(workdir / "summary.json", json.dumps({
            "step": step, "final_train_loss": float(np.mean(tail)) if tail else None,
            "eval_loss": eval_loss, "params": setup.num_params(),
            "train_flops": step_flops * total, "tokens": tokens_per_step * total,
            "wall_s": time.perf_counter() - started, "skipped": skipped,
            "bad_examples": bad_examples, "batch_size": config.data.batch_size,
            "lr": config.optim.lr}, indent=2))
    return summary


def _stop_reason(config: Any, bad_steps: list, nonfinite_run: int, bad_examples: int,
                 examples: int) -> str | None:
    """Why the run must stop now (the last good checkpoint stays the newest), or None."""
    if bad_steps and config.train.nonfinite == "stop":
        return f"non-finite loss at step {bad_steps[0]} (config.train.nonfinite='stop')"
    limit = int(config.train.max_skipped_steps)
    if limit and nonfinite_run >= limit:
        return (f"non-finite loss or gradient at {nonfinite_run} consecutive steps "
                f"(config.train.max_skipped_steps={limit}): lower config.optim.lr or look for "
                "bad data")
    fraction = float(config.data.max_bad_fraction)
    # Judged once enough examples were read for one bad one to be within the fraction.
    if bad_examples and examples * fraction >= 1 and bad_examples > fraction * examples:
        return (f"{bad_examples} of {examples} examples could not be read or did not fit "
                f"(more than config.data.max_bad_fraction={fraction}); the warnings above "
                "name them")
    return None


def _progress(config, start, total):
    return progress_lib.bar(total, initial=start, desc="train", unit="step",
                            enabled=config.train.progress and jax.process_index() == 0,
                            every_s=float(config.train.get("progress_every_s", 30.0)))


# ---------------------------------------------------------------------------------------------
def main(argv):
    from absl import flags
    del argv
    cli.setup()
    config = flags.FLAGS.config
    try:
        summary = train(config, flags.FLAGS.workdir, stop_at=flags.FLAGS.stop_at)
    except Exception as e:  # pylint: disable=broad-except
        text = str(e).lower()
        if jax.process_count() > 1 and any(w in text for w in (
                "heartbeat", "connection reset", "gloo", "unavailable", "barrier")):
            log.error("process %d of %d: a collective with the other processes failed; another "
                      "process of this job has most likely died or been killed (see its log)",
                      jax.process_index(), jax.process_count())
        raise
    if summary["failed"]:
        sys.exit(f"error: the run stopped at step {summary['step']}: {summary['stopped_for']}")


def define_flags():
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Experiment config file (path[:variant]).",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
    flags.DEFINE_integer("stop_at", None, "Stop with a checkpoint at this step (the schedule "
                         "still spans train.steps); the same command later resumes the run.")
    flags.mark_flags_as_required(["config", "workdir"])


def entry_point():
    cli.run(main, define_flags)


if __name__ == "__main__":
    entry_point()
