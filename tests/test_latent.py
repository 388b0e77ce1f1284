"""VAE training through vidit.train, latent statistics, latent caching, latent DiT training.

One tiny VAE run (configs/vae_moving_digits.py:smoke) is shared by the module; the other tests
use it as their autoencoder.
"""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import latent_digits, vae_moving_digits
from data_pipelines import data_config, encode_dataset, encode_latents, pipeline
from vidit import batches, diffusion, export, latent_stats, run as run_lib, sharding, steps
from vidit import train as train_lib
from vidit.errors import ConfigError
from vidit.models import discriminator, vae
from vidit.train_state import Setup

from tests.helpers import override


@pytest.fixture(scope="module")
def vae_run(data_dir, tmp_path_factory):
    c = vae_moving_digits.get_config("smoke")
    override(c, **{"data.data_dir": data_dir, "train.progress": False})
    workdir = str(tmp_path_factory.mktemp("vae_run"))
    summary = train_lib.train(c, workdir)
    return workdir, c, summary


@pytest.fixture(scope="module")
def latents(vae_run, data_dir, tmp_path_factory):
    """The tiny dataset's latents (encode_latents), written once for the module."""
    workdir, _, _ = vae_run
    out = str(tmp_path_factory.mktemp("latents"))
    folder = encode_latents.encode(workdir, "moving_digits", out, data_dir=data_dir,
                                   batch_size=8, progress=False,
                                   builder_kwargs={"num_train": 64, "num_validation": 16})
    return out, folder


# ------------------------------------------------------------------------------ VAE training
def test_vae_trains_through_vidit_train(vae_run):
    workdir, c, summary = vae_run
    assert summary["stopped_for"] is None and summary["step"] == c.train.steps
    assert all(np.isfinite(summary["losses"]))
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints")))  # Orbax steps
    evals = [json.loads(line) for line in open(os.path.join(workdir, "eval.jsonl"))]
    assert {"eval/psnr", "eval/ssim", "eval/loss"} <= set(evals[-1])
    assert np.isfinite(evals[-1]["eval/psnr"]) and -1 <= evals[-1]["eval/ssim"] <= 1
    samples = os.listdir(os.path.join(workdir, "samples"))
    assert any(s.endswith(".gif") for s in samples) and any(s.endswith(".mp4") for s in samples)
    import imageio.v3 as iio
    gif = iio.imread(os.path.join(workdir, "samples", sorted(samples)[0]))
    assert gif.shape[0] == c.data.num_frames  # input | reconstruction, 9 frames
    stats = json.load(open(os.path.join(workdir, latent_stats.STATS_FILE)))
    assert len(stats["mean"]) == len(stats["std"]) == c.model.latent_channels
    assert all(np.isfinite(stats["mean"])) and all(0 < s < 1e3 for s in stats["std"])
    assert stats["num_clips"] > 0 and stats["step"] == c.train.steps


def test_vae_export_carries_latent_stats(vae_run, tmp_path):
    workdir, _, _ = vae_run
    out = str(tmp_path / "export")
    export.export(workdir, out)
    assert os.path.exists(os.path.join(out, latent_stats.STATS_FILE))
    params = run_lib.load(out).params  # int keys (the VAE's layer lists) round-trip
    ref = run_lib.load(workdir).params
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), jax.device_get(ref))
    ae = run_lib.load_autoencoder(out, sharding.make_mesh(dict(fsdp=-1)))
    assert ae.latent_shape(9, 32, 32) == (3, 8, 8, ae.latent_channels)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(ae.params),
                 jax.device_get(ref["vae"]))


