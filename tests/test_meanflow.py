"""MeanFlow (Geng et al. 2025, "Mean Flows for One-step Generative Modeling") and its checks.

Closed forms for Gaussian data x ~ N(0, s^2 I): z_t = a(t) z_1 with a(t)^2 = (1-t)^2 s^2 + t^2,
v*(z, t) = z (t - (1 - t) s^2) / a(t)^2 and u*(z, t, r) = z (1 - a(r)/a(t)) / (t - r).
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vidit import checks, config_lib, diffusion
from vidit.diffusion import meanflow, samplers
from vidit.errors import ConfigError
from vidit.models import dit

S = 0.5  # data standard deviation


def a(t):
    return jnp.sqrt((1 - t) ** 2 * S**2 + t**2)


def v_star(z, t):
    t = t.reshape((-1,) + (1,) * (z.ndim - 1))
    return z * (t - (1 - t) * S**2) / a(t) ** 2


def u_star(z, t, cond=None, h=None):
    t = t.reshape((-1,) + (1,) * (z.ndim - 1))
    r = t - h.reshape(t.shape)
    # The t -> r limit of (1 - a(r)/a(t)) / (t - r) is a'(t)/a(t) = v*(z, t)/z.
    safe = jnp.where(jnp.abs(t - r) > 1e-6, t - r, 1.0)
    return jnp.where(jnp.abs(t - r) > 1e-6, z * (1 - a(r) / a(t)) / safe,
                     z * (t - (1 - t) * S**2) / a(t) ** 2)


def toy_model(theta):
    """A model_fn with four parameters, nonlinear in z, t and h (for gradient checks)."""
    def fn(z, t, cond, h):
        tt, hh = t[:, None], h[:, None]
        return theta[0] * z + theta[1] * tt * z ** 2 + theta[2] * hh * jnp.sin(z) + theta[3]
    return fn


def test_jvp_tangent_matches_float64_central_difference():
    with jax.enable_x64(True):
        z = jax.random.normal(jax.random.key(0), (3, 5), jnp.float64)
        t = jnp.array([0.9, 0.6, 0.3], jnp.float64)
        r = jnp.array([0.2, 0.1, 0.0], jnp.float64)
        v = jax.random.normal(jax.random.key(1), z.shape, jnp.float64)
        _, du_dt = jax.jvp(lambda z, t, r: u_star(z, t, h=t - r), (z, t, r),
                           (v, jnp.ones_like(t), jnp.zeros_like(r)))
        eps = 1e-6
        fd = (u_star(z + eps * v, t + eps, h=t + eps - r)
              - u_star(z - eps * v, t - eps, h=t - eps - r)) / (2 * eps)
        np.testing.assert_allclose(du_dt, fd, rtol=1e-6, atol=1e-9)


def test_target_from_true_velocity_is_the_average_velocity():
    """u* = v* - (t - r) du*/dt along the flow: the identity, signs and time direction."""
    with jax.enable_x64(True):
        z = jax.random.normal(jax.random.key(0), (4, 6), jnp.float64)
        t = jnp.array([1.0, 0.8, 0.5, 0.3], jnp.float64)
        r = jnp.array([0.0, 0.3, 0.5, 0.1], jnp.float64)
        u, target = meanflow.mean_flow_target(u_star, z, v_star(z, t), t, r, None)
        np.testing.assert_allclose(target, u, rtol=1e-9, atol=1e-12)


def test_one_exact_step_from_noise_has_the_data_variance():
    obj = diffusion.make_objective(diffusion.default_config("meanflow"))
    noise = jax.random.normal(jax.random.key(0), (20000, 8))
    x = obj.sample(u_star, noise, None, steps=1)
    assert float(jnp.var(x)) == pytest.approx(S**2, rel=0.02)
    x2 = obj.sample(u_star, noise, None, steps=2)  # exact jumps compose
    np.testing.assert_allclose(x2, x, rtol=1e-5, atol=1e-6)


def test_step_with_r_equal_t_is_the_identity_and_u_is_v():
    z = jax.random.normal(jax.random.key(0), (3, 4))
    t = jnp.array([0.7, 0.4, 0.2])
    np.testing.assert_allclose(u_star(z, t, h=jnp.zeros(3)), v_star(z, t), rtol=1e-6)
    np.testing.assert_allclose(samplers.jump(u_star, z, jnp.array([0.5, 0.5]), None), z)


def test_r_equals_t_on_the_configured_fraction():
    obj = diffusion.make_objective(dict(name="meanflow", equal_fraction=0.6))
    t, r = jax.jit(obj.sample_t_r, static_argnums=1)(jax.random.key(0), 20000)
    assert bool(jnp.all(t >= r)) and bool(jnp.all((r >= 0) & (t <= 1)))
    assert float(jnp.mean(t == r)) == pytest.approx(0.6, abs=0.015)


def test_stop_gradient_is_on_the_target():
    """d loss / d theta equals the gradient of the same loss with the target a constant."""
    obj = diffusion.make_objective(dict(name="meanflow", adaptive_p=1.0))
    x0 = jax.random.normal(jax.random.key(0), (6, 4))
    noise = jax.random.normal(jax.random.key(1), (6, 4))
    t = jnp.array([0.9, 0.8, 0.6, 0.5, 0.3, 0.2])
    r = jnp.array([0.1, 0.8, 0.2, 0.0, 0.3, 0.1])

    theta = jnp.array([0.3, -0.2, 0.5, 0.1])
    grad = jax.grad(lambda th: obj.loss_tr(toy_model(th), x0, None, t, r, noise)[0])(theta)

    z, v = obj.corrupt(x0, noise, t)
    _, target = meanflow.mean_flow_target(toy_model(theta), z, v, t, r, None)
    target = np.asarray(target)  # a constant: no path back to theta

    def const_loss(th):
        u = toy_model(th)(z, t, None, t - r)
        err = jnp.mean((u - target) ** 2, axis=1)
        weight = jax.lax.stop_gradient(1.0 / (err + obj.adaptive_c))
        return jnp.mean(weight * err)

    np.testing.assert_allclose(grad, jax.grad(const_loss)(theta), rtol=1e-5, atol=1e-7)
    assert np.abs(grad).max() > 0


def test_endpoint_rows_are_exact_for_the_true_average_velocity_and_start_on_time():
    """Exact jumps compose, so u*(eps, 1, 0) is its own two-step jump: zero endpoint error. The
    extra rows leave the MeanFlow rows as they were and count from endpoint_start on."""
    obj = diffusion.make_objective(dict(name="meanflow", endpoint_fraction=0.25, endpoint_start=5))
    plain = diffusion.make_objective(dict(name="meanflow"))
    assert obj.num_endpoint(8) == 2 and plain.num_endpoint(8) == 0
    noise = jax.random.normal(jax.random.key(2), (2, 6))
    np.testing.assert_allclose(obj.endpoint_loss(u_star, noise, None)[1], 0.0, atol=1e-10)

    x0 = S * jax.random.normal(jax.random.key(0), (8, 6))
    rng = jax.random.key(1)
    base, base_per = plain.loss(u_star, x0, None, rng)
    for step in (4, 5):  # exact: the extra rows add nothing before or after the start
        loss, per_example = obj.loss(u_star, x0, None, rng, step=jnp.asarray(step))
        np.testing.assert_allclose(per_example, base_per, rtol=1e-6)
        assert float(loss) == pytest.approx(float(base), abs=1e-6)

    def crude(z, t, cond=None, h=None):  # not self-consistent: u(eps, 1, 0) != its 2 steps
        return u_star(z, t, h=h) + 0.3 * jnp.sin(3 * z) * h[:, None]

    loss_at_step = jax.jit(lambda step: obj.loss(crude, x0, None, rng, step=step)[0])
    before, after = float(loss_at_step(jnp.asarray(4))), float(loss_at_step(jnp.asarray(5)))
    assert before == pytest.approx(float(plain.loss(crude, x0, None, rng)[0]), rel=1e-6)
    end = float(obj.endpoint_loss(crude, jax.random.normal(jax.random.fold_in(rng, 0x656E64),
                                                           (2, 6)), None)[0])
    assert end > 1e-3 and after == pytest.approx(before + 0.25 * end, rel=1e-5)
    heavy = dataclasses.replace(obj, endpoint_weight=10.0)  # scales the rows' term only
    assert float(heavy.loss(crude, x0, None, rng, step=jnp.asarray(5))[0]) == pytest.approx(
        before + 10.0 * 0.25 * end, rel=1e-5)
    with pytest.raises(ValueError, match="endpoint_fraction"):
        diffusion.make_objective(dict(name="meanflow", endpoint_fraction=1.5))
    with pytest.raises(ValueError, match="endpoint_steps"):
        diffusion.make_objective(dict(name="meanflow", endpoint_steps=1))
    with pytest.raises(ValueError, match="endpoint_weight"):
        diffusion.make_objective(dict(name="meanflow", endpoint_weight=-1.0))


@pytest.mark.parametrize("k", [2, 4])
def test_endpoint_target_is_the_models_k_step_sample_under_stop_gradient(k):
    """d loss / d theta equals the gradient toward the constant (eps - k-step sample) / 1."""
    obj = diffusion.make_objective(dict(name="meanflow", endpoint_fraction=1.0, endpoint_steps=k))
    noise = jax.random.normal(jax.random.key(1), (4, 5))

    theta = jnp.array([0.3, -0.2, 0.5, 0.1])
    grad = jax.grad(lambda th: obj.endpoint_loss(toy_model(th), noise, None)[0])(theta)
    target = np.asarray(noise - obj.sample(toy_model(theta), noise, None, steps=k))

    def const_loss(th):
        u = toy_model(th)(noise, jnp.ones(4), None, jnp.ones(4))
        return jnp.mean((u - target) ** 2)

    np.testing.assert_allclose(grad, jax.grad(const_loss)(theta), rtol=1e-5, atol=1e-7)
    assert np.abs(grad).max() > 0


def test_all_r_equal_t_plain_mse_is_flow_matching():
    mf = diffusion.make_objective(dict(name="meanflow", adaptive_p=0.0))
    flow = diffusion.make_objective(dict(name="flow"))
    x0 = jax.random.normal(jax.random.key(0), (4, 3))
    noise = jax.random.normal(jax.random.key(1), (4, 3))
    t = jnp.array([0.9, 0.5, 0.4, 0.1])

    def model(z, t, cond, h=None):
        return jnp.tanh(z) * (1 + t[:, None]) + (0 if h is None else h[:, None])

    np.testing.assert_allclose(mf.loss_tr(model, x0, None, t, t, noise)[0],
                               flow.loss_at(model, x0, None, t, noise)[0], rtol=1e-6)


# ------------------------------------------------------------------------------- the real DiT
def dit_config(attention):
    c = config_lib.base_config()
    config_lib.set_size(c.model, "tiny")
    c.model.interval_input = True
    c.model.attention = attention
    c.model.patch = (1, 2, 2)
    c.model.scan_layers = attention == "chunked"  # the scan path too
    return c.model


@functools.cache
def dit_model(attention):
    return dit.build(dit_config(attention))


def test_interval_input_starts_as_the_flow_model():
    from flax import nnx
    with_h = dit_model("dense")
    cfg = dit_config("dense")
    cfg.interval_input = False
    plain = dit.build(cfg)
    nnx.update(plain, nnx.state(with_h, nnx.Param).filter(lambda path, _: path[0] != "h_embed"))
    x = jax.random.normal(jax.random.key(0), (2, 2, 8, 8, 1))
    t, label = jnp.array([0.3, 0.8]), {"label": jnp.array([1, 2])}
    np.testing.assert_allclose(with_h(x, t, label, h=jnp.array([0.2, 0.5])), plain(x, t, label),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("attention", ["chunked", "dense", "xla"])
def test_attention_backends_support_jvp(attention):
    """The jvp through the DiT matches a central difference (f32, so loosely)."""
    from flax import nnx
    graphdef, state = nnx.split(dit_model(attention))
    state = nnx.to_pure_dict(state)  # plain arrays: fresh Variables at every merge

    def model(*args, **kw):  # merged inside each trace, as steps.train_step does
        return nnx.merge(graphdef, state)(*args, **kw)

    x = jax.random.normal(jax.random.key(0), (2, 2, 8, 8, 1))
    v = jax.random.normal(jax.random.key(1), x.shape)
    t, r = jnp.array([0.7, 0.5]), jnp.array([0.2, 0.5])
    cond = {"label": jnp.array([1, 2])}

    @jax.jit
    def jvp(x, v, t, r):
        return meanflow.mean_flow_target(model, x, v, t, r, cond)

    u, target = jvp(x, v, t, r)
    du_dt = (v - target) / (t - r + 1e-12).reshape(-1, 1, 1, 1, 1)
    eps = 1e-2
    f = jax.jit(lambda x, t: model(x, t, cond, h=t - r))
    fd = (f(x + eps * v, t + eps) - f(x - eps * v, t - eps)) / (2 * eps)
    np.testing.assert_allclose(du_dt[0], fd[0], rtol=0.05, atol=2e-3)
    np.testing.assert_allclose(target[1], v[1], rtol=1e-5)  # r = t: the target is v itself


# ------------------------------------------------------------------ trained-in guidance (w)
def test_trained_in_guidance_mixes_the_unconditional_velocity():
    """Kept conditions: v -> w v + (1 - w) sg(u(z, t, t | null)); dropped ones keep v; w = 1 is
    plain MeanFlow. The mixed velocity is both the jvp tangent and the target's v."""
    null_label = 9

    def model(theta):
        def fn(z, t, cond, h):
            lab = cond["label"][:, None].astype(jnp.float32)
            return theta[0] * z * (1 + lab) + theta[1] * t[:, None] + theta[2] * h[:, None] * z
        return fn

    theta = jnp.array([0.4, -0.3, 0.2])
    z = jax.random.normal(jax.random.key(0), (3, 4))
    v = jax.random.normal(jax.random.key(1), (3, 4))
    t = jnp.array([0.9, 0.6, 0.3])
    cond = {"label": jnp.array([2, null_label, 5])}  # row 1: condition dropped
    null = {"label": jnp.array([null_label])}  # a leading 1 broadcasts, as in samplers.guided
    w = 2.5
    obj = diffusion.make_objective(dict(name="meanflow", guidance=w))
    got = obj.velocity(model(theta), z, v, t, cond, null_cond=null)
    u_uncond = model(theta)(z, t, {"label": jnp.full((3,), null_label)}, jnp.zeros(3))
    want = w * v + (1 - w) * u_uncond
    np.testing.assert_allclose(got[np.array([0, 2])], want[np.array([0, 2])], rtol=1e-6)
    np.testing.assert_allclose(got[1], v[1])
    off = diffusion.make_objective(dict(name="meanflow"))
    assert off.guidance == 1.0
    np.testing.assert_array_equal(off.velocity(model(theta), z, v, t, cond, null_cond=null), v)
    np.testing.assert_array_equal(obj.velocity(model(theta), z, v, t, {}, null_cond=None), v)

    # Stop-gradient: the loss gradient equals the one with the (guided) target a constant.
    x0 = jax.random.normal(jax.random.key(2), (3, 4))
    r = jnp.array([0.2, 0.6, 0.0])
    grad = jax.grad(lambda th: obj.loss_tr(model(th), x0, cond, t, r, v, null_cond=null)[0])(
        theta)
    zt, vt = obj.corrupt(x0, v, t)
    mixed = obj.velocity(model(theta), zt, vt, t, cond, null_cond=null)
    _, target = meanflow.mean_flow_target(model(theta), zt, mixed, t, r, cond)
    target = np.asarray(target)

    def const_loss(th):
        err = jnp.mean((model(th)(zt, t, cond, t - r) - target) ** 2, axis=1)
        return jnp.mean(jax.lax.stop_gradient(1.0 / (err + obj.adaptive_c)) * err)

    np.testing.assert_allclose(grad, jax.grad(const_loss)(theta), rtol=1e-5, atol=1e-7)

    # guidance_mix k: w (1 - k) v + k sg(u(z, t, t | c)) + (1 - w (1 - k) - k) sg(u(... | null))
    k = 0.5
    mix = diffusion.make_objective(dict(name="meanflow", guidance=w, guidance_mix=k))
    got = mix.velocity(model(theta), z, v, t, cond, null_cond=null)
    u_cond = model(theta)(z, t, cond, jnp.zeros(3))
    want = w * (1 - k) * v + k * u_cond + (1 - w * (1 - k) - k) * u_uncond
    np.testing.assert_allclose(got[np.array([0, 2])], want[np.array([0, 2])], rtol=1e-6)
    np.testing.assert_allclose(got[1], v[1])

    # Same fixed point: a model whose u(z, t, t | c) already is w v + (1 - w) u_uncond gets it
    # back as the mixed target.
    def at_fixed_point(z, t, c, h):
        return jnp.where(meanflow.is_null(c, null)[:, None], u_uncond, w * v + (1 - w) * u_uncond)

    np.testing.assert_allclose(mix.velocity(at_fixed_point, z, v, t, cond, null_cond=null)[0],
                               (w * v + (1 - w) * u_uncond)[0], rtol=1e-6)
    with pytest.raises(ValueError, match="guidance_mix"):
        diffusion.make_objective(dict(name="meanflow", guidance_mix=1.0))


