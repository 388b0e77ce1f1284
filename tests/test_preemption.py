"""Preemption and failures of a multi-process run (launch/local.py, 2 processes over gloo).

- SIGTERM to one process only, or to the launcher (which passes it to every process it
  started): every process stops at the same step, saves it and exits 0, and the resumed run
  gives the uninterrupted losses.
- SIGKILL while an asynchronous save is being written: the half-written step is ignored on
  restart and the one before it is used.
"""
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.test_cloud import scalars

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def env(devices: int) -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu", VIDIT_XLA_CACHE="", PYTHONPATH=ROOT,
                XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def train_command(workdir, data_dir, steps, *extra):
    return [sys.executable, "-m", "vidit.train", "--config", "configs/moving_digits.py:smoke",
            "--workdir", str(workdir), f"--config.data.data_dir={data_dir}",
            f"--config.train.steps={steps}", "--config.train.log_every=1",
            "--config.train.progress=False", "--config.train.ckpt_every=0",
            "--config.sample.num=0", *extra]


def launch(command, log_path, **kw) -> subprocess.Popen:
    """The command as 2 processes x 4 devices under launch/local.py, output to log_path."""
    log = open(log_path, "w")
    return subprocess.Popen([sys.executable, "launch/local.py", "--processes", "2",
                             "--devices_per_process", "4", "--heartbeat_s", "20", "--grace",
                             "120", "--", *command], cwd=ROOT, env=env(1), stdout=log,
                            stderr=subprocess.STDOUT, **kw)


def wait_for(log_path, pattern, proc, timeout=300):
    deadline = time.monotonic() + timeout
    while not re.search(pattern, open(log_path).read()):
        assert proc.poll() is None, open(log_path).read()[-3000:]
        assert time.monotonic() < deadline, f"no {pattern!r}:\n" + open(log_path).read()[-3000:]
        time.sleep(0.1)


def process_pid(workdir, process_id: int) -> int:
    """The pid of the trainer process with VIDIT_PROCESS_ID=process_id training `workdir`."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if (str(workdir).encode() in b" ".join(cmdline) and b"vidit.train" in cmdline
                and f"VIDIT_PROCESS_ID={process_id}".encode() in environ):
            return int(pid)
    raise AssertionError(f"no trainer process {process_id} for {workdir}")


def stopped_steps(text):
    return {int(m.group(2)) for m in re.finditer(r"\[p(\d)\].*stopped at step (\d+): preemption",
                                                  text)}


def test_sigterm_to_one_process_or_the_launcher_stops_every_process_at_one_step(data_dir,
                                                                              tmp_path):
    """SIGTERM to process 1 only, then (resumed) to the launcher: each time both processes stop
    at one step, save it and exit 0; resumed to the end, the losses are the uninterrupted
    run's."""
    steps = 40
    straight = tmp_path / "straight"
    r = subprocess.run(train_command(straight, data_dir, steps), cwd=ROOT, env=env(8),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    want = scalars(straight / "tensorboard", "train/loss")

    workdir, log = tmp_path / "two", tmp_path / "two.log"
    proc = launch(train_command(workdir, data_dir, steps), log)
    wait_for(log, r"\[p1\].*step 3: train/loss", proc)
    os.kill(process_pid(workdir, 1), signal.SIGTERM)  # process 0 is not told
    assert proc.wait(timeout=300) == 0, open(log).read()[-3000:]
    text = open(log).read()
    stopped = stopped_steps(text)
    assert len(stopped) == 1 and len(re.findall("stopped at step", text)) == 2, text[-3000:]
    first_stop = stopped.pop()
    assert first_stop < steps
    assert sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit()) == [
        first_stop]

    log = tmp_path / "launcher.log"
    proc = launch(train_command(workdir, data_dir, steps), log)
    wait_for(log, rf"\[p1\].*step {first_stop + 3}: train/loss", proc)
    proc.send_signal(signal.SIGTERM)  # to launch/local.py, which passes it on
    assert proc.wait(timeout=300) == 0, open(log).read()[-3000:]
    text = open(log).read()
    assert "passing it to every process" in text and "killing" not in text
    stopped = stopped_steps(text)
    assert len(stopped) == 1 and len(re.findall("stopped at step", text)) == 2, text[-3000:]
    assert first_stop < stopped.pop() < steps

    proc = launch(train_command(workdir, data_dir, steps), tmp_path / "resume.log")
    assert proc.wait(timeout=300) == 0, open(tmp_path / "resume.log").read()[-3000:]
    got = scalars(workdir / "tensorboard", "train/loss")
    assert sorted(got) == sorted(want) == list(range(1, steps + 1))
    # 2 x 4 devices against 1 x 8: the same global batches, summed in another order.
    np.testing.assert_allclose([got[s] for s in want], [want[s] for s in want], rtol=1e-5)


def test_kill_during_an_async_save_falls_back_to_the_previous_step(data_dir, tmp_path):
    """A state of ~200 MB takes long enough to write that the kill lands inside the save."""
    workdir = tmp_path / "run"
    command = train_command(workdir, data_dir, 6, "--config.train.ckpt_every=2",
                            "--config.model.depth=3", "--config.model.width=384",
                            "--config.model.heads=6")
    proc = subprocess.Popen(command, cwd=ROOT, env=env(1), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpts = workdir / "checkpoints"
    deadline, killed_in = time.monotonic() + 600, None
    while killed_in is None:
        assert proc.poll() is None, "the run ended before a save could be interrupted"
        assert time.monotonic() < deadline
        names = os.listdir(ckpts) if ckpts.exists() else []
        partial = [n for n in names if "tmp" in n and not n.startswith("2")]
        if "2" in names and partial:
            proc.send_signal(signal.SIGKILL)
            killed_in = partial[0]
        time.sleep(0.005)
    proc.wait()
    done = sorted(int(d) for d in os.listdir(ckpts) if d.isdigit())
    assert done == [2], (done, killed_in)  # the interrupted step never counted

    r = subprocess.run(command, cwd=ROOT, env=env(1), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from step 2" in r.stderr
    assert 6 in [int(d) for d in os.listdir(ckpts) if d.isdigit()]
