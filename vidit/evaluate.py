"""Sample-quality evaluation of a trained run (or export) at several sampling-step counts.

    python -m vidit.evaluate --workdir runs/digits --steps 50 --num 200
    python -m vidit.evaluate --workdir runs/meanflow --steps 1,2,4,50 --num 500
    python -m vidit.evaluate --workdir runs/text_minilm --num 500   # seen and paraphrased captions
    python -m vidit.evaluate --config configs/quickstart.py --classifier_only   # cache the scorer

For each step count (and for a text-conditional moving-digits run, for captions in the
dataset's own phrasing and for paraphrases never seen in training): class accuracy of the samples
under the project's frame classifier (trained on the same data, cached), overall and by class
with the most frequent mistakes (label drawn as another class), frame agreement (the
share of frames classified as their sample's class: does a digit keep its identity over time),
Frechet distance to validation clips in that classifier's feature space (per-frame features
averaged over time, and a temporal variant that adds the mean frame-to-frame feature change),
precision/recall (k-NN manifolds), and samples/s. Writes
`eval.json` and `eval.md` to --out (default: <workdir>/eval).
"""
from __future__ import annotations

import functools
import itertools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from vidit import (autoencoder, cli, diffusion, run as run_lib, sharding, steps, storage,
                   text_encoders)
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


def classifier_for(data_cfg,
                   steps: int = classifier.DEFAULT_STEPS) -> classifier.FrameClassifier:
    """The frame classifier for this pixel data (trained once per data layout, then cached).
    Fewer `steps` train a quicker, slightly weaker one, cached apart (the quickstart's check)."""
    d = data_cfg
    key = f"{d.name}_{d.height}x{d.width}x{d.channels}_f{d.num_frames}"
    if steps != classifier.DEFAULT_STEPS:
        key += f"_steps{steps}"
    # A dataset built with other builder arguments (a smoke run's 64 clips) gets its own
    # classifier; the caption style changes no frame, so it shares one.
    kwargs = {k: v for k, v in dict(d.get("builder_kwargs") or {}).items() if k != "captions"}
    if kwargs:
        key += "_" + "_".join(f"{k}{v}" for k, v in sorted(kwargs.items()))
    cache = os.path.join(os.environ.get("VIDIT_CACHE", os.path.expanduser("~/.cache/vidit")),
                         "classifiers", key)
    return classifier.get_or_train_classifier(cache, d, steps=steps)


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


def generate(run: run_lib.Run, cond, num_steps: int, guidance: float,
             batch: int, *, seed: int = 0) -> tuple[np.ndarray, float]:
    """Samples of a loaded run for `cond`: class labels [N], or a batch of conditioning fields
    (e.g. caption tokens 'text' and 'text_mask', [N, L]); returns (videos, samples per second).
    A latent DiT's samples are decoded by its autoencoder."""
    if not isinstance(cond, dict):
        cond = {"label": np.asarray(cond, np.int32)}
    num = len(next(iter(cond.values())))
    config, setup, params, frozen = run.config, run.setup, run.params, run.frozen()
    objective = diffusion.make_objective(config.objective)
    fn = jax.jit(functools.partial(steps.sample, setup, objective),
                 static_argnames=("steps", "guidance"))
    shape = autoencoder.input_shape(config, run.autoencoder)  # a latent DiT samples latents
    out, elapsed, compiled = [], 0.0, None
    for i in range(0, num, batch):
        n = min(batch, num - i)
        # padded to one compiled shape for every chunk
        chunk = {k: jnp.asarray(np.pad(v[i:i + n], [(0, batch - n)] + [(0, 0)] * (v.ndim - 1)))
                 for k, v in cond.items()}
        noise = chunk_noise(seed, i, batch, shape)
        with sharding.use(setup.mesh, config.sharding_rules):
            if compiled is None:  # compile outside the timing
                compiled = fn.lower(params, noise, chunk, frozen, steps=num_steps,
                                    guidance=guidance).compile()
            start = time.perf_counter()
            videos = jax.block_until_ready(compiled(params, noise, chunk, frozen))
            elapsed += time.perf_counter() - start
        out.append(np.asarray(videos)[:n])
    return np.concatenate(out), num / elapsed


