"""Causal video VAE: shapes, causality, chunked == whole clip, training signal, metrics."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from vidit import config_lib, latent_stats, sharding
from vidit.diffusion import autoencoding
from vidit.errors import ConfigError
from vidit.eval import image_metrics
from vidit.models import conv, discriminator, vae

COMPRESSIONS = [(4, 8, 8), (1, 4, 4), (4, 4, 4)]
CLIP = (1, 13, 8, 8, 1)  # 1 + 3*4 frames: 4 latent frames at 4x4x4


@pytest.fixture(scope="module")
def model():
    """One tiny 4x4x4 VAE shared by the tests (building one costs seconds of op compiles);
    a test that changes it works on nnx.clone(model)."""
    return vae.VideoVAE(vae.tiny_config((4, 4, 4)), nnx.Rngs(0))


def _abstract(compression):
    return nnx.eval_shape(lambda: vae.VideoVAE(vae.tiny_config(compression), nnx.Rngs(0)))


def _video(shape, seed=0):
    return jax.random.uniform(jax.random.key(seed), shape, minval=-1.0, maxval=1.0)


@nnx.jit
def _encode(model, x):
    return model.encode(x)


@nnx.jit
def _decode(model, z):
    return model.decode(z)


# ------------------------------------------------------------------------------------ shapes
@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_shapes_for_each_compression(compression):
    model = _abstract(compression)
    st, sh, sw = compression
    for k in (0, 1, 2):  # k=0: an image is a 1-frame video
        t = 1 + k * st
        x = jax.ShapeDtypeStruct((2, t, 16, 16, 1), jnp.float32)
        mean, logvar = nnx.eval_shape(lambda m, x: m.encode(x), model, x)
        want = (2, 1 + k, 16 // sh, 16 // sw, 4)
        assert mean.shape == logvar.shape == want == model.latent_shape(x.shape)
        recon = nnx.eval_shape(lambda m, z: m.decode(z), model, mean)
        assert recon.shape == x.shape == model.video_shape(mean.shape)
        assert recon.dtype == jnp.float32


def test_invalid_frame_count_and_size_raise():
    model = _abstract((4, 4, 4))
    for t in (2, 4, 6):
        with pytest.raises(ValueError, match="1 \\+ k\\*4"):
            model.encode(jnp.zeros((1, t, 16, 16, 1)))
    with pytest.raises(ValueError, match="spatial compression"):
        model.encode(jnp.zeros((1, 5, 18, 16, 1)))
    with pytest.raises(ValueError, match="multiple"):
        model.encode_chunked(jnp.zeros((1, 9, 16, 16, 1)), chunk_frames=6)
    with pytest.raises(ConfigError, match="transitions"):
        vae.VideoVAE(_cfg_with(channel_mult=(1, 2)), nnx.Rngs(0))


def _cfg_with(**kw):
    cfg = vae.tiny_config((4, 8, 8))
    for k, v in kw.items():
        cfg[k] = v
    return cfg


# --------------------------------------------------------------------------------- causality
def test_encoder_and_decoder_are_causal_in_time(model):
    x = _video(CLIP, seed=3)
    mean, _ = _encode(model, x)
    for j, first_changed in ((5, 2), (4, 1), (0, 0)):  # frame j lives in latent ceil(j / 4)
        mean2, _ = _encode(model, x.at[:, j].set(-x[:, j]))
        np.testing.assert_allclose(mean2[:, :first_changed], mean[:, :first_changed], atol=1e-6)
        assert float(jnp.max(jnp.abs(mean2[:, first_changed] - mean[:, first_changed]))) > 1e-4
    out = _decode(model, mean)
    out2 = _decode(model, mean.at[:, 1].add(1.0))  # latent 1 feeds frames 1..4 and later
    np.testing.assert_allclose(out2[:, :1], out[:, :1], atol=1e-6)
    assert float(jnp.max(jnp.abs(out2[:, 1] - out[:, 1]))) > 1e-4
    # Frame 0 is encoded alone: a clip's first latent frame is the image's latent.
    np.testing.assert_allclose(_encode(model, x[:, :1])[0], mean[:, :1], atol=1e-5)


def test_chunked_equals_whole_clip(model):
    x = _video(CLIP, seed=3)
    mean, logvar = _encode(model, x)  # same shapes as above: compiled once
    mean_c, logvar_c = model.encode_chunked(x, 4)  # chunks of 5 + 4 + 4 frames
    np.testing.assert_allclose(mean_c, mean, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(logvar_c, logvar, atol=1e-5, rtol=1e-5)
    out = _decode(model, mean)
    # 2 + 1 + 1 latent frames, also fed the chunked latents
    np.testing.assert_allclose(model.decode_chunked(mean_c, 1), out, atol=1e-5, rtol=1e-5)
    # a first chunk covering the whole clip is the whole clip
    np.testing.assert_allclose(model.encode_chunked(x[:, :5], 4)[0], mean[:, :2], atol=1e-5)


@pytest.mark.parametrize("kind", ["rms", "group"])
def test_norm_is_per_frame(kind):
    """No statistics cross frames, so a chunk normalises exactly as inside the whole clip."""
    norm = conv.Norm(8, kind, groups=4, rngs=nnx.Rngs(0))
    x = _video((2, 5, 4, 4, 8))
    np.testing.assert_allclose(norm(x)[:, 2:4], norm(x[:, 2:4]), atol=1e-6)


# ------------------------------------------------------------------------------- training
def test_loss_decreases_with_adam_and_gradients_are_finite(model):
    model = nnx.clone(model)
    # a smooth (compressible) clip: random 3x4x4 values, linearly upsampled
    x = jax.image.resize(_video((2, 3, 4, 4, 1), seed=7), (2, 5, 8, 8, 1), "linear")
    optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, rng):
        def loss_fn(model):
            recon, mean, logvar = model(x, rng)
            return autoencoding.vae_loss(recon, x, mean, logvar, beta=1e-3)

        (loss, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        optimizer.update(model, grads)
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
        return loss, finite

    losses = []
    for i in range(30):
        loss, finite = step(model, optimizer, jax.random.key(i))
        assert bool(finite), i
        losses.append(float(loss))
    assert all(map(math.isfinite, losses))
    assert np.mean(losses[-5:]) < 0.7 * losses[0], losses


# -------------------------------------------------------------------------------- metrics
def test_kl_matches_closed_form():
    mean = jnp.array([0.5, -1.0, 0.0, 2.0]).reshape(1, 1, 1, 1, 4)
    logvar = jnp.array([0.0, jnp.log(2.0), -1.0, 0.3]).reshape(1, 1, 1, 1, 4)
    m, lv = np.asarray(mean).ravel(), np.asarray(logvar).ravel()
    want = 0.5 * (m ** 2 + np.exp(lv) - 1 - lv)
    np.testing.assert_allclose(autoencoding.kl_divergence(mean, logvar).ravel(), want, rtol=1e-6)
    x = jnp.zeros((1, 1, 2, 2, 1))
    loss, metrics = autoencoding.vae_loss(x + 0.25, x, mean, logvar, beta=0.1)
    np.testing.assert_allclose(metrics["kl"], want.mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics["kl_per_sample"], want.sum(), rtol=1e-6)
    np.testing.assert_allclose(metrics["l1"], 0.25, rtol=1e-6)
    np.testing.assert_allclose(loss, 0.25 + 0.1 * want.mean(), rtol=1e-6)
    # N(0, 1) has no KL
    assert float(jnp.max(jnp.abs(autoencoding.kl_divergence(jnp.zeros(3), jnp.zeros(3))))) == 0.0


def test_psnr():
    x = _video((2, 3, 8, 8, 3))
    assert float(image_metrics.psnr(x, x)) == float("inf")
    # every pixel off by 0.1: mse 0.01, range 2 -> 10 log10(4 / 0.01)
    np.testing.assert_allclose(image_metrics.psnr(x, x + 0.1), 10 * np.log10(400.0), rtol=1e-4)


def test_ssim():
    x = jax.image.resize(_video((2, 2, 8, 8, 3)), (2, 2, 32, 32, 3), "linear")  # smooth frames
    ssim = jax.jit(image_metrics.ssim)
    np.testing.assert_allclose(ssim(x, x), 1.0, atol=1e-5)
    noisy = jnp.clip(x + 0.2 * jax.random.normal(jax.random.key(1), x.shape), -1, 1)
    very_noisy = jnp.clip(x + 0.6 * jax.random.normal(jax.random.key(2), x.shape), -1, 1)
    s1, s2 = float(ssim(x, noisy)), float(ssim(x, very_noisy))
    assert 0.0 < s2 < s1 < 0.99
    # single-channel 4D images and frames smaller than the window also work
    img = x[:, 0, :8, :8, :1]
    np.testing.assert_allclose(ssim(img, img), 1.0, atol=1e-5)


def test_discriminator_and_hinge_losses():
    cfg = vae.tiny_config((4, 4, 4))
    disc = discriminator.PatchDiscriminator(cfg, nnx.Rngs(0))
    logits = nnx.jit(lambda d, x: d(x))(disc, _video((2, 5, 16, 16, 1)))
    assert logits.shape == (2, 3, 4, 4, 1) and bool(jnp.all(jnp.isfinite(logits)))
    real, fake = jnp.array([2.0, 0.5]), jnp.array([-2.0, 0.5])
    np.testing.assert_allclose(discriminator.d_hinge_loss(real, fake), (0 + 0.5) / 2 + (0 + 1.5) / 2)
    np.testing.assert_allclose(discriminator.g_hinge_loss(fake), 0.75)


def test_latent_stats_and_normalisation():
    rng = np.random.default_rng(0)
    batches = [rng.normal([1.0, -2.0, 0.0], [0.5, 2.0, 1.0], size=(4, 2, 3, 3, 3))
               for _ in range(20)]
    mean, std = latent_stats.channel_stats(iter(batches))
    allz = np.concatenate([b.reshape(-1, 3) for b in batches])
    np.testing.assert_allclose(mean, allz.mean(0), atol=1e-5)
    np.testing.assert_allclose(std, allz.std(0), rtol=1e-5)
    z = jnp.asarray(batches[0], jnp.float32)
    zn = latent_stats.normalize(z, (mean, std))
    np.testing.assert_allclose(latent_stats.denormalize(zn, (mean, std)), z, atol=1e-5)
    with pytest.raises(ValueError):
        latent_stats.channel_stats([])


# ------------------------------------------------------------------------------ sharding
def test_every_param_has_logical_names_with_rules(devices):
    model = nnx.eval_shape(lambda: vae.VideoVAE(vae.tiny_config((4, 8, 8)), nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    rules = config_lib.base_config().sharding_rules
    leaves = jax.tree_util.tree_flatten_with_path(
        state, is_leaf=lambda v: isinstance(v, nnx.Variable))[0]
    assert leaves
    for path, var in leaves:
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == len(var.get_value().shape), path
        sharding.logical_to_spec(names, rules)
    names = sharding.logical_names(state)
    c = config_lib.base_config()
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor, c.mesh.sequence = 2, 2, 2, 1
    mesh = sharding.make_mesh(c.mesh, devices)
    shapes = jax.tree.map(lambda v: v, nnx.to_pure_dict(state))
    shardings = sharding.tree_shardings(shapes, names, mesh, rules)
    for s, a in zip(jax.tree.leaves(shardings), jax.tree.leaves(shapes)):
        s.shard_shape(a.shape)  # valid for every shape


def test_vae_objective_l2_weight_adds_the_mse():
    """objective.l2_weight adds w * MSE to L1 + beta KL (and negative weights are refused)."""
    from vidit import diffusion
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(-1, 1, (2, 5, 8, 8, 1)), jnp.float32)
    recon = jnp.asarray(rng.uniform(-1, 1, x.shape), jnp.float32)
    latent = jnp.asarray(rng.normal(size=(2, 2, 2, 2, 4)), jnp.float32)
    fn = lambda x0, r, gan=False: {"recon": recon, "mean": latent, "logvar": 0 * latent}  # noqa: E731
    loss = {w: float(diffusion.make_objective(dict(name="vae", l2_weight=w)).loss(
        fn, x, {}, jax.random.key(0))[0]) for w in (0.0, 2.0)}
    np.testing.assert_allclose(loss[2.0] - loss[0.0], 2.0 * float(jnp.mean((recon - x) ** 2)),
                               rtol=1e-5)
    with pytest.raises(ValueError, match="l2_weight"):
        diffusion.make_objective(dict(name="vae", l2_weight=-1.0))
