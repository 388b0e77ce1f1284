"""Sample-quality evaluation of a trained run (or export) at several sampling-step counts.

    python -m vidit.evaluate --workdir runs/digits --steps 50 --num 200
    python -m vidit.evaluate --workdir runs/meanflow --steps 1,2,4,50 --num 500

For each step count: class accuracy of the samples under the project's frame classifier (trained
on the same data, cached), Frechet distance to validation clips in that classifier's feature
space (per-frame features averaged over time, and a temporal variant that adds the mean
frame-to-frame feature change), precision/recall (k-NN manifolds), and samples/s. Writes
`eval.json` and `eval.md` to --out (default: <workdir>/eval).
"""
from __future__ import annotations

import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from vidit import autoencoder, cli, diffusion, run as run_lib, sharding, steps, storage
from vidit.errors import CheckpointError, LoadError
from vidit.eval import classifier, metrics


def pixel_data(config, ae=None):
    """The pixel clips a run's samples are compared with: its data, or for a latent DiT the
    data its VAE `ae` was trained on (cached latents hold no pixels to compare with)."""
    if ae is None:
        return config.data
    d = ae.config.data.copy_and_resolve_references()
    d.num_frames = config.data.num_frames  # the clip length the DiT's latents decode to
    return d


def classifier_for(data_cfg) -> classifier.FrameClassifier:
    """The frame classifier for this pixel data (trained once per data layout, then cached)."""
    d = data_cfg
    key = f"{d.name}_{d.height}x{d.width}x{d.channels}_f{d.num_frames}"
    cache = os.path.join(os.environ.get("VIDIT_CACHE", os.path.expanduser("~/.cache/vidit")),
                         "classifiers", key)
    return classifier.get_or_train_classifier(cache, d)


def real_clips(data_cfg, num: int) -> tuple[np.ndarray, np.ndarray]:
    from data_pipelines import pipeline
    it = pipeline.make_iterator(data_cfg, "validation", seed=0, train=False,
                                process_index=0, process_count=1)
    videos, labels = [], []
    for batch in it:
        videos.append(batch["video"])
        labels.append(batch["label"])
        if sum(map(len, labels)) >= num:
            break
    return np.concatenate(videos)[:num], np.concatenate(labels)[:num]


def temporal_features(per_frame: np.ndarray) -> np.ndarray:
    """[N, T, F] -> [N, 2F]: appearance (mean over time) and motion (mean frame-to-frame change)."""
    motion = np.diff(per_frame, axis=1).mean(axis=1) if per_frame.shape[1] > 1 else 0 * per_frame[:, 0]
    return np.concatenate([per_frame.mean(axis=1), motion], axis=1)


def chunk_noise(seed: int, start: int, batch: int, shape) -> jax.Array:
    """The noise of the chunk of samples starting at `start`: the same for every step count, so
    samples at different step counts are paired."""
    return jax.random.normal(jax.random.fold_in(jax.random.key(seed), start), (batch,) + shape)


def generate(run: run_lib.Run, labels: np.ndarray, num_steps: int, guidance: float,
             batch: int, *, seed: int = 0) -> tuple[np.ndarray, float]:
    """Class-conditional samples of a loaded run for `labels`; returns (videos, samples per
    second). A latent DiT's samples are decoded by its autoencoder."""
    config, setup, params, frozen = run.config, run.setup, run.params, run.frozen()
    objective = diffusion.make_objective(config.objective)
    fn = jax.jit(functools.partial(steps.sample, setup, objective),
                 static_argnames=("steps", "guidance"))
    shape = autoencoder.input_shape(config, run.autoencoder)  # a latent DiT samples latents
    out, elapsed, compiled = [], 0.0, None
    for i in range(0, len(labels), batch):
        chunk = labels[i:i + batch]
        n = len(chunk)
        chunk = np.pad(chunk, (0, batch - n))  # one compiled shape for every chunk
        noise = chunk_noise(seed, i, batch, shape)
        cond = {"label": jnp.asarray(chunk, jnp.int32)}
        with sharding.use(setup.mesh, config.sharding_rules):
            if compiled is None:  # compile outside the timing
                compiled = fn.lower(params, noise, cond, frozen, steps=num_steps,
                                    guidance=guidance).compile()
            start = time.perf_counter()
            videos = jax.block_until_ready(compiled(params, noise, cond, frozen))
            elapsed += time.perf_counter() - start
        out.append(np.asarray(videos)[:n])
    return np.concatenate(out), len(labels) / elapsed


