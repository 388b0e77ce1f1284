"""Continuous-time consistency distillation of a trained flow model into a MeanFlow student.

The student has MeanFlow's interface and loss (meanflow.py: average velocity u(z, t, r), target
sg(v - (t - r) du/dt) from one jvp along (v, 1, 0)), but the velocity v is the frozen teacher's,
not the data's:

    v = sg(v_teacher(z_t, t))                                      guidance = 1
    v = sg(v_teacher(z_t, t | null) + w (v_teacher(z_t, t | c) - v_teacher(z_t, t | null)))

so the student learns to jump along the teacher's (optionally guided) ODE, and a guided teacher
gives a student that needs no guidance at sampling (sample with guidance 1). Examples whose
condition was dropped get the unconditional teacher velocity (cond = null there).

The trainer (vidit/train.py, vidit/teacher.py) loads the teacher's EMA parameters once from
``teacher_workdir`` (a vidit.train workdir or a vidit.export folder), initialises the student
from them (its interval embedder stays zero-initialised, so it starts as the teacher) and passes
the teacher to ``loss`` as ``target_fn`` (``needs.target`` = 'teacher').
"""
import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from vidit.diffusion import samplers
from vidit.diffusion.meanflow import MeanFlowObjective
from vidit.diffusion.objective import Needs
from vidit.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class DistillObjective(MeanFlowObjective):
    """Fields are MeanFlow's (``default_config('distill')``) plus the teacher's location;
    ``guidance`` is the teacher's classifier-free guidance scale."""

    teacher_workdir: str = ""  # vidit.train workdir (Orbax checkpoint) or vidit.export folder
    # The student starts as the teacher, so the r = t rows are already fit: most rows train jumps.
    equal_fraction: float = 0.25
    guidance: float = 1.0  # teacher guidance w: v_uncond + w (v_cond - v_uncond); 1 = v_cond

    name: ClassVar[str] = "distill"

    @property
    def needs(self) -> Needs:
        return dataclasses.replace(super().needs, target="teacher")

    def check(self, config) -> None:
        super().check(config)
        if not self.teacher_workdir:
            raise ConfigError(
                f"config.objective.name='{self.name}' distils a trained flow model: set "
                "config.objective.teacher_workdir to its vidit.train workdir or vidit.export "
                "folder")

    def velocity(self, model_fn, z, v, t, cond, *, target_fn=None, null_cond=None):
        """The teacher's (guided) velocity at (z, t), stop-gradient, float32 at least."""
        del model_fn, v
        if target_fn is None:
            raise ValueError("objective 'distill' needs the teacher model as target_fn "
                             "(the trainer loads it from config.objective.teacher_workdir)")
        guidance = self.guidance if null_cond else 1.0
        # Called without h: a flow teacher's velocity (an interval model reads h = 0).
        fn = samplers.guided(target_fn, cond, null_cond, guidance)
        return jax.lax.stop_gradient(fn(z, t).astype(jnp.promote_types(z.dtype, jnp.float32)))
