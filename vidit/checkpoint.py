"""Orbax checkpoints of a whole run: train state (with EMA), data-iterator state and config,
in a local folder or a bucket (gs://...).

Restoring is exact (the data iterator resumes at the next batch) and safe:

- A save that was cut short (a process killed mid-write) never counts: Orbax finalises a step
  only when all of it is written (a rename on a local disk, a commit marker in a bucket).
- A read error is retried with backoff before a step is called bad; a transient error that
  outlasts the retries stops the run with the step named, and nothing is moved.
- A step that fails every attempt is corrupt: it is moved to bad_checkpoints/ and the previous
  one is used, except the last remaining one, which is never moved (the run stops and names it
  instead of starting again from step 0). Every process falls back to the same step.
- A checkpoint written by a different model config is refused with the differing keys named.
"""
from __future__ import annotations

import copy
import json
import logging
import time
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from vidit import distributed, storage
from vidit.errors import CheckpointError
from vidit.models import layers

log = logging.getLogger("vidit")

# Config sections that decide parameter shapes or their meaning: resuming across a change here
# would silently train a different model.
STRUCTURAL = ("model", "objective.name", "seed")
# Config keys added after runs had been saved, with the value that rebuilds what those runs
# trained: a saved config without one is read as having it (resume, export, teachers).
ADDED_KEYS = {"model.time_scale": layers.DIT_TIME_SCALE, "model.disc_width": 0,
              "model.disc_layers": 3, "model.first_frame": False,
              "model.parametrization": "standard", "model.mup_base_width": 128,
              "model.mup_base_heads": 0,
              "model.text_encoder": {"kind": "byte", "path": "", "online": False, "dtype": ""}}


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
    place. They are DiT model keys: a VAE's config, or a model-less one, is left as it is."""
    model = saved.get("model") if isinstance(saved, dict) else None
    if not isinstance(model, dict) or model.get("kind", "dit") != "dit":
        return saved
    for dotted, value in ADDED_KEYS.items():
        *sections, key = dotted.split(".")
        d = saved
        for s in sections:
            d = d.get(s) if isinstance(d, dict) else None
        if isinstance(d, dict):
            d.setdefault(key, copy.deepcopy(value))
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


# Errors that may go away when the read is tried again (a network or bucket hiccup), as opposed to
# a step that is corrupt or incomplete.
TRANSIENT_ERRORS = (ConnectionError, TimeoutError, InterruptedError)
TRANSIENT_WORDS = ("timed out", "timeout", "unavailable", "connection", "temporarily",
                   "too many requests", "rate limit", "deadline exceeded")


def is_transient(error: BaseException) -> bool:
    text = f"{type(error).__name__}: {error}".lower()
    return isinstance(error, TRANSIENT_ERRORS) or any(w in text for w in TRANSIENT_WORDS)


OK, CORRUPT, TRANSIENT = 0, 1, 2  # how a restore went, worst last


def worst_outcome(outcome: int) -> int:
    """The worst restore outcome over all processes (one small allgather), so that every
    process takes the same decision."""
    if jax.process_count() == 1:
        return outcome
    from jax.experimental import multihost_utils
    return int(np.max(multihost_utils.process_allgather(np.int32(outcome))))