# ------------------------------------------------------- jvp through each attention backend
def _attention_jvp(fn):
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 64, 4, 8)) for i in range(3))
    tq, tk, tv = (jax.random.normal(jax.random.key(10 + i), q.shape) for i in range(3))
    return jax.jit(lambda *a: jax.jvp(fn, a[:3], a[3:]))(q, k, v, tq, tk, tv)


@pytest.mark.parametrize("kind", ["chunked_blocks", "xla", "ulysses", "ring"])
def test_attention_jvp_equals_dense(kind):
    """jax.jvp through every attention path that runs on CPU equals the dense reference's: the
    chunked backend with real blocks (lax.map + remat), xla, and both sequence-parallel
    strategies in shard_map."""
    from vidit import sharding
    from vidit.models import attention, context_parallel
    want = _attention_jvp(attention.dense_attention)
    if kind == "chunked_blocks":
        got = _attention_jvp(functools.partial(attention.chunked_attention, chunk=16))
    elif kind == "xla":
        got = _attention_jvp(attention.xla_attention)
    else:
        mesh = sharding.make_mesh(dict(data=2, sequence=4))
        fn = functools.partial(context_parallel.self_attention, backend="dense", strategy=kind)
        with sharding.use(mesh, config_lib.base_config().sharding_rules):
            got = _attention_jvp(fn)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), got, want)


