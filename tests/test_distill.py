"""Consistency distillation: a MeanFlow student of a frozen (optionally guided) flow teacher."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import moving_digits
from vidit import diffusion, export, run as run_lib, sharding, teacher as teacher_lib
from vidit.diffusion import distill, meanflow
from vidit.train_state import Setup

from tests.test_meanflow import u_star, v_star


def objective(**kw):
    return diffusion.make_objective(dict(name="distill", **kw))


def labelled_teacher(z, t, cond, h=None):
    """A toy conditional velocity: its value tells which condition it saw."""
    assert h is None  # the teacher is asked for its instantaneous velocity
    return z * (1.0 + cond["label"][:, None].astype(jnp.float32)) + t[:, None]


def test_config_and_teacher_is_required():
    obj = diffusion.make_objective(diffusion.default_config("distill"))
    assert isinstance(obj, distill.DistillObjective) and obj.needs.target == "teacher"
    assert obj.needs.jvp and obj.needs.interval_input and obj.teacher_workdir == ""
    z = jnp.ones((2, 3))
    with pytest.raises(ValueError, match="target_fn"):
        obj.velocity(None, z, z, jnp.ones(2), None)


def test_teacher_velocity_is_guided_and_dropped_rows_are_unconditional():
    z = jax.random.normal(jax.random.key(0), (3, 4))
    t = jnp.array([0.9, 0.5, 0.2])
    null_label = 9
    cond = {"label": jnp.array([2, null_label, 5])}  # row 1 had its condition dropped
    null = {"label": jnp.full((3,), null_label)}
    w = 3.0
    got = objective(guidance=w).velocity(None, z, None, t, cond, target_fn=labelled_teacher,
                                         null_cond=null)
    v_c, v_u = labelled_teacher(z, t, cond), labelled_teacher(z, t, null)
    np.testing.assert_allclose(got, v_u + w * (v_c - v_u), rtol=1e-6)
    np.testing.assert_allclose(got[1], v_u[1], rtol=1e-6)  # dropped: plain unconditional
    plain = objective().velocity(None, z, None, t, cond, target_fn=labelled_teacher,
                                 null_cond=null)
    np.testing.assert_allclose(plain, v_c, rtol=1e-6)  # guidance 1: the conditional velocity


def test_exact_teacher_and_exact_student_have_zero_loss():
    """Gaussian data: with the teacher's velocity v* the average velocity u* is the fixed point
    of the target (the data velocity plays no part)."""
    with jax.enable_x64(True):
        obj = objective(adaptive_p=0.0)
        x0 = jax.random.normal(jax.random.key(0), (5, 6), jnp.float64)
        noise = jax.random.normal(jax.random.key(1), (5, 6), jnp.float64)
        t = jnp.array([1.0, 0.8, 0.6, 0.5, 0.3], jnp.float64)
        r = jnp.array([0.0, 0.3, 0.6, 0.1, 0.0], jnp.float64)
        teacher = lambda z, t, cond: v_star(z, t)  # noqa: E731
        loss, per_example = obj.loss_tr(u_star, x0, None, t, r, noise, target_fn=teacher)
        np.testing.assert_allclose(per_example, 0.0, atol=1e-12)  # the loss is float32
        # ... while the MeanFlow loss (data velocity) of the same student is not zero
        assert float(meanflow.MeanFlowObjective(adaptive_p=0.0).loss_tr(
            u_star, x0, None, t, r, noise)[0]) > 1e-3


def test_stop_gradient_on_teacher_and_target():
    obj = objective()
    x0 = jax.random.normal(jax.random.key(0), (4, 3))
    noise = jax.random.normal(jax.random.key(1), (4, 3))
    t, r = jnp.array([0.9, 0.7, 0.5, 0.3]), jnp.array([0.1, 0.7, 0.2, 0.0])

    def model(theta):
        def fn(z, t, cond, h=None):
            h = jnp.zeros_like(t) if h is None else h
            return theta[0] * z + theta[1] * t[:, None] * z ** 2 + theta[2] * h[:, None] * z
        return fn

    theta = jnp.array([0.3, -0.2, 0.5])
    teacher = model(jnp.array([0.5, 0.1, 0.0]))
    grad = jax.grad(lambda th: obj.loss_tr(model(th), x0, None, t, r, noise,
                                           target_fn=teacher)[0])(theta)
    z, _ = obj.corrupt(x0, noise, t)
    _, target = meanflow.mean_flow_target(model(theta), z, teacher(z, t, None), t, r, None)
    target = np.asarray(target)

    def const_loss(th):
        err = jnp.mean((model(th)(z, t, None, t - r) - target) ** 2, axis=1)
        return jnp.mean(jax.lax.stop_gradient(1.0 / (err + obj.adaptive_c)) * err)

    np.testing.assert_allclose(grad, jax.grad(const_loss)(theta), rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------- the teacher on disk
def _write_export(path, config, params):
    from safetensors.numpy import save_file
    os.makedirs(path, exist_ok=True)
    save_file(export.flat_params(params), os.path.join(path, run_lib.WEIGHTS))
    with open(os.path.join(path, run_lib.CONFIG), "w") as f:
        json.dump(config.to_dict(), f)


def test_student_starts_as_the_teacher(tmp_path):
    mesh = sharding.make_mesh(dict(fsdp=1), jax.devices()[:1])
    tc = moving_digits.get_config("smoke")  # a flow teacher: no interval input
    tc.seed = 1
    t_setup = Setup(tc, mesh)
    t_params = jax.tree.map(lambda p: p + 0.01, t_setup.init().ema_params)  # non-zero output
    _write_export(str(tmp_path / "teacher"), tc, t_params)

    sc = moving_digits.get_config("smoke,objective=distill")
    sc.objective.teacher_workdir = str(tmp_path / "teacher")
    setup = Setup(sc, mesh)
    teacher = teacher_lib.load(sc, setup)
    assert not teacher.has_interval
    fresh = setup.init()
    state = teacher.init_student(setup, fresh)

    x = jax.random.normal(jax.random.key(0), (2, 8, 32, 32, 1))
    t, cond = jnp.array([0.3, 0.9]), {"label": jnp.array([1, 7])}
    want = t_setup.model(t_params)(x, t, cond)
    for params in (state.params, state.ema_params, teacher.params):
        for h in (None, jnp.zeros(2), jnp.array([0.3, 0.9])):  # zero-init interval embedder
            np.testing.assert_allclose(setup.model(params)(x, t, cond, h=h), want,
                                       rtol=1e-5, atol=1e-6)
    # The student's interval embedder keeps its own init (trainable), the teacher's is zero.
    h_embed = state.params["h_embed"]
    np.testing.assert_array_equal(h_embed["fc1"]["kernel"],
                                  fresh.params["h_embed"]["fc1"]["kernel"])
    assert np.abs(h_embed["fc1"]["kernel"]).max() > 0 and not np.any(h_embed["fc2"]["kernel"])
    # Copies, not the teacher's buffers (the train step donates the state).
    a, b = state.params["final"], teacher.params["final"]
    for x_, y_ in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x_.unsafe_buffer_pointer() != y_.unsafe_buffer_pointer()


def test_teacher_errors_name_the_path(tmp_path):
    mesh = sharding.make_mesh(dict(fsdp=1), jax.devices()[:1])
    sc = moving_digits.get_config("smoke,objective=distill")
    setup = Setup(sc, mesh)
    missing = str(tmp_path / "nowhere")
    sc.objective.teacher_workdir = missing
    with pytest.raises(teacher_lib.TeacherError, match="nowhere.*does not exist"):
        teacher_lib.load(sc, setup)
    empty = tmp_path / "empty"
    empty.mkdir()
    sc.objective.teacher_workdir = str(empty)
    with pytest.raises(teacher_lib.TeacherError, match="empty.*no config.json"):
        teacher_lib.load(sc, setup)

    other = moving_digits.get_config("smoke")
    other.model.width = 32
    with open(empty / "config.json", "w") as f:
        json.dump(other.to_dict(), f)
    with pytest.raises(teacher_lib.TeacherError, match=r"(?s)empty.*model.width: teacher=32"):
        teacher_lib.load(sc, setup)
    vp = moving_digits.get_config("smoke,objective=vp")
    with open(empty / "config.json", "w") as f:
        json.dump(vp.to_dict(), f)
    with pytest.raises(teacher_lib.TeacherError, match="'vp' model"):
        teacher_lib.load(sc, setup)
    # The runtime choices may differ: attention backend, remat, compute dtype.
    same = moving_digits.get_config("smoke")
    same.model.attention, same.model.remat = "xla", "full"
    teacher_lib.check_compatible(same, sc, "x")
    # A teacher written before model.time_scale existed was trained at the old fixed 1000 ...
    old = moving_digits.get_config("smoke").to_dict()
    del old["model"]["time_scale"]
    with open(empty / "config.json", "w") as f:
        json.dump(old, f)
    read = run_lib.read_config(str(empty))
    assert read.model.time_scale == sc.model.time_scale == 1000.0
    teacher_lib.check_compatible(read, sc, "x")
    # ... and a different time embedding is a different function
    read.model.time_scale = 1.0
    with pytest.raises(teacher_lib.TeacherError, match="model.time_scale: teacher=1.0"):
        teacher_lib.check_compatible(read, sc, "x")


@pytest.mark.parametrize("attention", ["chunked", "dense", "xla"])
def test_distill_loss_differentiates_through_every_cpu_backend(attention):
    """The distill loss (a jvp of the student, the teacher forward) and its gradient run and are
    finite with each attention backend that runs on CPU."""
    from tests.test_meanflow import dit_config
    from vidit.models import dit
    from flax import nnx
    cfg = dit_config(attention)
    graphdef, state = nnx.split(dit.build(cfg))
    params = jax.tree.map(lambda p: p + 0.01, nnx.to_pure_dict(state))

    def bind(p):
        return lambda *a, **k: nnx.merge(graphdef, p)(*a, **k)

    teacher = jax.tree.map(lambda p: p * 1.1, params)
    obj = objective(guidance=2.0)
    x0 = jax.random.normal(jax.random.key(0), (2, 2, 8, 8, 1))
    cond, null = {"label": jnp.array([1, 10])}, {"label": jnp.array([10, 10])}

    @jax.jit
    def value_and_grad(p):
        return jax.value_and_grad(lambda p: obj.loss(bind(p), x0, cond, jax.random.key(1),
                                                     target_fn=bind(teacher),
                                                     null_cond=null)[0])(p)

    loss, grads = value_and_grad(params)
    assert np.isfinite(loss) and all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    assert any(np.abs(g).max() > 0 for g in jax.tree.leaves(grads))
