"""A small frame classifier used to score generated videos.

Generated clips are judged the way FID/FVD judge images: a classifier trained on
real data labels every frame (class accuracy of class-conditional samples) and
its penultimate layer gives the features that Frechet distances and
precision/recall compare (see ``vidit.eval.metrics``).

The network sees single frames; a video's prediction averages the frame logits
over time, which is enough for moving digits, where every frame shows the digit.

Everything here takes plain numpy arrays: videos are float ``[N, T, H, W, C]``
in [-1, 1] and labels are ints ``[N]``. Only ``get_or_train_classifier`` touches
the dataset module.

The validation digits are the last 297 sklearn digits, written by other people
than the training ones; docs/quickstart has the classifier's accuracy on them.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import scipy.special
from flax import nnx

NUM_CLASSES = 10
_CONFIG_FILE = "classifier_config.json"
_PARAMS_DIR = "params"
# Frames per forward pass at evaluation time; a fixed size means one compilation.
_EVAL_CHUNK = 512


class FrameClassifier(nnx.Module):
    """CNN for single frames: 2x average-pool stem -> conv blocks -> global average pool -> MLP.

    The digits are 8x8 images upscaled to ~16x16, so halving the frame first
    loses almost nothing and makes every conv 4x cheaper (training on 2 CPU
    cores is the budget). Each conv block is conv3x3 -> relu, followed by a 2x2
    max pool except after the last one, so a 32x32 frame ends at 4x4 and the
    last block sees the whole canvas. The global pool makes the output
    independent of where the digit is. Dropout (training only) sits between the
    feature layer and the logits, so features are always deterministic.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = NUM_CLASSES,
        widths: Sequence[int] = (32, 64, 128),
        feature_dim: int = 128,
        dropout: float = 0.3,
        *,
        rngs: nnx.Rngs,
    ):
        # Kept so that save() can write the architecture next to the weights.
        self.config = dict(
            in_channels=int(in_channels),
            num_classes=int(num_classes),
            widths=[int(w) for w in widths],
            feature_dim=int(feature_dim),
            dropout=float(dropout),
        )
        channels = [in_channels, *widths]
        self.convs = nnx.List(
            [nnx.Conv(c_in, c_out, (3, 3), rngs=rngs) for c_in, c_out in zip(channels[:-1], channels[1:])]
        )
        self.feature = nnx.Linear(widths[-1], feature_dim, rngs=rngs)
        self.dropout = nnx.Dropout(dropout)  # no RNG state: keys are passed per call
        self.head = nnx.Linear(feature_dim, num_classes, rngs=rngs)

    def embed(self, frames: jax.Array) -> jax.Array:
        """Frames ``[B, H, W, C]`` in [-1, 1] -> features ``[B, feature_dim]``."""
        x = nnx.avg_pool(frames, (2, 2), strides=(2, 2), padding="SAME")
        for i, conv in enumerate(self.convs):
            x = jax.nn.relu(conv(x))
            if i < len(self.convs) - 1:
                x = nnx.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
        x = x.mean(axis=(1, 2))
        return jax.nn.relu(self.feature(x))

    def __call__(self, frames: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        """Frames ``[B, H, W, C]`` -> logits ``[B, num_classes]``; dropout only given a key."""
        x = self.dropout(self.embed(frames), deterministic=dropout_key is None, rngs=dropout_key)
        return self.head(x)


# --------------------------------------------------------------------------- training


def _check_videos(videos: np.ndarray) -> np.ndarray:
    videos = np.asarray(videos)
    if videos.ndim != 5:
        raise ValueError(f"expected videos of shape [N, T, H, W, C], got {videos.shape}")
    if not np.issubdtype(videos.dtype, np.floating):
        # uint8 clips would silently be read as huge values; scaling is the caller's call.
        raise ValueError(f"expected float videos in [-1, 1], got dtype {videos.dtype}")
    return videos.astype(np.float32, copy=False)


def _new_model(seed: int, **arch) -> FrameClassifier:
    """Initialise under jit: one compilation instead of one per eager random op,
    which costs seconds on CPU."""
    return nnx.jit(lambda: FrameClassifier(**arch, rngs=nnx.Rngs(seed)))()


def augment(key: jax.Array, frames: jax.Array, max_degrees=8.0, max_log_scale=0.1, max_shear=0.1) -> jax.Array:
    """Random handwriting-style affine distortions of frames ``[B, H, W, C]`` in [-1, 1].

    Validation digits come from other writers, and overfitting to the training
    writers' slant and proportions is what costs accuracy. Each frame is
    rotated, sheared and scaled about its ink centroid, so the digit stays where
    it is on the canvas. (Stroke-width and elastic distortions were tried and
    lowered validation accuracy.)
    """
    b, h, w, _ = frames.shape
    k_rot, k_scale, k_shear = jax.random.split(key, 3)
    angle = jnp.deg2rad(jax.random.uniform(k_rot, (b,), minval=-max_degrees, maxval=max_degrees))
    scale = jnp.exp(jax.random.uniform(k_scale, (b, 2), minval=-max_log_scale, maxval=max_log_scale))
    shear = jax.random.uniform(k_shear, (b,), minval=-max_shear, maxval=max_shear)

    # Inverse map (output pixel -> input pixel): rotation @ shear / scale, per frame.
    cos, sin, ones, zeros = jnp.cos(angle), jnp.sin(angle), jnp.ones(b), jnp.zeros(b)
    rotation = jnp.stack([jnp.stack([cos, -sin], -1), jnp.stack([sin, cos], -1)], -2)
    shearing = jnp.stack([jnp.stack([ones, shear], -1), jnp.stack([zeros, ones], -1)], -2)
    inverse = rotation @ shearing / scale[:, :, None]  # [B, 2, 2]

    ink = (frames.mean(-1) + 1) / 2  # [B, H, W], 0 on the black background
    ys, xs = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij")
    mass = ink.sum((1, 2)) + 1e-6
    centre = jnp.stack([(ink * ys).sum((1, 2)) / mass, (ink * xs).sum((1, 2)) / mass], -1)  # [B, 2]
    offsets = jnp.stack([ys, xs], -1)[None] - centre[:, None, None, :]  # [B, H, W, 2]
    source = jnp.einsum("bij,bhwj->bhwi", inverse, offsets) + centre[:, None, None, :]

    def warp(image, coords):  # one [H, W] channel, bilinear, black outside the canvas
        return jax.scipy.ndimage.map_coordinates(image, [coords[..., 0], coords[..., 1]], order=1, cval=-1.0)

    return jax.vmap(jax.vmap(warp, in_axes=(2, None), out_axes=2))(frames, source)


@nnx.jit
def _train_step(model: FrameClassifier, optimizer: nnx.Optimizer, ema, key, frames, labels, ema_decay):
    aug_key, dropout_key = jax.random.split(key)
    frames = augment(aug_key, frames)

    def loss_fn(model):
        logits = model(frames, dropout_key)
        # Label smoothing: keeps logits moderate, which generalises better to new writers.
        targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), 0.1)
        return optax.softmax_cross_entropy(logits, targets).mean(), (logits.argmax(-1) == labels).mean()

    (loss, acc), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, ema, nnx.state(model, nnx.Param))
    return loss, acc, ema


