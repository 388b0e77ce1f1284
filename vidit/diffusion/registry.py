"""The table of training objectives by config name, and building one from config.objective.

Adding an objective: write its class (a frozen dataclass subclassing `Objective`, see
objective.py) in its own file, then add one line to `OBJECTIVES`.
"""
import dataclasses

import ml_collections

from vidit.diffusion.autoencoding import VAEObjective
from vidit.diffusion.distill import DistillObjective
from vidit.diffusion.flow import FlowObjective
from vidit.diffusion.meanflow import MeanFlowObjective
from vidit.diffusion.objective import Objective
from vidit.diffusion.shortcut import ShortcutObjective
from vidit.diffusion.vp import VPObjective

OBJECTIVES: dict[str, type[Objective]] = {
    "flow": FlowObjective,  # rectified flow (the default)
    "vp": VPObjective,  # variance-preserving diffusion (DDPM training, DDIM sampling)
    "meanflow": MeanFlowObjective,  # one-step average-velocity model
    "shortcut": ShortcutObjective,  # step-size-conditioned model, EMA self-consistency
    "distill": DistillObjective,  # MeanFlow student of a frozen flow teacher
    "vae": VAEObjective,  # the causal video VAE's reconstruction + KL (+ GAN)
}


def _fields(cls) -> dict:
    return {f.name: f.default for f in dataclasses.fields(cls)}


def _class(name: str) -> type[Objective]:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; valid: {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]


def default_config(name: str = "flow") -> ml_collections.ConfigDict:
    """ConfigDict with ``name`` and every field of that objective at its default."""
    return ml_collections.ConfigDict({"name": name, **_fields(_class(name))})


def make_objective(cfg) -> Objective:
    """Builds the objective named by ``cfg.name`` from a ConfigDict (or a plain dict).

    Missing fields take their defaults; unknown names or fields raise ValueError (a typo in a
    config file should fail loudly, not silently train with the default). Values are coerced to
    the type of the default, so ``shift: 3`` in a config becomes 3.0.
    """
    cfg = dict(cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else cfg)
    name = cfg.pop("name", "flow")
    cls = _class(name)
    defaults = _fields(cls)
    unknown = sorted(set(cfg) - set(defaults))
    if unknown:
        raise ValueError(f"unknown fields {unknown} for objective {name!r}; valid: {sorted(defaults)}")
    return cls(**{k: type(defaults[k])(v) for k, v in cfg.items()})
