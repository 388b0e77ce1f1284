#!/usr/bin/env python3
"""Runs one command as N JAX processes on this machine, as a multi-host job would run.

    python launch/local.py --processes 2 --devices_per_process 4 -- \
        python -m vidit.train --config configs/moving_digits.py:smoke --workdir /tmp/mh

Each process gets VIDIT_COORDINATOR=127.0.0.1:<free port>, VIDIT_NUM_PROCESSES,
VIDIT_PROCESS_ID and its own simulated CPU devices (--devices_per_process), so
`vidit.distributed.initialize` connects them over gloo exactly as hosts of a pod connect. Output
lines are prefixed with [p<i>]. If a process fails, the others are given --grace seconds to
notice (JAX's heartbeat ends them with an error) and are then killed; the exit status is the
first failure's. SIGTERM or Ctrl-C to the launcher is passed to every process (a preemption:
they save and exit), which again get --grace seconds. This is the launcher the multi-host tests
use.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pump(stream, prefix: str, out) -> None:
    for line in iter(stream.readline, ""):
        out.write(f"{prefix} {line}")
        out.flush()


def launch(command: list[str], processes: int, devices_per_process: int, grace: float = 60.0,
           heartbeat_s: int = 30, out=sys.stdout) -> int:
    port = free_port()
    procs, pumps = [], []
    for pid in range(processes):
        env = dict(os.environ)
        env.update({
            "VIDIT_COORDINATOR": f"127.0.0.1:{port}",
            "VIDIT_NUM_PROCESSES": str(processes),
            "VIDIT_PROCESS_ID": str(pid),
            "VIDIT_HEARTBEAT_TIMEOUT_S": str(heartbeat_s),
            "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": (re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                                 env.get("XLA_FLAGS", ""))
                          + f" --xla_force_host_platform_device_count={devices_per_process}").strip(),
        })
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        pump = threading.Thread(target=_pump, args=(proc.stdout, f"[p{pid}]", out), daemon=True)
        pump.start()
        procs.append(proc)
        pumps.append(pump)

    signalled = []

    def forward(signum, frame):  # preemption of the job: every process saves and exits
        del frame
        signalled.append(time.monotonic())
        out.write(f"[launch] signal {signum}: passing it to every process\n")
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    failed_at, status = None, 0
    try:
        while any(p.poll() is None for p in procs):
            codes = [p.poll() for p in procs]
            if failed_at is None and any(c not in (None, 0) for c in codes):
                failed_at = time.monotonic()
                status = next(c for c in codes if c not in (None, 0))
                out.write(f"[launch] a process exited with status {status}; "
                          f"stopping the others within {grace:.0f} s\n")
            deadline = min([failed_at or float("inf")] + signalled) + grace
            if time.monotonic() > deadline:
                for pid, p in enumerate(procs):
                    if p.poll() is None:
                        out.write(f"[launch] killing p{pid} after the {grace:.0f} s grace\n")
                        p.kill()
            time.sleep(0.2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    for pump in pumps:
        pump.join(timeout=5)
    codes = [p.returncode for p in procs]
    return status or next((c for c in codes if c), 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--devices_per_process", type=int, default=4)
    parser.add_argument("--grace", type=float, default=60.0,
                        help="seconds the others get after one process fails")
    parser.add_argument("--heartbeat_s", type=int, default=30,
                        help="JAX heartbeat timeout: how soon peers notice a dead process")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    sys.exit(launch(command, args.processes, args.devices_per_process, args.grace,
                    args.heartbeat_s))


if __name__ == "__main__":
    main()