def test_gan_gradients_are_split():
    """Generator term -> VAE only; discriminator hinge -> discriminator only; off before
    gan_start."""
    c = vae_moving_digits.get_config("smoke")
    model = vae.VAEModel(c.model, seed=0)
    graphdef, params = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(params)
    x = jax.random.uniform(jax.random.key(0), (2, 5, 16, 16, 1), minval=-1, maxval=1)

    def term(name, p):
        out = nnx.merge(graphdef, p)(x, None, gan=True)
        return (discriminator.g_hinge_loss(out["g_logits"]) if name == "g"
                else discriminator.d_hinge_loss(out["d_real"], out["d_fake"]))

    def norms(g):
        return {k: float(sum(jnp.sum(jnp.abs(v)) for v in jax.tree.leaves(g[k])))
                for k in ("vae", "disc")}

    g_grads = norms(jax.jit(jax.grad(functools.partial(term, "g")))(params))
    d_grads = norms(jax.jit(jax.grad(functools.partial(term, "d")))(params))
    assert g_grads["disc"] == 0.0 and g_grads["vae"] > 0
    assert d_grads["vae"] == 0.0 and d_grads["disc"] > 0

    obj = diffusion.make_objective(dict(name="vae", beta=1e-6, gan_weight=0.5, gan_start=10))
    plain = diffusion.make_objective(dict(name="vae", beta=1e-6))
    fn = lambda *a, **k: nnx.merge(graphdef, params)(*a, **k)  # noqa: E731
    gated = jax.jit(lambda step: obj.loss(fn, x, {}, jax.random.key(1), step=step)[0])
    before, after = gated(jnp.asarray(9)), gated(jnp.asarray(10))
    base = jax.jit(lambda: plain.loss(fn, x, {}, jax.random.key(1))[0])()
    np.testing.assert_allclose(before, base, rtol=1e-6)
    assert abs(float(after) - float(base)) > 1e-6


def test_vae_config_errors(data_dir, tmp_path):
    c = vae_moving_digits.get_config("smoke")
    override(c, **{"data.data_dir": data_dir, "data.num_frames": 8})
    with pytest.raises(ConfigError, match="1 \\+ k\\*4"):
        train_lib.train(c, str(tmp_path))
    for variant in ("compression=1x4x4", "compression=4x8x8"):
        c = vae_moving_digits.get_config(variant + ",smoke")
        mesh = sharding.make_mesh(c.mesh)
        setup = Setup(c, mesh)  # builds
        assert setup.num_params() > 0


# ---------------------------------------------------------------------------- latent caching
def _source(data_dir, split="train"):
    cfg = data_config.defaults()
    cfg.data_dir = data_dir
    cfg.builder_kwargs = {"num_train": 64, "num_validation": 16}
    return pipeline.load_builder(cfg).as_data_source(split)


def _latent_cfg(data_dir_latents, name="moving_digits_latents"):
    cfg = data_config.defaults()
    cfg.name, cfg.data_dir, cfg.batch_size = name, data_dir_latents, 8
    return cfg


def test_encoded_dataset_reads_with_labels(latents, data_dir):
    out, folder = latents
    info = encode_latents.read_info(folder)
    assert info["latent_shape"] == [3, 8, 8, 8] and info["examples"] == {"train": 64,
                                                                          "validation": 16}
    source = _source(data_dir)
    it = pipeline.make_iterator(_latent_cfg(out), "train", seed=0, train=True,
                                process_index=0, process_count=1)
    batch = next(it)
    assert batch["latent"].shape == (8, 3, 8, 8, 8) and "video" not in batch
    import tensorflow_datasets as tfds
    ds = tfds.builder("moving_digits_latents", data_dir=out).as_data_source("train")
    indices = [int(ds[i]["index"]) for i in range(len(ds))]
    assert sorted(indices) == list(range(64))
    for i in range(0, 64, 9):
        e = ds[i]
        assert int(e["label"]) == int(source[int(e["index"])]["label"])
        assert e["caption"] == source[int(e["index"])]["caption"]


