"""Shortcut models (Frans et al. 2024, "One Step Diffusion via Shortcut Models"): the checks of
the self-consistency target.

Closed forms as in test_meanflow.py: for Gaussian data x ~ N(0, S^2 I) the exact shortcut is the
average velocity s*(z, t, d) = u*(z, t, t - d) = z (1 - a(t - d)/a(t)) / d; for a single data point
x* every path is a straight line and s(z, t, d) = (z - x*) / t for every d.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import moving_digits
from vidit import diffusion, sharding, steps
from vidit.diffusion import shortcut
from vidit.train_state import Setup

from tests.test_meanflow import S, u_star


def objective(**kw):
    return diffusion.make_objective(dict(name="shortcut", **kw))


def test_config_round_trip_and_validation():
    obj = diffusion.make_objective(diffusion.default_config("shortcut"))
    assert isinstance(obj, shortcut.ShortcutObjective) and obj.needs.target == "ema"
    assert obj.needs.interval_input and not obj.needs.jvp
    with pytest.raises(ValueError, match="power of two"):
        objective(max_steps=100)
    with pytest.raises(ValueError, match="consistency_fraction"):
        objective(consistency_fraction=1.5)


def test_drawn_steps_lie_on_the_power_of_two_grid():
    obj = objective(max_steps=16)
    t, d = obj.sample_t_d(jax.random.key(0), 4000)
    t, d = np.asarray(t), np.asarray(d)
    assert set(np.round(1 / d).astype(int)) == {1, 2, 4, 8}  # full steps 1 .. 2/max_steps
    np.testing.assert_allclose(np.round(t / d), t / d, atol=1e-6)  # t on the d-step grid
    assert (t - d >= -1e-7).all() and (t <= 1).all()
    assert np.isclose(t[d == 1], 1).all()
    # The finest half step (1/max_steps) is the flow model: step input 0.
    np.testing.assert_array_equal(obj.step_input(jnp.array([1 / 16, 1 / 8, 0.0])), [0, 1 / 8, 0])
    assert obj.num_consistency(8) == 1
    assert objective(consistency_fraction=0.25).num_consistency(8) == 2


def test_straight_line_model_is_its_own_consistency_target_and_has_zero_loss():
    """One data point x*: s = (z - x*)/t is exact, so two half steps average to s itself and
    both the flow and the self-consistency parts of the loss vanish."""
    x_star = jax.random.normal(jax.random.key(0), (1, 5))

    def straight(z, t, cond, h=None):
        return (z - x_star) / t[:, None]

    obj = objective()
    z = jax.random.normal(jax.random.key(1), (4, 5))
    t, d = jnp.array([1.0, 0.75, 0.5, 0.25]), jnp.array([1.0, 0.25, 0.5, 0.125])
    np.testing.assert_allclose(obj.consistency_target(straight, z, t, d, None),
                               straight(z, t, None), rtol=1e-5, atol=1e-6)
    x0 = jnp.broadcast_to(x_star, (8, 5))
    noise = jax.random.normal(jax.random.key(2), (8, 5))
    t8 = jnp.array([1.0, 0.75, 0.5, 0.25, 0.9, 0.6, 0.3, 0.1])
    d8 = jnp.array([1.0, 0.25, 0.5, 0.125, 0, 0, 0, 0])
    loss, per_example = obj.loss_td(straight, x0, None, t8, d8, noise, 4)
    np.testing.assert_allclose(per_example, 0.0, atol=1e-10)


def test_gaussian_exact_shortcut_has_zero_consistency_loss():
    """The exact average velocity of N(0, S^2) data: chained exact half steps reproduce the full
    step (signs, time direction, the 1/2 of the average). Flow rows keep the variance of v."""
    with jax.enable_x64(True):
        obj = objective()
        x0 = S * jax.random.normal(jax.random.key(0), (8, 6), jnp.float64)
        noise = jax.random.normal(jax.random.key(1), (8, 6), jnp.float64)
        t = jnp.array([1.0, 0.5, 0.75, 0.25, 0.125, 0.6, 0.4, 0.2], jnp.float64)
        d = jnp.array([1.0, 0.5, 0.25, 0.25, 0.125, 0, 0, 0], jnp.float64)
        _, per_example = obj.loss_td(u_star, x0, None, t, d, noise, 5)
        np.testing.assert_allclose(per_example[:5], 0.0, atol=1e-12)  # the loss is float32
        assert (per_example[5:] > 1e-3).all()
        # and the target really is the full-step average velocity, not a half step's
        z, _ = obj.corrupt(x0, noise, t)
        np.testing.assert_allclose(obj.consistency_target(u_star, z[:5], t[:5], d[:5], None),
                                   u_star(z[:5], t[:5], h=d[:5]), rtol=1e-10)


def test_targets_come_from_target_fn_with_stop_gradient():
    """d loss / d theta equals the gradient with the target precomputed as a constant, both when
    the targets come from the online model and when they come from other (EMA) parameters."""
    obj = objective()
    x0 = jax.random.normal(jax.random.key(0), (6, 4))
    noise = jax.random.normal(jax.random.key(1), (6, 4))
    t = jnp.array([1.0, 0.5, 0.75, 0.3, 0.6, 0.2])
    d = jnp.array([1.0, 0.5, 0.25, 0, 0, 0])

    def model(theta):
        def fn(z, t, cond, h):
            tt, hh = t[:, None], h[:, None]
            return theta[0] * z + theta[1] * tt * z ** 2 + theta[2] * hh * jnp.sin(z) + theta[3]
        return fn

    theta, ema = jnp.array([0.3, -0.2, 0.5, 0.1]), jnp.array([0.25, -0.1, 0.4, 0.0])
    z, v = obj.corrupt(x0, noise, t)
    for target_theta in (None, ema):
        target_fn = None if target_theta is None else model(target_theta)
        grad = jax.grad(lambda th: obj.loss_td(model(th), x0, None, t, d, noise, 3,
                                               target_fn=target_fn)[0])(theta)
        source = model(theta if target_theta is None else target_theta)
        target = np.concatenate([np.asarray(obj.consistency_target(source, z[:3], t[:3], d[:3],
                                                                   None)), np.asarray(v[3:])])

        def const_loss(th):
            out = model(th)(z, t, None, obj.step_input(d))
            return jnp.mean(jnp.mean((out - target) ** 2, axis=1))

        np.testing.assert_allclose(grad, jax.grad(const_loss)(theta), rtol=1e-5, atol=1e-7)
        assert np.abs(grad).max() > 0
    # The EMA targets differ from the online ones: target_fn is really used.
    online = obj.loss_td(model(theta), x0, None, t, d, noise, 3)[1]
    with_ema = obj.loss_td(model(theta), x0, None, t, d, noise, 3, target_fn=model(ema))[1]
    assert not np.allclose(online[:3], with_ema[:3])
    np.testing.assert_allclose(online[3:], with_ema[3:])  # flow rows ignore the targets


def test_one_two_four_step_sampling_with_the_exact_shortcut():
    obj = objective()
    noise = jax.random.normal(jax.random.key(0), (20000, 8))
    one = obj.sample(u_star, noise, None, steps=1)
    assert float(jnp.var(one)) == pytest.approx(S**2, rel=0.02)
    for steps_ in (2, 4):  # exact jumps compose: d = 1/steps gives the same samples
        np.testing.assert_allclose(obj.sample(u_star, noise, None, steps=steps_), one,
                                   rtol=1e-5, atol=1e-5)

    def echo_h(z, t, cond, h):  # outputs its step input: each jump subtracts d * h
        return jnp.broadcast_to(h[:, None], z.shape)

    x = noise[:2]
    np.testing.assert_allclose(obj.sample(echo_h, x, None, steps=1), x - 1.0, atol=1e-6)
    np.testing.assert_allclose(obj.sample(echo_h, x, None, steps=4), x - 4 * 0.25 * 0.25,
                               atol=1e-6)  # the model is told d = 1/steps
    # Below the finest trained step the model is the flow model (step input 0).
    np.testing.assert_allclose(objective(max_steps=2).sample(echo_h, x, None, steps=4), x)


def test_train_step_binds_targets_to_the_ema_params(data_dir):
    """Through steps.train_step: the shortcut loss reads state.ema_params, the flow loss not."""
    losses = {}
    for name in ("shortcut", "flow"):
        c = moving_digits.get_config(f"smoke,objective={name}")
        c.data.data_dir = data_dir
        c.model.interval_input = True  # the same network for both
        if name == "shortcut":
            c.objective.consistency_fraction = 0.5
        mesh = sharding.make_mesh(dict(fsdp=1), jax.devices()[:1])
        setup = Setup(c, mesh)
        obj = diffusion.make_objective(c.objective)
        state = setup.init()
        params = jax.tree.map(lambda p: p + 0.02, state.params)  # a non-zero output layer
        step = jax.jit(functools.partial(steps.train_step, setup, obj))
        rng = np.random.default_rng(0)
        batch = {"video": rng.uniform(-1, 1, (8, 8, 32, 32, 1)).astype(np.float32),
                 "label": np.arange(8, dtype=np.int32)}
        for ema_shift in (0.0, 0.05):
            s = state.replace(params=params,
                              ema_params=jax.tree.map(lambda p: p + ema_shift, params))
            losses[name, ema_shift] = float(step(s, batch)[1]["loss"])
    assert losses["shortcut", 0.0] != pytest.approx(losses["shortcut", 0.05], rel=1e-6)
    assert losses["flow", 0.0] == losses["flow", 0.05]
