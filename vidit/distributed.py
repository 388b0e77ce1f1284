"""Joining a multi-host job: one JAX process per host, all running the same command.

`initialize()` is called by every vidit command before JAX is used. It connects the processes
when there are several, and does nothing for a single-host run:

- explicitly, from the environment: VIDIT_COORDINATOR (host:port of process 0),
  VIDIT_NUM_PROCESSES and VIDIT_PROCESS_ID (what `launch/local.py`, the SLURM and GKE scripts
  set; on CPU the processes talk over gloo);
- automatically where JAX can detect the cluster itself: Cloud TPU VM slices with several
  workers, SLURM jobs with several tasks, GKE TPU JobSets.

A process that dies stops sending heartbeats; the coordination service then fails every other
process with an error naming the missing task after `heartbeat_timeout_s`, so a broken job
ends instead of hanging in a collective.
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger("vidit")

ENV_COORDINATOR = "VIDIT_COORDINATOR"
ENV_NUM_PROCESSES = "VIDIT_NUM_PROCESSES"
ENV_PROCESS_ID = "VIDIT_PROCESS_ID"
ENV_HEARTBEAT = "VIDIT_HEARTBEAT_TIMEOUT_S"


def _cluster_detected() -> bool:
    """Environments where `jax.distributed.initialize()` finds its peers on its own."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
        return True
    if "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):  # multi-worker Cloud TPU VM slice
        return True
    return "MEGASCALE_COORDINATOR_ADDRESS" in os.environ or "JOBSET_NAME" in os.environ


def initialize(heartbeat_timeout_s: int | None = None) -> bool:
    """Connects this process to its peers if it is one of several; True if it did."""
    import jax

    heartbeat = int(heartbeat_timeout_s or os.environ.get(ENV_HEARTBEAT, 100))
    coordinator = os.environ.get(ENV_COORDINATOR)
    if coordinator:
        try:
            num, pid = int(os.environ[ENV_NUM_PROCESSES]), int(os.environ[ENV_PROCESS_ID])
        except KeyError as e:
            raise RuntimeError(f"{ENV_COORDINATOR} is set, so {e.args[0]} must be too") from e
        if _cpu_only():  # CPU processes need a collectives library to talk to each other
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num,
                                   process_id=pid, heartbeat_timeout_seconds=heartbeat,
                                   initialization_timeout=max(60, heartbeat))
    elif _cluster_detected():
        jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat)
    else:
        return False
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def _cpu_only() -> bool:
    return os.environ.get("JAX_PLATFORMS", "cpu").split(",")[0] == "cpu"


def barrier(name: str, timeout_s: int = 1800) -> None:
    """Waits until every process reaches this point (coordination service, not a collective)."""
    import jax
    if jax.process_count() == 1:
        return
    from jax._src import distributed as jax_distributed
    jax_distributed.global_state.client.wait_at_barrier(name, timeout_in_ms=timeout_s * 1000)


class CompiledOnce:
    """A jitted function compiled ahead of its first call, then a barrier, then run.

    Processes compile at different speeds, and a CPU collective (gloo) gives up if a peer is
    more than 30 s late; so no process enters the program's first collective before all have
    compiled it. One compiled executable per set of static keyword arguments and argument
    shapes (a run with shape buckets compiles each bucket's step on its first use).
    """

    def __init__(self, jitted, name: str):
        self.jitted, self.name, self.compiled = jitted, name, {}

    def __call__(self, *args, **static):
        import jax
        shapes = tuple((getattr(a, "shape", None), str(getattr(a, "dtype", type(a))))
                       for a in jax.tree.leaves(args))
        key = tuple(sorted(static.items())) + (shapes,)
        if key not in self.compiled:
            self.compiled[key] = self.jitted.lower(*args, **static).compile()
            barrier(f"compiled {self.name} {key[:-1]} #{len(self.compiled)}")
        return self.compiled[key](*args)
