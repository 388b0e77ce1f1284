"""Training objectives as pure functions: rectified flow (default), VP diffusion, the few-step
objectives MeanFlow, shortcut models and consistency distillation, and the VAE's.

    obj = make_objective(default_config('flow'))
    loss, per_example = obj.loss(model_fn, x0, cond, rng)
    x0 = obj.sample(model_fn, noise, cond, steps=50, null_cond=null, guidance=5.0)

objective.py says what an objective is; registry.py lists them by config name.
"""
from vidit.diffusion.autoencoding import VAEObjective
from vidit.diffusion.distill import DistillObjective
from vidit.diffusion.flow import FlowObjective, shift_for_tokens, shift_time
from vidit.diffusion.meanflow import MeanFlowObjective
from vidit.diffusion.objective import Needs, Objective
from vidit.diffusion.registry import OBJECTIVES, default_config, make_objective
from vidit.diffusion.samplers import ddim, euler, guided, heun, jump
from vidit.diffusion.shortcut import ShortcutObjective
from vidit.diffusion.vp import VPObjective, alphas_cumprod

__all__ = [
    "DistillObjective", "FlowObjective", "MeanFlowObjective", "Needs", "OBJECTIVES", "Objective",
    "ShortcutObjective", "VAEObjective", "VPObjective", "alphas_cumprod", "ddim",
    "default_config", "euler", "guided", "heun", "jump", "make_objective", "shift_for_tokens",
    "shift_time",
]