class Checkpointer:
    def __init__(self, directory, *, keep: int = 3, async_save: bool = True,
                 retries: int = 3, backoff_s: float = 1.0):
        self.directory = storage.path(directory)
        self.retries, self.backoff_s = retries, backoff_s
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=async_save))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, data_iter: Any, config: Any, *, force=False) -> bool:
        items = dict(state=ocp.args.StandardSave(state),
                     config=ocp.args.JsonSave(config.to_dict()))
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def read_config(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))[
            "config"]

    def _with_retries(self, what: str, fn):
        """fn() with up to `retries` attempts, backing off 1x, 2x, 4x ... `backoff_s`."""
        for attempt in range(self.retries):
            try:
                return fn()
            except Exception as e:  # pylint: disable=broad-except
                if attempt == self.retries - 1:
                    raise
                log.warning("%s failed (%s: %s); attempt %d of %d in %.1f s", what,
                            type(e).__name__, str(e).splitlines()[0][:200], attempt + 2,
                            self.retries, self.backoff_s * 2 ** attempt)
                time.sleep(self.backoff_s * 2 ** attempt)

    def _restore_step(self, step: int, abstract_state: Any, data_iter: Any, config: Any):
        saved_config = self._with_retries(f"reading the config of step {step}",
                                          lambda: self.read_config(step))
        diff = config_mismatch(with_added_keys(saved_config), with_added_keys(config.to_dict()))
        if diff:
            raise CheckpointError(
                f"{self.directory} holds checkpoints of a different model config; use a new "
                "--workdir or restore the config. Differences:\n  " + "\n  ".join(diff))
        items = dict(state=ocp.args.StandardRestore(abstract_state))
        same_hosts = data_iter is not None and self._data_file(step).exists()
        if same_hosts:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self._with_retries(
            f"restoring step {step}",
            lambda: self.manager.restore(step, args=ocp.args.Composite(**items)))
        if data_iter is not None and not same_hosts:
            self._restore_data_position(step, data_iter)
        return restored["state"]

    def restore(self, abstract_state: Any, data_iter: Any, config: Any):
        """Restores the newest good checkpoint into (state, data_iter); None if there is none.

        Every process tries the same steps newest first and takes the first that restored on
        all of them, so a step that failed on one host is given up on every host."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        for i, step in enumerate(steps):
            error = state = None
            try:
                state = self._restore_step(step, abstract_state, data_iter, config)
            except CheckpointError:
                raise
            except Exception as e:  # pylint: disable=broad-except
                error = e
            outcome = OK if error is None else TRANSIENT if is_transient(error) else CORRUPT
            outcome = worst_outcome(outcome)
            if outcome == OK:
                return step, state
            remaining = steps[i + 1:]
            why = (f"{type(error).__name__}: {str(error).splitlines()[0][:300]}" if error
                   else "it failed to restore on another process")
            if outcome == TRANSIENT:
                raise CheckpointError(
                    f"checkpoint step {step} in {self.directory} could not be read after "
                    f"{self.retries} attempts ({why}); this looks transient, so nothing was "
                    "moved: run the same command again") from error
            if not remaining:
                raise CheckpointError(
                    f"checkpoint step {step} in {self.directory}, the only one left, failed to "
                    f"restore after {self.retries} attempts ({why}); it is left in place. Inspect "
                    "it, move it away to start from step 0, or use a new --workdir") from error
            self._move_aside(step, why, remaining[0])
        return None

    def _data_file(self, step: int):
        """Grain's per-process iterator file for this process in this job."""
        return (self.directory / str(step) / "data" /
                f"process_{jax.process_index()}-of-{jax.process_count()}.json")

    def _restore_data_position(self, step: int, data_iter: Any) -> None:
        """Resumes the data on a different number of processes than saved it.

        The pipeline's iterator state is the next global step, identical in every process
        (data_pipelines/pipeline.py), so any saved process's state is this process's state.
        """
        files = sorted((self.directory / str(step) / "data").glob("process_*.json"))
        states = [json.loads(f.read_text()) for f in files]
        if not states or any(s != states[0] for s in states):
            raise CheckpointError(f"step {step}: data iterator states {files} are missing or "
                                  "differ between processes")
        data_iter.set_state(states[0])
        log.info("step %d was saved by %d processes; this job has %d: data resumes at %s",
                 step, len(files), jax.process_count(), states[0])

    def _move_aside(self, step: int, why: str, fallback: int) -> None:
        """Moves a corrupt step out of the step sequence (kept for inspection)."""
        aside = self.directory.parent / "bad_checkpoints" / str(step)
        log.warning("checkpoint step %d in %s is corrupt (%s); moved to %s; falling back to "
                    "step %d", step, self.directory, why, aside, fallback)
        if jax.process_index() == 0:
            aside.parent.mkdir(parents=True, exist_ok=True)
            (self.directory / str(step)).rename(aside)
        distributed.barrier(f"checkpoint step {step} moved aside")
        self.manager.reload()

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def restore_params(directory, abstract_state: Any, step: int | None = None):
    """(step, state) of a workdir's checkpoint (the newest, or `step`) for sampling and export:
    no data iterator, no config check."""
    ckpt = Checkpointer(directory, async_save=False)
    try:
        have = ckpt.all_steps()
        if not have:
            raise CheckpointError(f"no checkpoint found in {ckpt.directory}")
        if step is not None and step not in have:
            raise CheckpointError(f"{ckpt.directory} has no checkpoint at step {step}; it has "
                                  f"steps {have}")
        step = have[-1] if step is None else step
        restored = ckpt._with_retries(
            f"restoring step {step}", lambda: ckpt.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))))
    finally:
        ckpt.close()
    return step, restored["state"]