def test_encode_into_a_bucket_is_read_back_by_the_pipeline(vae_run, latents, data_dir,
                                                            bucket_dir):
    workdir, _, _ = vae_run
    folder = encode_latents.encode(workdir, "moving_digits", str(bucket_dir), data_dir=data_dir,
                                   batch_size=8, progress=False,
                                   builder_kwargs={"num_train": 64, "num_validation": 16})
    assert folder.startswith("gs://") and encode_latents.read_info(folder)["examples"] == {
        "train": 64, "validation": 16}
    assert not list((bucket_dir / encode_dataset.WORK / "moving_digits_latents").glob("*.npz"))
    local_out, _ = latents
    batches = [next(pipeline.make_iterator(_latent_cfg(where), "train", seed=0, train=True,
                                           process_index=0, process_count=1))
               for where in (str(bucket_dir), local_out)]
    np.testing.assert_allclose(batches[0]["latent"], batches[1]["latent"], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(batches[0]["label"], batches[1]["label"])


def test_encode_resumes_without_duplicates(vae_run, data_dir, tmp_path, monkeypatch):
    workdir, _, _ = vae_run
    out = str(tmp_path / "lat")
    calls = {"n": 0}
    real = encode_dataset.write_part

    def flaky(path, arrays):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("simulated interruption")
        real(path, arrays)

    monkeypatch.setattr(encode_dataset, "write_part", flaky)
    kw = dict(data_dir=data_dir, batch_size=8, progress=False, splits=["train"],
              builder_kwargs={"num_train": 64, "num_validation": 16})
    with pytest.raises(KeyboardInterrupt):
        encode_latents.encode(workdir, "moving_digits", out, **kw)
    work = os.path.join(out, encode_dataset.WORK, "moving_digits_latents")
    assert len([f for f in os.listdir(work) if f.endswith(".npz")]) == 3
    written = []
    monkeypatch.setattr(encode_dataset, "write_part",
                        lambda p, a: (written.append(p), real(p, a)))
    folder = encode_latents.encode(workdir, "moving_digits", out, **kw)
    assert len(written) == 8 - 3  # only the missing batches were encoded
    import tensorflow_datasets as tfds
    ds = tfds.builder("moving_digits_latents", data_dir=out).as_data_source("train")
    assert sorted(int(ds[i]["index"]) for i in range(len(ds))) == list(range(64))
    assert os.path.exists(os.path.join(work, "DONE")) and folder.startswith(out)
    assert encode_latents.encode(workdir, "moving_digits", out, **kw) == folder  # done: no-op


# ------------------------------------------------------------------------ latent DiT training
def _latent_config(vae_dir, data_dir, latents_dir=None, mode="cached"):
    c = latent_digits.get_config(f"smoke,latents={mode},autoencoder={vae_dir}")
    override(c, **{"train.progress": False})
    if mode == "cached":
        c.data.data_dir = latents_dir
    else:
        c.data.data_dir = data_dir
    return c


def test_cached_and_online_give_the_same_loss(vae_run, latents, data_dir):
    """The issue's demand: the same clips give the same loss whether their latents were cached
    by encode_latents or encoded inside the train step."""
    vae_dir, _, _ = vae_run
    out, _ = latents
    cached_c = _latent_config(vae_dir, data_dir, out, "cached")
    online_c = _latent_config(vae_dir, data_dir, mode="online")
    import tensorflow_datasets as tfds
    ds = tfds.builder("moving_digits_latents", data_dir=out).as_data_source("train")
    source = _source(data_dir)
    spec = pipeline.clip_spec(online_c.data)
    rows = [ds[i] for i in range(8)]
    cached_batch = {"latent": np.stack([r["latent"] for r in rows]),
                    "label": np.asarray([r["label"] for r in rows], np.int32)}
    online_batch = {"video": np.stack([pipeline.video_clip(source[int(r["index"])], spec)
                                       for r in rows]),
                    "label": cached_batch["label"]}
    mesh = sharding.make_mesh(dict(data=2, fsdp=4))
    losses, inputs = [], []
    ae = run_lib.load_autoencoder(vae_dir, mesh)
    for c, batch in ((cached_c, cached_batch), (online_c, online_batch)):
        setup = Setup(c, mesh, autoencoder=ae)
        objective = diffusion.make_objective(c.objective)
        state = setup.init()
        step = jax.jit(functools.partial(steps.train_step, setup, objective))
        with sharding.use(mesh, c.sharding_rules):
            g = batches.global_batch(batch, mesh)
            inputs.append(np.asarray(jax.jit(setup.model_input)(g, ae.params)))
            _, metrics = step(state, g, {"autoencoder": ae.params})
        losses.append(float(metrics["loss"]))
    assert inputs[0].shape == (8, 3, 8, 8, 8)
    np.testing.assert_allclose(inputs[0], inputs[1], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
    # normalised with the run's stats: roughly zero-mean, unit-scale per channel
    assert np.all(np.abs(inputs[0].mean(axis=(0, 1, 2, 3))) < 1.0)


def test_latent_dit_trains_and_samples_decoded_videos(vae_run, latents, data_dir, tmp_path,
                                                      monkeypatch):
    vae_dir, _, _ = vae_run
    out, _ = latents
    c = _latent_config(vae_dir, data_dir, out, "cached")
    override(c, **{"train.steps": 4, "train.ckpt_every": 4, "sample.num": 4, "sample.steps": 2})
    workdir = str(tmp_path / "ldit")
    summary = train_lib.train(c, workdir)
    assert summary["stopped_for"] is None and all(np.isfinite(summary["losses"]))
    assert any(f.endswith(".gif") for f in os.listdir(os.path.join(workdir, "samples")))
    from vidit import sample
    videos, _ = sample.generate(workdir, num=2, steps_=2)
    assert videos.shape == (2, 9, 32, 32, 1)
    assert np.all(np.abs(videos) <= 1.0)

    # vidit.evaluate scores decoded samples against the VAE's pixel clips, not the latents.
    from flax import nnx
    from vidit import evaluate
    from vidit.eval import classifier
    seen = []
    monkeypatch.setattr(evaluate, "classifier_for", lambda d, steps: seen.append(d) or
                        classifier.FrameClassifier(rngs=nnx.Rngs(0)))
    report = evaluate.evaluate(workdir, step_counts=[2], num=4, batch=4)
    assert seen[0].name == "moving_digits" and seen[0].num_frames == 9
    assert 0.0 <= report["results"][0]["class_accuracy"] <= 1.0


# ------------------------------------------------------------------------ buckets
MIXED = {"num_train": 64, "num_validation": 16, "shapes": "mixed"}


@pytest.fixture(scope="module")
def mixed_latents(vae_run, data_dir, tmp_path_factory):
    """The tiny mixed-shape set's latents, each clip at the bucket of its shape."""
    workdir, _, _ = vae_run
    out = str(tmp_path_factory.mktemp("mixed_latents"))
    folder = encode_latents.encode(workdir, "moving_digits", out, data_dir=data_dir,
                                   batch_size=8, progress=False, builder_kwargs=MIXED,
                                   buckets=latent_digits.LATENT_BUCKETS)
    return out, folder


def test_encode_in_buckets_keeps_shapes_and_images_take_the_first_frame_path(
        vae_run, mixed_latents, data_dir):
    import tensorflow_datasets as tfds
    from data_pipelines import buckets
    vae_dir, _, _ = vae_run
    out, folder = mixed_latents
    builder = tfds.builder("moving_digits_latents", data_dir=out)
    ds = builder.as_data_source("train")
    index = buckets.record_shapes(builder, "train")
    latent_shapes = {tuple(index[i]): ds[i]["latent"].shape for i in range(len(ds))}
    assert latent_shapes[(9, 32, 48)] == (3, 8, 12, 8)
    assert latent_shapes[(1, 48, 32)] == (1, 12, 8, 8)
    assert len(latent_shapes) >= 5
    # Causal: a clip's first latent frame is its first frame's own (image) latent.
    mesh = sharding.make_mesh(dict(data=1, fsdp=1), jax.devices()[:1])
    ae = run_lib.load_autoencoder(vae_dir, mesh)
    source = pipeline.load_builder(override(data_config.defaults(), **{
        "data_dir": data_dir, "builder_kwargs": MIXED})).as_data_source("train")
    i = next(i for i in range(len(ds)) if tuple(index[i]) == (9, 32, 48))
    spec = pipeline.ClipSpec(9, 1, 32, 48, 1, 40)
    clip = pipeline.video_clip(source[int(ds[i]["index"])], spec)[None]
    whole = np.asarray(ae.encode_raw(ae.params, jnp.asarray(clip)))
    first = np.asarray(ae.encode_raw(ae.params, jnp.asarray(clip[:, :1])))
    np.testing.assert_allclose(whole[0], ds[i]["latent"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(first[0, 0], whole[0, 0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["cached", "online"])
def test_latent_dit_trains_in_buckets(vae_run, mixed_latents, data_dir, tmp_path, mode):
    vae_dir, _, _ = vae_run
    out, _ = mixed_latents
    c = latent_digits.get_config(f"smoke,latents={mode},autoencoder={vae_dir},shapes=mixed")
    override(c, **{"train.progress": False, "train.steps": 6, "train.ckpt_every": 6,
                   "sample.num": 0, "data.data_dir": out if mode == "cached" else data_dir})
    if mode == "cached":
        c.data.builder_kwargs = {}
    summary = train_lib.train(c, str(tmp_path / mode))
    assert summary["stopped_for"] is None and np.isfinite(summary["losses"]).all()
    it = pipeline.make_iterator(c.data, "train", seed=c.seed, train=True, process_index=0,
                                process_count=1)
    key = "latent" if mode == "cached" else "video"
    assert len({next(it)[key].shape for _ in range(6)}) >= 2  # it saw several buckets