def prompt_sets(config, labels: np.ndarray) -> dict:
    """What samples are conditioned on, by name: the labels themselves for a class-conditional
    run; for a text run on moving digits, captions of each label in the dataset's own phrasing
    ('seen') and in phrasings no training caption has ('paraphrase',
    data_pipelines/moving_digits.py), as tokens of the run's text encoder."""
    if config.model.cond == "class":
        return {"labels": ({"label": labels.astype(np.int32)}, None)}
    if config.model.cond != "text" or config.data.name != "moving_digits":
        raise ValueError("evaluate scores class-conditional runs, and text-conditional runs on "
                         f"moving_digits captions (this run: cond={config.model.cond!r}, "
                         f"data {config.data.name!r})")
    from data_pipelines import moving_digits
    tokenizer = text_encoders.tokenizer_for(config.model)
    style = dict(config.data.builder_kwargs or {}).get("captions", "plain")
    out = {}
    for name, captions in (("seen", style), ("paraphrase", "paraphrase")):
        texts = moving_digits.captions_for(labels, captions, seed=1)
        ids, mask = zip(*(tokenizer(t, config.model.text_len) for t in texts))
        out[name] = ({"text": np.stack(ids), "text_mask": np.stack(mask)}, texts[:3])
    return out


def evaluate(path: str, *, step_counts=None, num: int, guidance: float | None = None,
             batch: int = 50, checkpoint_step: int | None = None,
             classifier_steps: int = classifier.DEFAULT_STEPS) -> dict:
    run = run_lib.load(path, step=checkpoint_step)
    config = run.config
    labels = np.arange(num) % config.model.num_classes
    conds = prompt_sets(config, labels)
    guidance = float(config.sample.guidance if guidance is None else guidance)
    step_counts = step_counts or [int(config.sample.steps)]
    data_cfg = pixel_data(config, run.autoencoder)
    clf = classifier_for(data_cfg, classifier_steps)
    real, _ = real_clips(data_cfg, num)
    real_frames = classifier.features(clf, real)[1]
    real_mean, real_temporal = real_frames.mean(axis=1), temporal_features(real_frames)
    rows = []
    for n_steps, (cond_name, (cond, examples)) in itertools.product(step_counts, conds.items()):
        videos, rate = generate(run, cond, n_steps, guidance, min(batch, num))
        frames, logits = classifier.per_frame(clf, videos)  # [N, T, F], [N, T, K]
        pred = logits.mean(axis=1).argmax(axis=-1)  # the video's class: mean frame logits
        precision, recall = metrics.precision_recall(real_mean, frames.mean(axis=1))
        rows.append({
            "steps": n_steps,
            "condition": cond_name,
            **({"example_prompts": examples} if examples else {}),
            "class_accuracy": metrics.class_accuracy(pred, labels),
            # does a sample keep its digit from frame to frame?
            "frame_agreement": metrics.frame_agreement(logits.argmax(axis=-1), pred),
            # which classes fail, and as what: [(label, predicted, count)]
            "class_accuracy_by_class": metrics.per_class_accuracy(
                pred, labels, config.model.num_classes),
            "top_confusions": metrics.top_confusions(pred, labels),
            "frechet_distance": metrics.frechet_distance(real_mean, frames.mean(axis=1)),
            "frechet_distance_temporal": metrics.frechet_distance(real_temporal,
                                                                  temporal_features(frames)),
            "precision": precision,
            "recall": recall,
            "samples_per_s": rate,
        })
        print(json.dumps(rows[-1]), flush=True)
    return {"workdir": str(path), "checkpoint_step": run.step, "num": num, "guidance": guidance,
            "objective": config.objective.name, "classifier_steps": classifier_steps,
            "results": rows}