def train_classifier(
    videos: np.ndarray,
    labels: np.ndarray,
    *,
    steps: int = 3000,
    batch_size: int = 64,
    seed: int = 0,
    lr: float = 2e-3,
    widths: Sequence[int] = (32, 64, 128),
    feature_dim: int = 128,
    dropout: float = 0.3,
    ema_decay: float = 0.99,
    log_every: int = 0,
) -> FrameClassifier:
    """Train a ``FrameClassifier`` on random single frames of labelled clips.

    Each step draws ``batch_size`` (clip, time) pairs uniformly, so every frame
    position of the bouncing digit is seen, and distorts them with ``augment``.
    AdamW with a cosine-decayed learning rate, label smoothing and dropout; the
    returned model holds an exponential moving average of the weights, which
    varies less from seed to seed than the last iterate.
    ``log_every > 0`` prints the running loss/accuracy.
    """
    videos = _check_videos(videos)
    labels = np.asarray(labels).astype(np.int32)
    if labels.shape != videos.shape[:1]:
        raise ValueError(f"labels {labels.shape} do not match videos {videos.shape}")
    n, t = videos.shape[:2]

    model = _new_model(seed, in_channels=videos.shape[-1], widths=widths, feature_dim=feature_dim, dropout=dropout)
    schedule = optax.cosine_decay_schedule(lr, decay_steps=max(steps, 1), alpha=0.05)
    optimizer = nnx.Optimizer(model, optax.adamw(schedule, weight_decay=1e-4), wrt=nnx.Param)
    # A copy, not the model's own Variables: sharing them would make the second
    # step's inputs look different to jit and cost a full recompilation.
    ema = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))
    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)

    start = time.time()
    for step in range(1, steps + 1):
        clip = rng.integers(0, n, batch_size)
        frame = rng.integers(0, t, batch_size)
        # Ramp the EMA decay up so early averages are not dominated by the random init.
        decay = min(ema_decay, (1 + step) / (10 + step))
        loss, acc, ema = _train_step(
            model, optimizer, ema, jax.random.fold_in(key, step), videos[clip, frame], labels[clip], decay
        )
        if log_every and (step % log_every == 0 or step == steps):
            print(
                f"[classifier] step {step}/{steps} loss {float(loss):.4f} "
                f"batch acc {float(acc):.3f} ({time.time() - start:.1f}s)",
                flush=True,
            )
    nnx.update(model, ema)
    return model


