"""Multi-host on one machine: 2 processes x 4 CPU devices joined over gloo (launch/local.py).

Train and stop with a checkpoint on 2 processes, resume on 2 processes, and resume the same
checkpoint on 1 process with 8 devices (a different mesh and process count): the losses equal
an uninterrupted single-process run's (rtol 1e-5: the same global batches, summed in a different
order). A process that dies makes its peer exit with an error instead of hanging.
"""
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "launch"))
import local as local_launch  # noqa: E402  (launch/local.py)

pytestmark = pytest.mark.slow
STEPS = 6


def train_command(workdir, data_dir, *extra):
    return [sys.executable, "-m", "vidit.train", "--config", "configs/moving_digits.py:smoke",
            "--workdir", str(workdir), f"--config.data.data_dir={data_dir}",
            f"--config.train.steps={STEPS}", "--config.train.log_every=1",
            "--config.train.progress=False", "--config.train.ckpt_every=0",
            *extra]


def run(command, processes, devices, tmp_path, name, grace=60):
    log_path = tmp_path / f"{name}.log"
    env_backup = dict(os.environ)
    os.environ["VIDIT_XLA_CACHE"] = ""
    try:
        with open(log_path, "w") as out:
            if processes == 1:
                env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
                    f"--xla_force_host_platform_device_count={devices}"))
                status = subprocess.run(command, cwd=ROOT, env=env, stdout=out,
                                        stderr=subprocess.STDOUT).returncode
            else:
                cwd = os.getcwd()
                os.chdir(ROOT)
                try:
                    status = local_launch.launch(command, processes, devices, grace=grace,
                                                 heartbeat_s=10, out=out)
                finally:
                    os.chdir(cwd)
    finally:
        os.environ.clear()
        os.environ.update(env_backup)
    text = log_path.read_text()
    return status, text


def losses(text, process="p0"):
    """{step: loss} from the log lines of one process (or the only one)."""
    found = {}
    for line in text.splitlines():
        if line.startswith("[") and not line.startswith(f"[{process}]"):
            continue
        m = re.search(r"step (\d+): train/loss=([0-9.e+-]+)", line)
        if m:
            found[int(m.group(1))] = float(m.group(2))
    return found


def test_two_processes_train_resume_and_resume_on_one(data_dir, tmp_path):
    status, text = run(train_command(tmp_path / "straight", data_dir), 1, 8, tmp_path, "straight")
    assert status == 0, text[-3000:]
    straight = losses(text)
    assert sorted(straight) == list(range(1, STEPS + 1))

    two = tmp_path / "two"
    status, text = run(train_command(two, data_dir, "--stop_at=3"), 2, 4, tmp_path, "two_a")
    assert status == 0, text[-3000:]
    assert "process 1 of 2" in text and "4 local / 8 global devices" in text
    first = losses(text)
    assert losses(text, "p1") == first  # both hosts see the same global loss
    # ... and each logs an MFU against its own matmul probe: the same order of magnitude
    mfu = {p: [float(v) for v in re.findall(rf"\[{p}\].*perf/mfu=([0-9.e+-]+)", text)]
           for p in ("p0", "p1")}
    assert mfu["p0"] and mfu["p1"]
    assert 0.1 < np.median(mfu["p1"]) / np.median(mfu["p0"]) < 10, mfu
    shutil.copytree(two, tmp_path / "one")

    status, text = run(train_command(two, data_dir), 2, 4, tmp_path, "two_b")
    assert status == 0, text[-3000:]
    resumed_two = losses(text)
    status, text = run(train_command(tmp_path / "one", data_dir), 1, 8, tmp_path, "one")
    assert status == 0, text[-3000:]
    assert "saved by 2 processes; this job has 1" in text
    resumed_one = losses(text)

    for got in ({**first, **resumed_two}, {**first, **resumed_one}):
        assert sorted(got) == list(range(1, STEPS + 1))
        for step in got:
            assert got[step] == pytest.approx(straight[step], rel=1e-5), step


def test_dead_process_ends_the_job_with_an_error(data_dir, tmp_path):
    """Process 1 dies mid-run; process 0 must end by itself, with a message that says why, within
    the heartbeat timeout (10 s here), long before the launcher's grace period would kill it."""
    script = tmp_path / "die.py"
    script.write_text(
        "import os, time\n"
        "from vidit import cli\n"
        "cli.setup(compilation_cache=False)\n"
        "import jax, jax.numpy as jnp\n"
        "from jax.experimental import multihost_utils\n"
        "multihost_utils.sync_global_devices('start')\n"
        "if jax.process_index() == 1:\n"
        "    os._exit(3)\n"
        "for _ in range(600):\n"
        "    multihost_utils.sync_global_devices('loop')\n"
        "    time.sleep(0.1)\n")
    start = time.monotonic()
    status, text = run([sys.executable, str(script)], 2, 1, tmp_path, "die", grace=300)
    elapsed = time.monotonic() - start
    assert status != 0
    assert "killing p0" not in text  # it exited on its own ...
    assert elapsed < 120, text[-2000:]  # ... in bounded time (grace 300 s)
    assert re.search(r"\[p0\].*(another task died|heartbeat|unavailable|failed)", text,
                     re.IGNORECASE), text[-2000:]
