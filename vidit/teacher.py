"""The frozen teacher of a distillation run (config.objective.name = 'distill').

    teacher = load(config, setup)                  # once, at start-up
    state = teacher.init_student(setup, state)     # a fresh run starts as the teacher
    state, metrics = train_step(state, batch, {"teacher": teacher.params})

The teacher is a vidit.train workdir (its newest Orbax checkpoint's EMA parameters) or a
vidit.export folder, named by config.objective.teacher_workdir. Its model config must build the
student's parameters (only runtime choices such as attention, remat or compute dtype may
differ, and the student may add the interval input). The parameters are held in the student's
tree and layout (setup.shardings.params): a teacher without an interval embedder gets a zero one,
which adds nothing, so the student's graph computes the teacher's velocity. They are an argument
of the train step (vidit/steps.py's `frozen`), never part of the train state: the optimizer does
not see them and the run's checkpoints do not hold them (a resumed run reads them again from
teacher_workdir).
"""
from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from vidit import run as run_lib, storage
from vidit.errors import LoadError
from vidit.train_state import Setup, TrainState

log = logging.getLogger("vidit")

# Model config keys that change how the model runs but not its parameters.
RUNTIME_KEYS = ("attention", "remat", "sequence_parallel", "dtype", "interval_input")
INTERVAL = "h_embed"  # the interval embedder's parameters (absent in flow models)


class TeacherError(LoadError):
    pass


@dataclasses.dataclass
class Teacher:
    params: Any  # the student's tree, sharded like its params
    path: str
    step: int | None
    has_interval: bool  # the teacher itself had an interval embedder

    def init_student(self, setup: Setup, state: TrainState) -> TrainState:
        """A fresh state whose params and EMA are copies of the teacher's, except a student-only
        interval embedder, which keeps its (zero-output) initialisation."""
        def merge(student, teacher):
            return traverse_util.unflatten_dict({
                k: v if (k[0] == INTERVAL and not self.has_interval) else jnp.copy(flat_t[k])
                for flat_t in [traverse_util.flatten_dict(teacher)]
                for k, v in traverse_util.flatten_dict(student).items()})

        # Copies (not the teacher's buffers): the train step donates the state.
        fn = jax.jit(merge, out_shardings=setup.shardings.params)
        return state.replace(params=fn(state.params, self.params),
                             ema_params=fn(state.ema_params, self.params))


def check_compatible(teacher_config: Any, config: Any, path: str) -> None:
    """Refuses a teacher whose model config does not build the student's parameters, or whose
    output is not a velocity, naming each difference."""
    name = teacher_config.objective.get("name", "flow")
    if name == "vp":
        raise TeacherError(
            f"config.objective.teacher_workdir={path!r} holds a 'vp' model (noise/v prediction "
            "on a VP schedule); distillation needs a rectified-flow velocity model ('flow', "
            "or 'meanflow'/'shortcut'/'distill' read at h = 0)")
    norm = lambda v: json.loads(json.dumps(v))  # noqa: E731  (tuples vs JSON lists)
    t_model, s_model = teacher_config.model.to_dict(), config.model.to_dict()
    diff = [f"model.{k}: teacher={t_model.get(k)!r} student={s_model.get(k)!r}"
            for k in sorted(set(t_model) | set(s_model))
            if k not in RUNTIME_KEYS and norm(t_model.get(k)) != norm(s_model.get(k))]
    if diff:
        raise TeacherError(
            f"config.objective.teacher_workdir={path!r} was trained with a model config the "
            "student cannot start from; make config.model match it:\n  " + "\n  ".join(diff))


def load(config: Any, setup: Setup) -> Teacher:
    """The teacher's EMA params from config.objective.teacher_workdir, in the student's tree and
    shardings. Clear errors name the path when it is missing or incompatible."""
    path = config.objective.get("teacher_workdir", "")
    if not path:
        raise TeacherError("config.objective.teacher_workdir is empty: set it to a vidit.train "
                           "workdir or vidit.export folder of a trained flow model")
    if not storage.path(path).exists():
        raise TeacherError(f"config.objective.teacher_workdir={path!r} does not exist")
    try:
        teacher_config = run_lib.read_config(path)
    except LoadError as e:
        raise TeacherError(f"config.objective.teacher_workdir={path!r}: {e}") from None
    check_compatible(teacher_config, config, path)
    try:
        teacher = run_lib.load(path, mesh=setup.mesh)
    except Exception as e:  # pylint: disable=broad-except
        raise TeacherError(f"config.objective.teacher_workdir={path!r} could not be loaded "
                           f"({type(e).__name__}: {str(e).splitlines()[0][:300]})") from e

    step = teacher.step
    flat = traverse_util.flatten_dict(teacher.params)
    expected = traverse_util.flatten_dict(setup.abstract.params)
    has_interval = any(k[0] == INTERVAL for k in flat)
    for k, a in expected.items():  # a flow teacher: a zero interval embedder adds nothing
        if k[0] == INTERVAL and k not in flat:
            flat[k] = jnp.zeros(a.shape, a.dtype)
    run_lib.check_shapes({run_lib.param_key(k): v for k, v in flat.items()},
                         {run_lib.param_key(k): v for k, v in expected.items()},
                         f"config.objective.teacher_workdir={path!r}")
    params = jax.device_put(traverse_util.unflatten_dict(flat), setup.shardings.params)
    log.info("teacher: EMA params%s from %s (held apart from the state; not checkpointed)",
             f" of step {step}" if step is not None else "", path)
    return Teacher(params=params, path=path, step=step, has_interval=has_interval)