# --------------------------------------------------------------------------- inference


@nnx.jit
def _frame_outputs(model: FrameClassifier, frames):
    feats = model.embed(frames)
    return feats, model.head(feats)


def _per_frame(model: FrameClassifier, videos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Features ``[N, T, F]`` and logits ``[N, T, K]`` for every frame.

    Frames go through in fixed-size chunks (the last one zero-padded) so that
    any number of videos costs a single compilation.
    """
    videos = _check_videos(videos)
    n, t = videos.shape[:2]
    frames = videos.reshape(n * t, *videos.shape[2:])
    feats, logits = [], []
    for i in range(0, len(frames), _EVAL_CHUNK):
        chunk = frames[i : i + _EVAL_CHUNK]
        pad = _EVAL_CHUNK - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
        f, l = _frame_outputs(model, jnp.asarray(chunk))
        feats.append(np.asarray(f)[: _EVAL_CHUNK - pad])
        logits.append(np.asarray(l)[: _EVAL_CHUNK - pad])
    feats = np.concatenate(feats) if feats else np.zeros((0, model.config["feature_dim"]), np.float32)
    logits = np.concatenate(logits) if logits else np.zeros((0, model.config["num_classes"]), np.float32)
    return feats.reshape(n, t, -1), logits.reshape(n, t, -1)


def per_frame(model: FrameClassifier, videos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Penultimate-layer features ``[N, T, F]`` and logits ``[N, T, K]`` of every frame."""
    return _per_frame(model, videos)


def video_logits(model: FrameClassifier, videos: np.ndarray) -> np.ndarray:
    """Video logits ``[N, K]``: frame logits averaged over time."""
    return _per_frame(model, videos)[1].mean(axis=1)


def classify_videos(model: FrameClassifier, videos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Predicted class ``[N]`` and class probabilities ``[N, K]`` of each video."""
    logits = video_logits(model, videos)
    probs = scipy.special.softmax(logits, axis=-1)
    return probs.argmax(axis=-1), probs


def features(model: FrameClassifier, videos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Penultimate-layer features: time-averaged ``[N, F]`` and per-frame ``[N, T, F]``."""
    per_frame = _per_frame(model, videos)[0]
    return per_frame.mean(axis=1), per_frame


# --------------------------------------------------------------------------- save / load


def save(model: FrameClassifier, directory: str | os.PathLike, extra: dict[str, Any] | None = None) -> None:
    """Write the weights (Orbax) and the architecture (JSON) under ``directory``.

    The JSON is written last, so its presence marks a complete checkpoint.
    ``extra`` (e.g. training settings, validation accuracy) is stored in the JSON.
    """
    directory = os.path.abspath(os.fspath(directory))  # Orbax wants absolute paths
    os.makedirs(directory, exist_ok=True)
    config_path = os.path.join(directory, _CONFIG_FILE)
    if os.path.exists(config_path):
        os.remove(config_path)  # an interrupted overwrite must not look complete
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(directory, _PARAMS_DIR), nnx.state(model, nnx.Param), force=True)
    checkpointer.wait_until_finished()
    with open(config_path, "w") as f:
        json.dump({"architecture": model.config, "extra": extra or {}}, f, indent=2)


def load(directory: str | os.PathLike) -> FrameClassifier:
    """Rebuild a classifier written by ``save``; raise a clear error if it is absent or broken."""
    directory = os.path.abspath(os.fspath(directory))
    config_path = os.path.join(directory, _CONFIG_FILE)
    params_path = os.path.join(directory, _PARAMS_DIR)
    if not os.path.isfile(config_path) or not os.path.isdir(params_path):
        raise FileNotFoundError(
            f"no saved classifier at {directory!r} (expected {_CONFIG_FILE} and {_PARAMS_DIR}/)"
        )
    try:
        with open(config_path) as f:
            arch = json.load(f)["architecture"]
        # Build the module abstractly: shapes only, the weights come from disk.
        abstract = nnx.eval_shape(lambda: FrameClassifier(**arch, rngs=nnx.Rngs(0)))
        graphdef, abstract_params = nnx.split(abstract, nnx.Param)
        params = ocp.StandardCheckpointer().restore(params_path, abstract_params)
    except Exception as e:  # corrupt JSON, missing or mismatched arrays, ...
        raise ValueError(f"could not load the classifier saved at {directory!r}: {e}") from e
    return nnx.merge(graphdef, params)


def saved_info(directory: str | os.PathLike) -> dict[str, Any]:
    """The JSON written by ``save`` (architecture and extra training info)."""
    with open(os.path.join(os.fspath(directory), _CONFIG_FILE)) as f:
        return json.load(f)


# --------------------------------------------------------------------------- dataset glue


def _generated_clips(split: str, num: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``num`` moving-digits clips straight from the generator (native 32x32x1), in [-1, 1]."""
    from data_pipelines import moving_digits  # imported late: only the dataset glue needs it

    videos, labels = [], []
    for example in moving_digits.generate(split, num, seed):
        videos.append(example["video"])
        labels.append(example["label"])
    videos = np.stack(videos).astype(np.float32) / 127.5 - 1.0  # uint8 [0, 255] -> [-1, 1]
    return videos, np.asarray(labels, np.int32)


def _pipeline_clips(data_cfg: Any, split: str, num: int, seed: int, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``num`` clips from the training input pipeline, so the classifier sees
    frames with exactly the resolution and channels the diffusion model is trained on."""
    from data_pipelines import data_config, pipeline

    cfg = data_config.defaults()
    cfg.update(data_cfg)
    # whole batches only: no larger than the split (a smoke build's 16 validation clips)
    cfg.batch_size = max(1, min(64, num, pipeline.load_builder(cfg).info.splits[split].num_examples))
    cfg.num_workers = 0
    # All rows on this process: the classifier is trained and cached by one process.
    iterator = pipeline.make_iterator(cfg, split, seed=seed, train=train, process_index=0, process_count=1)
    videos, labels, count = [], [], 0
    for batch in iterator:  # a validation pass may end before `num` (whole batches only)
        videos.append(np.asarray(batch["video"], np.float32))
        labels.append(np.asarray(batch["label"], np.int32))
        count += len(labels[-1])
        if count >= num:
            break
    if not videos:
        raise ValueError(f"the {split!r} split of dataset {cfg.name!r} gave no clips to train or "
                         "validate the frame classifier on")
    return np.concatenate(videos)[:num], np.concatenate(labels)[:num]


def _load_clips(data_cfg: Any, split: str, num: int, seed: int, train: bool):
    if data_cfg is None:
        return _generated_clips(split, num, seed)
    return _pipeline_clips(data_cfg, split, num, seed, train)


DEFAULT_STEPS = 3000  # the scoring classifier behind every number in docs/


def get_or_train_classifier(
    cache_dir: str | os.PathLike,
    data_cfg: Any = None,
    *,
    num_train: int = 2000,
    num_val: int = 500,
    steps: int = DEFAULT_STEPS,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
) -> FrameClassifier:
    """Load the classifier cached in ``cache_dir``, or train one and cache it there.

    Without ``data_cfg`` the classifier trains on ``num_train`` clips straight
    from ``moving_digits.generate('train', ...)`` (32x32, 1 channel). With a
    data config (as for ``data_pipelines.pipeline.make_iterator``) the clips come
    through the input pipeline instead, so frames match the model's resolution
    and channels. Accuracy on ``num_val`` clips of the 'validation' split
    (source digits disjoint from training) is printed and stored with the weights.
    """
    cache_dir = os.fspath(cache_dir)
    if os.path.isfile(os.path.join(cache_dir, _CONFIG_FILE)):
        model = load(cache_dir)
        _check_channels(model, data_cfg, cache_dir)
        acc = saved_info(cache_dir)["extra"].get("val_accuracy")
        print(f"[classifier] loaded from {cache_dir} (validation accuracy {acc})", flush=True)
        return model

    source = "moving_digits.generate" if data_cfg is None else "the input pipeline"
    print(f"[classifier] no classifier cached at {cache_dir}; training one on {num_train} clips "
          f"from {source}", flush=True)
    start = time.time()
    videos, labels = _load_clips(data_cfg, "train", num_train, seed, train=True)
    model = train_classifier(
        videos, labels, steps=steps, batch_size=batch_size, seed=seed, lr=lr, log_every=max(steps // 6, 1)
    )
    del videos
    val_videos, val_labels = _load_clips(data_cfg, "validation", num_val, seed + 1, train=False)
    pred, _ = classify_videos(model, val_videos)
    acc = float((pred == val_labels).mean())
    print(f"[classifier] validation accuracy {acc:.4f} on {len(val_labels)} clips "
          f"({time.time() - start:.1f}s in all)", flush=True)
    extra = dict(val_accuracy=acc, num_train=num_train, num_val=len(val_labels), steps=steps,
                 batch_size=batch_size, lr=lr, seed=seed, frame_shape=list(val_videos.shape[2:]))
    save(model, cache_dir, extra=extra)
    print(f"[classifier] saved to {cache_dir}", flush=True)
    return model


def _check_channels(model: FrameClassifier, data_cfg: Any, cache_dir: str) -> None:
    """A cached classifier must accept the frames the caller will feed it."""
    if data_cfg is None or "channels" not in data_cfg:
        return
    if int(data_cfg["channels"]) != model.config["in_channels"]:
        raise ValueError(
            f"the classifier cached at {cache_dir!r} takes {model.config['in_channels']} channels but "
            f"data.channels={data_cfg['channels']}; use another cache directory or delete this one"
        )
