"""Orbax checkpoints of a whole run: train state (with EMA), data-iterator state and config.

Restoring is exact (the data iterator resumes at the next batch) and safe: a checkpoint that
fails to restore is reported and the previous one is used; a checkpoint written by a different
model config is refused with the differing keys named.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import shutil
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from vidit.errors import CheckpointError
from vidit.models import layers

log = logging.getLogger("vidit")

# Config sections that decide parameter shapes or their meaning: resuming across a change here
# would silently train a different model.
STRUCTURAL = ("model", "objective.name", "seed")
# Config keys added after runs had been saved, with the value that rebuilds what those runs
# trained: a saved config without one is read as having it (resume, export, teachers).
ADDED_KEYS = {"model.time_scale": layers.DIT_TIME_SCALE, "model.disc_width": 0,
              "model.disc_layers": 3}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def with_added_keys(saved: dict) -> dict:
    """`saved` (a config dict as written to disk) with each missing key of ADDED_KEYS set, in
    place; a section the config does not have (a model-less config) is left out."""
    for dotted, value in ADDED_KEYS.items():
        *sections, key = dotted.split(".")
        d = saved
        for s in sections:
            d = d.get(s) if isinstance(d, dict) else None
        if isinstance(d, dict):
            d.setdefault(key, value)
    return saved


def config_mismatch(saved: dict, current: dict) -> list[str]:
    """Structural keys whose values differ between a saved and the current config."""
    saved_flat, current_flat = _flatten(saved), _flatten(current)
    keys = sorted(set(saved_flat) | set(current_flat))
    structural = [k for k in keys if any(k == s or k.startswith(s + ".") for s in STRUCTURAL)]
    # JSON turns tuples into lists: compare through one JSON round trip.
    norm = lambda v: json.loads(json.dumps(v))  # noqa: E731
    return [f"{k}: checkpoint={saved_flat.get(k)!r} now={current_flat.get(k)!r}"
            for k in structural if norm(saved_flat.get(k)) != norm(current_flat.get(k))]


class Checkpointer:
    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=async_save))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iter: Any, config: Any, *, force=False) -> bool:
        items = dict(state=ocp.args.StandardSave(state),
                     config=ocp.args.JsonSave(config.to_dict()))
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def read_config(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))[
            "config"]

    def restore(self, abstract_state: Any, data_iter: Any, config: Any):
        """Restores the newest good checkpoint into (state, data_iter); None if there is none."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        for i, step in enumerate(steps):
            try:
                saved_config = self.read_config(step)
            except Exception as e:  # pylint: disable=broad-except
                self._warn_bad(step, e, steps[i + 1:])
                continue
            diff = config_mismatch(with_added_keys(saved_config), config.to_dict())
            if diff:
                raise CheckpointError(
                    f"{self.directory} holds checkpoints of a different model config; use a new "
                    "--workdir or restore the config. Differences:\n  " + "\n  ".join(diff))
            items = dict(state=ocp.args.StandardRestore(abstract_state))
            same_hosts = data_iter is not None and os.path.exists(self._data_file(step))
            if same_hosts:
                items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(**items))
                if data_iter is not None and not same_hosts:
                    self._restore_data_position(step, data_iter)
            except Exception as e:  # pylint: disable=broad-except
                self._warn_bad(step, e, steps[i + 1:])
                continue
            return step, restored["state"]
        if steps:
            raise CheckpointError(f"no checkpoint in {self.directory} could be restored (tried "
                                  f"steps {steps}); see the warnings above")
        return None

    def _data_file(self, step: int) -> str:
        """Grain's per-process iterator file for this process in this job."""
        return os.path.join(self.directory, str(step), "data",
                            f"process_{jax.process_index()}-of-{jax.process_count()}.json")

    def _restore_data_position(self, step: int, data_iter: Any) -> None:
        """Resumes the data on a different number of processes than saved it.

        The pipeline's iterator state is the next global step, identical in every process
        (data_pipelines/pipeline.py), so any saved process's state is this process's state.
        """
        files = sorted(glob.glob(os.path.join(self.directory, str(step), "data", "process_*.json")))
        states = []
        for path in files:
            with open(path) as f:
                states.append(json.load(f))
        if not states or any(s != states[0] for s in states):
            raise CheckpointError(f"step {step}: data iterator states {files} are missing or "
                                  "differ between processes")
        data_iter.set_state(states[0])
        log.info("step %d was saved by %d processes; this job has %d: data resumes at %s",
                 step, len(files), jax.process_count(), states[0])

    def _warn_bad(self, step, error, remaining):
        """Moves a bad checkpoint aside (kept for inspection, out of the step sequence)."""
        fallback = f"falling back to step {remaining[0]}" if remaining else "no older one left"
        aside = os.path.join(os.path.dirname(self.directory), "bad_checkpoints", str(step))
        log.warning("checkpoint step %d in %s failed to restore (%s: %s); moved to %s; %s", step,
                    self.directory, type(error).__name__, str(error).splitlines()[0][:200], aside,
                    fallback)
        if process_is_main():
            os.makedirs(os.path.dirname(aside), exist_ok=True)
            shutil.move(os.path.join(self.directory, str(step)), aside)
        self.manager.reload()

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def restore_params(directory: str, abstract_state: Any, step: int | None = None):
    """EMA and raw params of a workdir's checkpoint (for sampling/export; no data iterator)."""
    ckpt = Checkpointer(directory, async_save=False)
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise CheckpointError(f"no checkpoint found in {directory}")
    restored = ckpt.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    ckpt.close()
    return step, restored["state"]


def process_is_main() -> bool:
    return jax.process_index() == 0
