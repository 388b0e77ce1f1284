"""Latent statistics of a VAE run: the per-channel mean and std a latent DiT normalises with.

A VAE run (config.model.kind = 'vae') measures them over training clips when it finishes and
writes WORKDIR/latent_stats.json; `vidit.export` copies the file; a latent DiT's autoencoder
(vidit/autoencoder.py) reads it, and the DiT sees z = (posterior_mean - mean) / std.
"""
from __future__ import annotations

import json
import logging
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from vidit import batches, sharding, storage
from vidit.errors import LoadError

log = logging.getLogger("vidit")

STATS_FILE = "latent_stats.json"


def channel_stats(means: Iterable, eps: float = 1e-8):
    """Per-channel (mean[C], std[C]) over every element of an iterable of latent arrays
    [..., C] (e.g. posterior means of many batches), accumulated in float64."""
    count, mean, m2 = 0, None, None  # Chan et al.'s pairwise merge of (count, mean, M2)
    for z in means:
        z = np.asarray(jax.device_get(z), dtype=np.float64)
        flat = z.reshape(-1, z.shape[-1])
        n_b = flat.shape[0]
        if n_b == 0:
            continue
        mean_b = flat.mean(0)
        m2_b = np.square(flat - mean_b).sum(0)
        if mean is None:
            count, mean, m2 = n_b, mean_b, m2_b
            continue
        delta = mean_b - mean
        total = count + n_b
        mean = mean + delta * (n_b / total)
        m2 = m2 + m2_b + np.square(delta) * (count * n_b / total)
        count = total
    if not count:
        raise ValueError("channel_stats got no latents")
    var = m2 / count
    return jnp.asarray(mean, jnp.float32), jnp.asarray(np.sqrt(var + eps), jnp.float32)


def normalize(z, stats):
    mean, std = stats
    return (z - mean) / std


def denormalize(z, stats):
    mean, std = stats
    return z * std + mean


def read(path) -> dict:
    """The statistics a VAE run (workdir or export) holds; LoadError if it has none."""
    file = storage.path(path) / STATS_FILE
    if not file.exists():
        raise LoadError(
            f"{path} has no {STATS_FILE}: it is written when a VAE run (model.kind='vae') "
            "finishes; run the same vidit.train command again to finish it")
    return json.loads(file.read_text())


def measure(config: Any, encode_fn: Callable, params: Any, mesh, num_batches: int) -> dict:
    """Per-channel mean/std of posterior means over up to num_batches training batches (first
    frames of each clip, no augmentation). encode_fn(params, video) -> posterior means."""
    from data_pipelines import pipeline
    it = pipeline.make_iterator(config.data, "train", seed=config.seed, train=False)
    fn = jax.jit(encode_fn)
    means = []
    with sharding.use(mesh, config.sharding_rules):
        for _, local in zip(range(num_batches), it):
            batch = batches.global_batch({"video": local["video"]}, mesh)
            means.append(batches.to_host(fn(params, batch["video"])))
    mean, std = channel_stats(means)
    count = int(sum(np.prod(m.shape[:-1]) for m in means))
    clips = int(sum(m.shape[0] for m in means))
    return {"mean": [float(v) for v in np.asarray(mean)], "std": [float(v) for v in np.asarray(std)],
            "num_clips": clips, "num_latents": count, "split": "train",
            "note": "per-channel statistics of posterior means; the DiT sees (z - mean) / std"}


def write(workdir, config: Any, encode_fn: Callable, params: Any, mesh, step: int) -> dict:
    """Measures the statistics of a finished VAE run and writes WORKDIR/latent_stats.json
    (process 0 writes; every process computes). encode_fn(params, video) -> posterior means."""
    num = int(config.train.get("latent_stats_batches", 32))
    stats = measure(config, encode_fn, params, mesh, num)
    stats["step"] = int(step)
    if jax.process_index() == 0:
        file = storage.path(workdir) / STATS_FILE
        storage.write_atomic(file, json.dumps(stats, indent=2))
        log.info("latent stats over %d clips: mean %s std %s -> %s", stats["num_clips"],
                 np.round(stats["mean"], 3), np.round(stats["std"], 3), file)
    return stats
