"""Diffusion objectives checked against closed forms (Gaussian data has exact denoisers)."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vidit.diffusion import (FlowObjective, VPObjective, default_config, guided,
                             make_objective, shift_for_tokens, shift_time)

S = 0.5  # data std of the Gaussian toy data x0 ~ N(0, S^2 I)
SHAPE = (2, 3, 4, 4, 2)  # [B, T, H, W, C]


def _bcast(t, x):
    return t.reshape((-1,) + (1,) * (x.ndim - 1))


def flow_exact_velocity(z, t, cond=None):
    """E[eps - x0 | x_t = z] for x0 ~ N(0, S^2): z (t - (1 - t) S^2) / a(t)^2."""
    t = _bcast(t, z)
    a2 = (1 - t) ** 2 * S**2 + t**2
    return z * (t - (1 - t) * S**2) / a2


def vp_exact_output(obj):
    """The exact eps- or v-predictor of obj for x0 ~ N(0, S^2)."""
    def fn(x, t, cond=None):
        ab = _bcast(obj.alpha_bar(t), x)
        var = ab * S**2 + 1 - ab
        eps = x * jnp.sqrt(1 - ab) / var
        x0 = x * jnp.sqrt(ab) * S**2 / var
        return eps if obj.prediction == "eps" else jnp.sqrt(ab) * eps - jnp.sqrt(1 - ab) * x0
    return fn


def _noise(seed=0, shape=SHAPE):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


# ----------------------------------------------------------------------------- rectified flow
def test_flow_corrupt_identities():
    obj = FlowObjective()
    x0, eps = _noise(1), _noise(2)
    t = jnp.array([0.0, 1.0])
    x_t, v = obj.corrupt(x0, eps, t)
    np.testing.assert_allclose(x_t[0], x0[0])
    np.testing.assert_allclose(x_t[1], eps[1])
    np.testing.assert_allclose(v, eps - x0, rtol=1e-6)
    t = jnp.array([0.3, 0.8])
    x_t, v = obj.corrupt(x0, eps, t)
    x0_hat, eps_hat = obj.predict_x0_eps(v, x_t, t)
    np.testing.assert_allclose(x0_hat, x0, atol=1e-5)
    np.testing.assert_allclose(eps_hat, eps, atol=1e-5)
    # Low-precision data: model input keeps its dtype, target stays float32.
    x_t, v = obj.corrupt(x0.astype(jnp.bfloat16), eps, t)
    assert x_t.dtype == jnp.bfloat16 and v.dtype == jnp.float32


def test_shift_time_and_shift_for_tokens():
    t = np.linspace(0, 1, 101)
    np.testing.assert_array_equal(shift_time(t, 1.0), t)
    for a in (0.5, 3.0, 7.0):
        s = shift_time(t, a)
        assert s[0] == 0.0 and abs(s[-1] - 1.0) < 1e-12
        assert np.all(np.diff(s) > 0)
        assert np.all((s[1:-1] > t[1:-1]) == (a > 1))  # a > 1 pushes towards noise
    assert shift_for_tokens(4096, 1024) == pytest.approx(2.0)
    assert shift_for_tokens(4096, 1024, num_latent_frames=9) == pytest.approx(6.0)


def test_flow_time_sampling_statistics():
    rng = jax.random.key(3)
    t = np.asarray(FlowObjective(logit_mean=0.3, logit_std=0.8).sample_t(rng, 100_000))
    assert t.dtype == np.float32 and t.min() > 0 and t.max() < 1
    logit = np.log(t) - np.log1p(-t)
    assert abs(logit.mean() - 0.3) < 0.02 and abs(logit.std() - 0.8) < 0.02
    u = np.asarray(FlowObjective(time_sampling="uniform").sample_t(rng, 100_000))
    assert abs(u.mean() - 0.5) < 0.01 and abs(u.var() - 1 / 12) < 0.005
    a = 3.0  # the shift is applied on top: median sigmoid(0) = 0.5 -> a / (1 + a)
    ts = np.asarray(FlowObjective(shift=a).sample_t(rng, 100_000))
    assert abs(np.median(ts) - a / (1 + a)) < 0.01


def test_stratified_times_put_one_draw_in_each_quantile_bin():
    """Stratified: each of the B equal-probability bins of the time distribution gets exactly
    one of the batch's B times (i.i.d. draws leave bins empty); over batches, the distribution
    is the unstratified one."""
    from scipy import stats
    logit_normal_cdf = lambda t: stats.norm.cdf((np.log(t / (1 - t)) - 0.3) / 0.8)  # noqa: E731
    for sampling, cdf in (("logit_normal", logit_normal_cdf), ("uniform", lambda t: t)):
        obj = FlowObjective(time_sampling=sampling, logit_mean=0.3, logit_std=0.8, stratified=True)
        draws = [np.asarray(obj.sample_t(jax.random.key(i), 8)) for i in range(400)]
        for t in draws[:20]:
            np.testing.assert_array_equal(np.sort(np.floor(cdf(t.astype(np.float64)) * 8)),
                                          np.arange(8))
        assert len({tuple(np.argsort(t)) for t in draws[:20]}) > 1  # the bins' order is random
        all_t = np.concatenate(draws)
        assert stats.kstest(cdf(all_t.astype(np.float64)), "uniform").pvalue > 1e-3
    iid = np.asarray(FlowObjective().sample_t(jax.random.key(0), 8))
    assert len(set(np.floor(stats.norm.cdf(np.log(iid / (1 - iid))) * 8))) < 8


def test_flow_loss_at_exact_velocity_is_analytic_minimum():
    obj = FlowObjective()
    shape = (8, 4, 16, 16, 4)
    x0, eps = S * _noise(4, shape), _noise(5, shape)
    t = obj.eval_times(8)
    np.testing.assert_allclose(t, (np.arange(8) + 0.5) / 8)
    loss, per_example = obj.loss_at(flow_exact_velocity, x0, None, t, eps)
    # Var(v | z) = Var(v) - Cov(v, z)^2 / Var(z), per dimension.
    tn = np.asarray(t, np.float64)
    a2 = (1 - tn) ** 2 * S**2 + tn**2
    expected = (1 + S**2) - (tn - (1 - tn) * S**2) ** 2 / a2
    assert per_example.shape == (8,)
    np.testing.assert_allclose(per_example, expected, rtol=0.06)
    assert float(loss) == pytest.approx(expected.mean(), rel=0.02)
    # Any other predictor does worse.
    worse, _ = obj.loss_at(lambda z, t, c: 0.9 * flow_exact_velocity(z, t), x0, None, t, eps)
    assert float(worse) > float(loss)


@pytest.mark.parametrize("sampler,shift,tol", [("heun", 1.0, 1e-3), ("heun", 3.0, 1e-3),
                                               ("euler", 1.0, 0.05)])
def test_flow_sampler_maps_noise_to_gaussian_data(sampler, shift, tol):
    # The exact flow of Gaussian data is x(t) = a(t) x(1), so x(0) = S * noise for any schedule.
    obj = FlowObjective(shift=shift, sampler=sampler)
    noise = _noise(6)
    x0 = obj.sample(flow_exact_velocity, noise, None, steps=50)
    assert x0.shape == noise.shape and x0.dtype == jnp.float32
    np.testing.assert_allclose(x0, S * noise, rtol=tol, atol=1e-6)


def test_loss_is_differentiable_under_jit_with_static_objective():
    obj = make_objective(default_config("flow"))
    x0 = _noise(7)
    cond = jnp.array([1.0, 2.0])

    @jax.jit
    def step(w):
        def loss_fn(w):
            fn = lambda x, t, c: w * x + _bcast(t * c, x)
            return obj.loss(fn, x0, cond, jax.random.key(0))[0]
        return jax.value_and_grad(loss_fn)(w)

    loss, grad = step(jnp.float32(0.1))
    assert np.isfinite(loss) and np.isfinite(grad) and grad != 0

    @functools.partial(jax.jit, static_argnums=0)
    def val(o, x0):
        return o.loss_at(lambda x, t, c: x, x0, None, o.eval_times(2), x0)[1]

    assert val(obj, x0).shape == (2,) and val(VPObjective(), x0).shape == (2,)


# ------------------------------------------------------------------------------ VP diffusion
def test_vp_schedules():
    lin = VPObjective().alphas_cumprod()
    assert lin.shape == (1001,) and lin[0] == 1.0
    assert np.all(np.diff(lin) < 0)
    betas = 1 - lin[1:] / lin[:-1]
    np.testing.assert_allclose([betas[0], betas[-1]], [1e-4, 0.02], rtol=1e-9)
    assert 3e-5 < lin[-1] < 5e-5  # the DDPM linear schedule's well-known abar_T ~ 4e-5
    cos = VPObjective(schedule="cosine").alphas_cumprod()
    assert np.all(np.diff(cos) < 0) and 0 < cos[-1] < 1e-6 and cos[1] > 0.9999
    for schedule, base in (("linear", lin), ("cosine", cos)):
        z = VPObjective(schedule=schedule, prediction="v", zero_terminal_snr=True).alphas_cumprod()
        assert z[-1] == 0.0 and z[0] == 1.0
        assert np.all(np.diff(z) < 0)
        assert z[1] == pytest.approx(base[1], rel=1e-12)  # first step unchanged


def test_vp_time_convention():
    obj = VPObjective(num_train_steps=100)
    t = np.asarray(obj.sample_t(jax.random.key(0), 10_000))
    k = t * 100
    np.testing.assert_allclose(k, np.round(k), atol=1e-4)
    assert k.min() >= 1 - 1e-4 and k.max() <= 100 + 1e-4 and len(np.unique(np.round(k))) == 100
    np.testing.assert_array_equal(obj.step_index(jnp.array([0.0, 0.013, 1.0])), [0, 1, 100])
    np.testing.assert_allclose(obj.alpha_bar(jnp.array([0.0, 1.0])),
                               obj.alphas_cumprod()[[0, 100]], rtol=1e-6)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_vp_eps_and_v_targets_consistent(schedule):
    eps_obj = VPObjective(schedule=schedule, prediction="eps")
    v_obj = VPObjective(schedule=schedule, prediction="v")
    x0, eps = _noise(8), _noise(9)
    t = jnp.array([0.05, 0.9])
    x_t, eps_target = eps_obj.corrupt(x0, eps, t)
    x_t2, v_target = v_obj.corrupt(x0, eps, t)
    np.testing.assert_allclose(x_t, x_t2)
    np.testing.assert_allclose(eps_target, eps)
    for obj, target in ((eps_obj, eps_target), (v_obj, v_target)):
        x0_hat, eps_hat = obj.predict_x0_eps(target, x_t, t)
        np.testing.assert_allclose(x0_hat, x0, atol=1e-4)
        np.testing.assert_allclose(eps_hat, eps, atol=1e-4)
    # Zero terminal SNR: at t = 1 the input is pure noise and v = -x0 still recovers x0.
    z = VPObjective(schedule=schedule, prediction="v", zero_terminal_snr=True)
    x_t, v = z.corrupt(x0, eps, jnp.array([1.0, 1.0]))
    np.testing.assert_allclose(x_t, eps)
    np.testing.assert_allclose(v, -x0)
    x0_hat, _ = z.predict_x0_eps(v, x_t, jnp.array([1.0, 1.0]))
    np.testing.assert_allclose(x0_hat, x0)


VP_VARIANTS = [dict(prediction="eps"), dict(prediction="v"),
               dict(prediction="v", zero_terminal_snr=True, schedule="cosine")]


@pytest.mark.parametrize("kw", VP_VARIANTS)
def test_ddim_gaussian_matches_closed_form(kw):
    obj = VPObjective(**kw)
    noise = _noise(10)
    # Exact denoiser -> x0_hat and eps_hat are multiples of x, so DDIM is a scalar recursion.
    steps = 20
    ks = obj.sample_steps(steps)
    ab = obj.alphas_cumprod()[ks]
    c = 1.0
    for a, a_next in zip(ab[:-1], ab[1:]):
        var = a * S**2 + 1 - a
        c *= (np.sqrt(a_next * a) * S**2 + np.sqrt((1 - a_next) * (1 - a))) / var
    x0 = obj.sample(vp_exact_output(obj), noise, None, steps=steps)
    np.testing.assert_allclose(x0, c * noise, rtol=1e-4, atol=1e-6)
    # DDIM is first order in its steps: with all 1000 it reproduces the data std.
    x0 = obj.sample(vp_exact_output(obj), noise, None, steps=1000)
    np.testing.assert_allclose(x0, S * noise, rtol=0.01, atol=1e-6)


@pytest.mark.parametrize("kw", VP_VARIANTS)
def test_ddim_one_step_with_exact_x0_returns_x0(kw):
    obj = VPObjective(**kw)
    data, noise = _noise(11), _noise(12)

    def oracle(x, t, cond):  # knows x0, so its output is the exact target for this x
        ab = _bcast(obj.alpha_bar(t), x)
        eps = noise if obj.zero_terminal_snr else (x - jnp.sqrt(ab) * data) / jnp.sqrt(1 - ab)
        return eps if obj.prediction == "eps" else jnp.sqrt(ab) * eps - jnp.sqrt(1 - ab) * data

    x0 = obj.sample(oracle, noise, None, steps=1)
    np.testing.assert_allclose(x0, data, atol=2e-3 if obj.prediction == "eps" else 1e-5)


# ------------------------------------------------------------------- classifier-free guidance
def _const_model(x, t, cond):
    """Output = cond value broadcast: cond/uncond outputs are known exactly."""
    return jnp.zeros_like(x) + _bcast(cond["y"], x)


def test_guided_combination_and_guidance_one():
    x, t = _noise(13), jnp.array([0.5, 0.5])
    cond, null = {"y": jnp.array([2.0, 5.0])}, {"y": jnp.array([1.0])}  # null broadcasts
    out = guided(_const_model, cond, null, 3.0)(x, t)
    expected = 1.0 + 3.0 * (jnp.array([2.0, 5.0]) - 1.0)
    np.testing.assert_allclose(out, jnp.zeros_like(x) + _bcast(expected, x))
    np.testing.assert_allclose(guided(_const_model, cond, null, 1.0)(x, t), _const_model(x, t, cond))
    # A traced guidance of 1 takes the batched path and still equals the conditional model.
    traced = jax.jit(lambda w: guided(_const_model, cond, null, w)(x, t))(1.0)
    np.testing.assert_allclose(traced, _const_model(x, t, cond))


@pytest.mark.parametrize("obj,calls_per_step", [(FlowObjective(sampler="euler"), 1),
                                                (FlowObjective(sampler="heun"), 2),
                                                (VPObjective(prediction="v"), 1)])
def test_cfg_is_one_batched_call_per_evaluation(obj, calls_per_step):
    seen = []

    def model(x, t, cond):
        seen.append((x.shape[0], t.shape[0], cond["y"].shape[0]))
        return _const_model(x, t, cond)

    noise = _noise(14)
    cond, null = {"y": jnp.array([2.0, 5.0])}, {"y": jnp.zeros((2,))}
    with jax.disable_jit():  # loops run in Python, so every model call is counted
        x0 = obj.sample(model, noise, cond, steps=3, null_cond=null, guidance=4.0)
    assert seen == [(4, 4, 4)] * (3 * calls_per_step)
    if isinstance(obj, FlowObjective):  # constant velocity u + w (c - u): x0 = noise - v
        np.testing.assert_allclose(x0, noise - _bcast(4.0 * jnp.array([2.0, 5.0]), noise), rtol=1e-5)
    seen.clear()
    with jax.disable_jit():  # guidance 1: plain conditional calls at batch B
        obj.sample(model, noise, cond, steps=3, null_cond=null, guidance=1.0)
    assert seen == [(2, 2, 2)] * (3 * calls_per_step)


# ------------------------------------------------------------------------------ determinism
def _tiny_model(x, t, cond):
    return jnp.tanh(x * (1 + _bcast(t, x))) + 0.1 * _bcast(cond, x)


@pytest.mark.parametrize("obj", [FlowObjective(sampler="heun", shift=2.0), VPObjective(prediction="v")])
def test_sampling_deterministic_and_jit_matches_eager(obj):
    noise, cond = _noise(15), jnp.array([1.0, -1.0])
    kwargs = dict(steps=6, null_cond=jnp.zeros((2,)), guidance=2.5)
    a = obj.sample(_tiny_model, noise, cond, **kwargs)
    b = obj.sample(_tiny_model, noise, cond, **kwargs)
    np.testing.assert_array_equal(a, b)
    jitted = jax.jit(lambda n, c: obj.sample(_tiny_model, n, c, **kwargs))
    np.testing.assert_allclose(jitted(noise, cond), a, rtol=1e-5, atol=1e-5)
    assert np.all(np.isfinite(a))


# ---------------------------------------------------------------------------------- factory
def test_factory_defaults_and_errors():
    for name, cls in (("flow", FlowObjective), ("vp", VPObjective)):
        cfg = default_config(name)
        assert isinstance(cfg, ml_collections.ConfigDict) and cfg.name == name
        obj = make_objective(cfg)
        assert obj == cls() and hash(obj) == hash(cls())
    cfg = default_config("flow")
    cfg.shift = 3  # an int in a config file is coerced to the field's float
    assert make_objective(cfg).shift == 3.0 and isinstance(make_objective(cfg).shift, float)
    assert dataclasses.replace(make_objective(cfg), shift=2.0).shift == 2.0
    with pytest.raises(ValueError, match="flow.*vp"):
        make_objective({"name": "edm"})
    with pytest.raises(ValueError, match="flow.*vp"):
        default_config("edm")
    with pytest.raises(ValueError, match="unknown fields"):
        make_objective({"name": "flow", "shfit": 2.0})
    with pytest.raises(ValueError, match="euler"):
        make_objective({"name": "flow", "sampler": "dpm"})
    with pytest.raises(ValueError, match="cosine"):
        make_objective({"name": "vp", "schedule": "sigmoid"})
    with pytest.raises(ValueError, match="zero_terminal_snr"):
        make_objective({"name": "vp", "zero_terminal_snr": True})
    with pytest.raises(ValueError, match="heun"):
        FlowObjective().sample(_tiny_model, _noise(), None, steps=2, sampler="rk4")
    with pytest.raises(ValueError, match="steps"):
        VPObjective(num_train_steps=10).sample(_tiny_model, _noise(), None, steps=11)
