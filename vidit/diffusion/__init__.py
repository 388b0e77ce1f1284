"""Diffusion objectives as pure functions: rectified flow (default), VP diffusion, and the
few-step objectives MeanFlow, shortcut models and consistency distillation.

    obj = make_objective(default_config('flow'))
    loss, per_example = obj.loss(model_fn, x0, cond, rng)
    x0 = obj.sample(model_fn, noise, cond, steps=50, null_cond=null, guidance=5.0)
"""
from vidit.diffusion.autoencoding import VAEObjective
from vidit.diffusion.distill import DistillObjective
from vidit.diffusion.flow import FlowObjective, shift_for_tokens, shift_time
from vidit.diffusion.meanflow import MeanFlowObjective
from vidit.diffusion.objective import Objective, default_config, make_objective
from vidit.diffusion.samplers import ddim, euler, guided, heun
from vidit.diffusion.shortcut import ShortcutObjective
from vidit.diffusion.vp import VPObjective, alphas_cumprod

__all__ = [
    "DistillObjective", "FlowObjective", "MeanFlowObjective", "Objective", "ShortcutObjective",
    "VAEObjective", "VPObjective", "alphas_cumprod", "ddim", "default_config", "euler", "guided", "heun",
    "make_objective", "shift_for_tokens", "shift_time",
]