def markdown(report: dict) -> str:
    lines = [f"Evaluation of `{report['workdir']}` (step {report['checkpoint_step']}, "
             f"{report['num']} samples, guidance {report['guidance']})", "",
             "| steps | conditioned on | class acc. | frame agreement | FD | FD temporal "
             "| precision | recall | samples/s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        lines.append(f"| {r['steps']} | {r.get('condition', 'labels')} | {r['class_accuracy']:.3f}"
                     f" | {r['frame_agreement']:.3f} | {r['frechet_distance']:.2f} | "
                     f"{r['frechet_distance_temporal']:.2f} | {r['precision']:.3f} | "
                     f"{r['recall']:.3f} | {r['samples_per_s']:.2f} |")
    for r in report["results"]:
        if r.get("class_accuracy_by_class"):
            by_class = ", ".join(f"{k}: {a:.0%}" for k, a in enumerate(r["class_accuracy_by_class"])
                                 if a is not None)
            confusions = ", ".join(f"{a} as {b} ({n})" for a, b, n in r.get("top_confusions", []))
            lines += ["", f"{r['steps']} steps, {r.get('condition', 'labels')}: accuracy by class "
                      f"{by_class}; most frequent mistakes: {confusions or 'none'}"]
    return "\n".join(lines) + "\n"


def prepare_classifier(config, classifier_steps: int) -> None:
    """Train and cache the scoring classifier for a pixel-space config's data, before or while
    its model trains (scripts/quickstart.sh runs this at low priority beside the training)."""
    if run_lib.autoencoder_path(config):
        raise ValueError("--classifier_only takes a pixel-space config; a latent DiT's scorer is "
                         "its VAE's data's: evaluate the trained run with --workdir")
    classifier_for(config.data, classifier_steps)


def main(argv):
    del argv
    from absl import flags
    f = flags.FLAGS
    cli.setup()
    if f.classifier_only:
        if f.config is None:
            sys.exit("error: --classifier_only needs --config (the run's config file)")
        try:
            prepare_classifier(f.config, f.classifier_steps)
        except (LoadError, ValueError) as e:
            sys.exit(f"error: {e}")
        return
    if f.workdir is None:
        sys.exit("error: --workdir is required (the run or export to evaluate)")
    if f.config is not None:
        sys.exit("error: --config is for --classifier_only; an evaluation reads the run's own "
                 "config from --workdir")
    try:
        report = evaluate(f.workdir, step_counts=[int(s) for s in f.steps.split(",")]
                          if f.steps else None,
                          num=f.num, guidance=f.guidance, batch=f.batch,
                          checkpoint_step=f.checkpoint_step,
                          classifier_steps=f.classifier_steps)
    except (LoadError, CheckpointError, ValueError) as e:
        sys.exit(f"error: {e}")
    out = storage.path(f.out or storage.path(f.workdir) / "eval")
    storage.write_atomic(out / "eval.json", json.dumps(report, indent=2, default=str))
    storage.write_atomic(out / "eval.md", markdown(report))
    print(markdown(report))


def define_flags():
    from absl import flags
    from ml_collections import config_flags
    flags.DEFINE_string("workdir", None, "Training workdir or export folder.")
    flags.DEFINE_string("steps", None, "Comma-separated sampling step counts (default: the "
                        "config's sample.steps).")
    flags.DEFINE_integer("num", 200, "Samples per step count (labels cycle over the classes).")
    flags.DEFINE_float("guidance", None, "Guidance scale (default: the config's).")
    flags.DEFINE_integer("batch", 50, "Sampling batch size.")
    flags.DEFINE_integer("checkpoint_step", None, "Checkpoint to score (default: the newest).")
    flags.DEFINE_string("out", None, "Output folder (default: <workdir>/eval).")
    flags.DEFINE_integer("classifier_steps", classifier.DEFAULT_STEPS, "Training steps of the "
                         "scoring frame classifier; fewer give a quick check (cached apart)")
    flags.DEFINE_bool("classifier_only", False, "Only train and cache the scoring classifier for "
                      "--config's data (with --classifier_steps), then exit; needs no run.")
    config_flags.DEFINE_config_file("config", None, "With --classifier_only: a config file "
                                    "(path[:variant]) whose data the classifier is for.")


def entry_point():
    cli.run(main, define_flags)


if __name__ == "__main__":
    entry_point()