def test_splash_kernel_has_no_jvp_rule():
    """Why the backend table says splash has no JVP: its kernel is a custom_vjp (run here in
    interpret mode). cudnn's fused attention is a custom_vjp too (GPU only, not run here)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash
    from vidit.models import attention
    assert {name for name, b in attention.BACKENDS.items() if not b.jvp} == {"cudnn", "splash"}
    n, h = 128, 2
    kernel = splash.make_splash_mha(splash.MultiHeadMask([splash.FullMask((n, n))] * h),
                                    head_shards=1, q_seq_shards=1, interpret=True)
    q = jax.random.normal(jax.random.key(0), (h, n, 128))
    assert jax.grad(lambda q: kernel(q, q, q).sum())(q).shape == q.shape  # a VJP: yes
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(lambda q: kernel(q, q, q), (q,), (q,))  # a JVP: no


@pytest.mark.parametrize("name", ["meanflow", "distill"])
@pytest.mark.parametrize("backend", ["splash", "cudnn"])
def test_jvp_objectives_refuse_backends_without_jvp(name, backend):
    from vidit import sharding
    c = config_lib.base_config()
    c.objective = diffusion.default_config(name)
    if name == "distill":
        c.objective.teacher_workdir = "/somewhere"  # not read by validate
    c.model.interval_input = True
    c.model.attention = backend
    with pytest.raises(ConfigError,
                       match=rf"config.model.attention='{backend}' has no JVP rule"):
        checks.validate(c, sharding.make_mesh(dict(data=-1)))
    c.objective = diffusion.default_config("shortcut")  # no jvp: only the platform check remains
    with pytest.raises(ConfigError, match="runs on (gpu|tpu) only"):
        checks.validate(c, sharding.make_mesh(dict(data=-1)))


def test_trained_in_guidance_needs_a_conditional_model():
    from vidit import sharding
    c = config_lib.base_config()
    c.objective = diffusion.default_config("meanflow")
    c.objective.guidance = 2.0
    c.model.interval_input = True
    c.train.cond_drop_prob = 0.0
    with pytest.raises(ConfigError, match="cond_drop_prob"):
        checks.validate(c, sharding.make_mesh(dict(data=-1)))


# ------------------------------------------------------------------- the adversarial term
def toy_disc(phi):
    """disc_fn(x, cond, frozen=False) with two parameters; frozen reads them through sg."""
    def fn(x, cond, frozen=False):
        p = jax.lax.stop_gradient(phi) if frozen else phi
        return (p[0] * jnp.tanh(x) + p[1] * x ** 2).reshape(x.shape[0], -1)
    return fn


def test_adversarial_loss_splits_the_players_gradients():
    """The generator's gradient is the hinge g's alone, the discriminator's the hinge d's alone
    (neither player's gradient carries the other's loss)."""
    from vidit.models import discriminator
    theta, phi = jnp.array([0.7, -0.3]), jnp.array([0.4, 0.9])
    noise = jax.random.normal(jax.random.key(0), (3, 5))
    real = jax.random.normal(jax.random.key(1), (3, 5))

    def fake(th):
        return th[0] * noise + th[1] * noise ** 2

    both = lambda th, ph: meanflow.adversarial_loss(toy_disc(ph), fake(th), real, None)  # noqa
    g_theta, g_phi = jax.grad(both, argnums=(0, 1))(theta, phi)
    d = lambda ph: discriminator.d_hinge_loss(toy_disc(ph)(real, None), toy_disc(ph)(fake(theta), None))  # noqa
    g = lambda th: discriminator.g_hinge_loss(toy_disc(phi)(fake(th), None))  # noqa
    np.testing.assert_allclose(g_theta, jax.grad(g)(theta), rtol=1e-6)
    np.testing.assert_allclose(g_phi, jax.grad(d)(phi), rtol=1e-6)
    assert np.abs(g_theta).min() > 0 and np.abs(g_phi).min() > 0


def test_adversarial_term_rides_on_the_endpoint_rows():
    """loss = the endpoint-row loss + share * w * (g + d) on the rows' one-step samples
    eps - u(eps, 1, 0) against the first rows' data, from endpoint_start on (g from
    adversarial_start on); bad settings fail."""
    obj = diffusion.make_objective(dict(name="meanflow", endpoint_fraction=0.25, endpoint_start=5,
                                        adversarial_weight=0.5))
    no_adv = dataclasses.replace(obj, adversarial_weight=0.0)
    assert obj.adversarial and not no_adv.adversarial
    x0 = S * jax.random.normal(jax.random.key(0), (8, 6))
    rng, disc = jax.random.key(1), toy_disc(jnp.array([0.4, 0.9]))
    theta = jnp.array([0.3, -0.2, 0.5, 0.1])
    at = lambda o, step, **kw: float(o.loss(toy_model(theta), x0, None, rng,  # noqa
                                            step=jnp.asarray(step), **kw)[0])
    assert at(obj, 4, disc_fn=disc) == pytest.approx(at(no_adv, 4), rel=1e-6)  # before the start
    eps = jax.random.normal(jax.random.fold_in(rng, 0x656E64), (2, 6))
    one_step = eps - toy_model(theta)(eps, jnp.ones(2), None, jnp.ones(2))
    adv = float(meanflow.adversarial_loss(disc, one_step, x0[:2], None))  # the first rows' data
    assert abs(adv) > 1e-3
    assert at(obj, 5, disc_fn=disc) == pytest.approx(at(no_adv, 5) + 0.25 * 0.5 * adv, rel=1e-5)
    d_only = float(meanflow.adversarial_loss(disc, one_step, x0[:2], None, 0.0))
    assert abs(d_only - adv) > 1e-3  # until adversarial_start the discriminator trains alone
    late = dataclasses.replace(obj, adversarial_start=6)
    assert at(late, 5, disc_fn=disc) == pytest.approx(at(no_adv, 5) + 0.25 * 0.5 * d_only,
                                                      rel=1e-5)
    with pytest.raises(ValueError, match="disc_fn"):
        obj.loss(toy_model(theta), x0, None, rng)
    with pytest.raises(ValueError, match="endpoint_fraction"):
        diffusion.make_objective(dict(name="meanflow", adversarial_weight=1.0))
    with pytest.raises(ValueError, match="adversarial_weight"):
        diffusion.make_objective(dict(name="meanflow", endpoint_fraction=0.25,
                                      adversarial_weight=-1.0))


def _score_draws(rng, shape, t_min=0.2, t_max=0.6):
    """The re-noising time and noise score_loss draws from ``rng``."""
    t_rng, noise_rng = jax.random.split(rng)
    t = jax.random.uniform(t_rng, shape[:1], jnp.float32, t_min, t_max)
    return t, jax.random.normal(noise_rng, shape, jnp.float32)


def test_score_term_regresses_on_the_exact_posterior_mean_for_gaussian_data():
    """With the exact velocity of N(0, S^2 I) data, the denoised estimate z - t v*(z, t) is the
    posterior mean E[x | z] = z (1 - t) S^2 / a(t)^2, and the term is the mean square distance
    of the one-step samples to it."""
    obj = diffusion.make_objective(dict(name="meanflow", endpoint_fraction=0.25, score_weight=1.0))
    x = jax.random.normal(jax.random.key(0), (3, 6))
    rng = jax.random.key(1)
    t, noise = _score_draws(rng, x.shape)
    z = (1 - t[:, None]) * x + t[:, None] * noise
    posterior_mean = z * (1 - t[:, None]) * S**2 / a(t[:, None]) ** 2
    want = float(jnp.mean((x - posterior_mean) ** 2))
    assert float(obj.score_loss(u_star, x, None, rng)) == pytest.approx(want, rel=1e-5)
    assert want > 0.1


def test_score_term_gradient_reaches_the_model_through_the_sample_only():
    """d loss / d theta equals the gradient of |x(theta) - C|^2 with C the denoised estimate
    computed beforehand: the denoiser (the same parameters) is a constant of the loss. With
    score_guidance g and a null condition the estimate uses v_null + g (v_cond - v_null)."""
    theta = jnp.array([0.3, -0.2, 0.5, 0.1])
    eps = jax.random.normal(jax.random.key(0), (4, 5))
    cond, null = jnp.array([1.0, 0.0, 2.0, -1.0]), jnp.zeros((1,))
    rng = jax.random.key(1)

    def model(th):
        base = toy_model(th)
        return lambda z, t, c, h: base(z, t, None, h) + th[3] * jnp.cos(z) * c[:, None]

    def sample(th):
        return eps - model(th)(eps, jnp.ones(4), cond, jnp.ones(4))

    t, noise = _score_draws(rng, eps.shape)
    z = (1 - t[:, None]) * sample(theta) + t[:, None] * noise
    for g in (1.0, 2.5):
        obj = diffusion.make_objective(dict(name="meanflow", endpoint_fraction=0.25,
                                            score_weight=1.0, score_guidance=g))
        zero = jnp.zeros(4)
        v_c, v_u = model(theta)(z, t, cond, zero), model(theta)(z, t, jnp.zeros(4), zero)
        v = v_u + g * (v_c - v_u)
        const = np.asarray(z - t[:, None] * v)
        grad = jax.grad(lambda th: obj.score_loss(model(th), sample(th), cond, rng,
                                                  null_cond=null))(theta)
        want = jax.grad(lambda th: jnp.mean((sample(th) - const) ** 2))(theta)
        np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-7)
        assert np.abs(grad).max() > 0


def test_score_term_rides_on_the_endpoint_rows():
    """loss = the endpoint-row loss + share * w * score term on the rows' one-step samples, from
    endpoint_start on; bad settings fail."""
    obj = diffusion.make_objective(dict(name="meanflow", endpoint_fraction=0.25, endpoint_start=5,
                                        score_weight=3.0))
    no_score = dataclasses.replace(obj, score_weight=0.0)
    x0 = S * jax.random.normal(jax.random.key(0), (8, 6))
    rng, theta = jax.random.key(1), jnp.array([0.3, -0.2, 0.5, 0.1])
    at = lambda o, step: float(o.loss(toy_model(theta), x0, None, rng,  # noqa: E731
                                      step=jnp.asarray(step))[0])
    assert at(obj, 4) == pytest.approx(at(no_score, 4), rel=1e-6)  # before the start
    eps = jax.random.normal(jax.random.fold_in(rng, 0x656E64), (2, 6))
    one_step = eps - toy_model(theta)(eps, jnp.ones(2), None, jnp.ones(2))
    score = float(obj.score_loss(toy_model(theta), one_step, None,
                                 jax.random.fold_in(rng, 0x73636F)))
    assert score > 1e-3
    assert at(obj, 5) == pytest.approx(at(no_score, 5) + 0.25 * 3.0 * score, rel=1e-5)
    for bad, match in [(dict(score_weight=1.0), "endpoint_fraction"),
                       (dict(endpoint_fraction=0.25, score_weight=-1.0), "score_weight"),
                       (dict(score_t_min=0.6, score_t_max=0.5), "score_t_min")]:
        with pytest.raises(ValueError, match=match):
            diffusion.make_objective(dict(name="meanflow", **bad))


def test_dit_discriminator_is_class_conditional_and_freezes():
    """disc_width > 0 adds a patch discriminator under 'disc' (the DiT's output is unchanged);
    its label projection starts at zero; frozen=True passes no gradient to its parameters."""
    from flax import nnx
    cfg = dit_config("dense")
    cfg.disc_width, cfg.disc_layers = 4, 2
    model = dit.build(cfg)
    plain = dit_model("dense")
    x = jax.random.normal(jax.random.key(0), (2, 2, 8, 8, 1))
    t, label = jnp.array([0.3, 0.8]), {"label": jnp.array([1, 2])}
    np.testing.assert_array_equal(model(x, t, label, h=t), plain(x, t, label, h=t))
    logits = model.discriminate(x, label)
    assert logits.shape[0] == 2 and logits.shape[-1] == 1
    np.testing.assert_array_equal(logits, model.discriminate(x, {"label": jnp.array([3, 4])}))

    graphdef, params = nnx.split(model, nnx.Param)
    flat = dict(nnx.to_flat_state(params))
    embed_key = next(k for k in flat if k[0] == "disc" and k[-1] == "class_embed")

    def score(p, frozen, lab):
        m = nnx.merge(graphdef, p)
        return jnp.sum(m.discriminate(x, {"label": lab}, frozen=frozen))

    live = jax.grad(score)(params, False, label["label"])
    frozen = jax.grad(score)(params, True, label["label"])
    live_disc = [np.abs(v.value).max() for k, v in nnx.to_flat_state(live) if k[0] == "disc"]
    assert max(live_disc) > 0
    assert all(np.abs(v.value).max() == 0 for _, v in nnx.to_flat_state(frozen))
    # Nonzero rows: now the label changes the logits.
    flat[embed_key].value = jax.random.normal(jax.random.key(3), flat[embed_key].value.shape)
    model = nnx.merge(graphdef, nnx.from_flat_state(flat))
    assert np.abs(model.discriminate(x, label)
                  - model.discriminate(x, {"label": jnp.array([3, 4])})).max() > 1e-3
    with pytest.raises(ConfigError, match="disc_width"):
        plain.discriminate(x, label)


def test_adversarial_weight_needs_a_discriminator():
    from vidit import sharding
    c = config_lib.base_config()
    c.objective = diffusion.default_config("meanflow")
    c.objective.endpoint_fraction, c.objective.adversarial_weight = 0.25, 0.1
    c.model.interval_input = True
    c.train.cond_drop_prob = 0.1
    with pytest.raises(ConfigError, match="disc_width"):
        checks.validate(c, sharding.make_mesh(dict(data=-1)))