def evaluate(path: str, *, step_counts, num: int, guidance: float | None = None,
             batch: int = 50, checkpoint_step: int | None = None) -> dict:
    run = run_lib.load(path, step=checkpoint_step)
    config = run.config
    if config.model.cond != "class":
        raise ValueError("evaluate scores class-conditional models (config.model.cond='class')")
    guidance = float(config.sample.guidance if guidance is None else guidance)
    data_cfg = pixel_data(config, run.autoencoder)
    clf = classifier_for(data_cfg)
    real, _ = real_clips(data_cfg, num)
    real_frames = classifier.features(clf, real)[1]
    real_mean, real_temporal = real_frames.mean(axis=1), temporal_features(real_frames)
    labels = np.arange(num) % config.model.num_classes
    rows = []
    for n_steps in step_counts:
        videos, rate = generate(run, labels, n_steps, guidance, min(batch, num))
        pred, _ = classifier.classify_videos(clf, videos)
        frames = classifier.features(clf, videos)[1]
        precision, recall = metrics.precision_recall(real_mean, frames.mean(axis=1))
        rows.append({
            "steps": n_steps,
            "class_accuracy": metrics.class_accuracy(pred, labels),
            "frechet_distance": metrics.frechet_distance(real_mean, frames.mean(axis=1)),
            "frechet_distance_temporal": metrics.frechet_distance(real_temporal,
                                                                  temporal_features(frames)),
            "precision": precision,
            "recall": recall,
            "samples_per_s": rate,
        })
        print(json.dumps(rows[-1]), flush=True)
    return {"workdir": str(path), "checkpoint_step": run.step, "num": num, "guidance": guidance,
            "objective": config.objective.name, "results": rows}


def markdown(report: dict) -> str:
    lines = [f"Evaluation of `{report['workdir']}` (step {report['checkpoint_step']}, "
             f"{report['num']} samples, guidance {report['guidance']})", "",
             "| steps | class acc. | FD | FD temporal | precision | recall | samples/s |",
             "|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        lines.append(f"| {r['steps']} | {r['class_accuracy']:.3f} | {r['frechet_distance']:.2f} | "
                     f"{r['frechet_distance_temporal']:.2f} | {r['precision']:.3f} | "
                     f"{r['recall']:.3f} | {r['samples_per_s']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    from absl import flags
    f = flags.FLAGS
    cli.setup()
    try:
        report = evaluate(f.workdir, step_counts=[int(s) for s in f.steps.split(",")],
                          num=f.num, guidance=f.guidance, batch=f.batch,
                          checkpoint_step=f.checkpoint_step)
    except (LoadError, CheckpointError, ValueError) as e:
        sys.exit(f"error: {e}")
    out = storage.path(f.out or storage.path(f.workdir) / "eval")
    storage.write_atomic(out / "eval.json", json.dumps(report, indent=2, default=str))
    storage.write_atomic(out / "eval.md", markdown(report))
    print(markdown(report))


def define_flags():
    from absl import flags
    flags.DEFINE_string("workdir", None, "Training workdir or export folder.")
    flags.DEFINE_string("steps", "50", "Comma-separated sampling step counts.")
    flags.DEFINE_integer("num", 200, "Samples per step count (labels cycle over the classes).")
    flags.DEFINE_float("guidance", None, "Guidance scale (default: the config's).")
    flags.DEFINE_integer("batch", 50, "Sampling batch size.")
    flags.DEFINE_integer("checkpoint_step", None, "Checkpoint to score (default: the newest).")
    flags.DEFINE_string("out", None, "Output folder (default: <workdir>/eval).")
    flags.mark_flags_as_required(["workdir"])


def entry_point():
    cli.run(main, define_flags)


if __name__ == "__main__":
    entry_point()
