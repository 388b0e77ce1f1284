"""Runs in a bucket: every file through gs:// on a real GCS emulator (tests/gcs_emulator.py).

The trainer, sampler and exporter run as the commands a user runs, in a folder that must stay
empty: a run killed with SIGKILL resumes from the bucket with the losses of an uninterrupted
run, and a dataset built into the bucket is read back by the Grain pipeline.
"""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from etils import epath

from data_pipelines import data_config, moving_digits, pipeline
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"num_train": 64, "num_validation": 16}


def command_env() -> dict:
    # PYTHONPATH: the config files import each other as the package `configs`.
    return dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", VIDIT_XLA_CACHE="")


def vidit(*args, cwd, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=command_env(),
                          capture_output=True, text=True, timeout=timeout)


def fresh(path: epath.Path) -> epath.Path:
    """`path`, with gcsfs's listing cache dropped (another process writes the bucket)."""
    from etils.epath.backend import fsspec_backend
    fsspec_backend.fs(os.fspath(path)).invalidate_cache()
    return path


def scalars(logdir, tag: str) -> dict:
    """{step: value} of one scalar from every TensorBoard event file in `logdir` (a resumed run
    adds a file; the later file wins for a step logged twice)."""
    files = sorted(fresh(epath.Path(logdir)).glob("events.out.tfevents.*"))
    return helpers.event_scalars(files).get(tag, {})


def train_args(workdir, data_dir, steps=8):
    return ["vidit.train", "--config", f"{ROOT}/configs/moving_digits.py:smoke",
            "--workdir", str(workdir), f"--config.data.data_dir={data_dir}",
            "--config.train.progress=False", f"--config.train.steps={steps}",
            "--config.train.ckpt_every=2", "--config.train.log_every=1",
            "--config.sample.num=4", "--config.sample.steps=2"]


@pytest.mark.slow
def test_train_in_a_bucket_killed_resumed_sampled_exported(gcs, bucket_dir, data_dir, tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    straight = tmp_path / "straight"
    r = vidit(*train_args(straight, data_dir), cwd=cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    want = scalars(straight / "tensorboard", "train/loss")
    assert sorted(want) == list(range(1, 9))

    run = bucket_dir / "run"
    proc = subprocess.Popen([sys.executable, "-m", *train_args(run, data_dir)], cwd=cwd,
                            env=command_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    committed = run / "checkpoints" / "4" / "commit_success.txt"
    deadline = time.monotonic() + 300
    while not fresh(committed).exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint at step 4 in the bucket"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    killed_at = max(scalars(run / "tensorboard", "train/loss"))
    assert killed_at < 8, "the run finished before it was killed"

    r = vidit(*train_args(run, data_dir), cwd=cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from step" in r.stderr
    got = scalars(run / "tensorboard", "train/loss")
    assert sorted(got) == list(range(1, 9))
    np.testing.assert_allclose([got[s] for s in range(1, 9)], [want[s] for s in range(1, 9)],
                               rtol=1e-6)
    for name in ("config.json", "eval.jsonl", "summary.json", "samples/step_0000008.gif",
                 "samples/step_0000008.mp4"):
        assert fresh(run / name).exists(), name
    assert list(fresh(run / "tensorboard").glob("events.out.tfevents.*"))

    r = vidit("vidit.sample", "--workdir", str(run), "--num", "2", "--steps", "2",
              "--out", str(bucket_dir / "sampled.gif"), cwd=cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    r = vidit("vidit.export", "--workdir", str(run), "--out", str(bucket_dir / "export"),
              cwd=cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    r = vidit("vidit.sample", "--workdir", str(bucket_dir / "export"), "--num", "2",
              "--steps", "2", "--out", str(bucket_dir / "from_export.gif"), cwd=cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("sampled.gif", "export/model.safetensors", "export/config.json",
                 "from_export.gif"):
        assert fresh(bucket_dir / name).stat().length > 0, name
    # The same EMA params and noise: the two samples are the same file.
    assert (bucket_dir / "sampled.gif").read_bytes() == (bucket_dir / "from_export.gif").read_bytes()
    assert os.listdir(cwd) == []  # nothing was written under the current folder


def test_dataset_built_into_a_bucket_is_read_by_the_pipeline(gcs, bucket_dir, data_dir):
    tfds_dir = bucket_dir / "tfds"
    moving_digits.load_builder(os.fspath(tfds_dir), **TINY)
    assert list(fresh(tfds_dir / "moving_digits").glob("*/1.0.0/*.array_record*"))
    batches = {}
    for where in (os.fspath(tfds_dir), data_dir):  # the bucket's copy and a local build
        cfg = data_config.defaults()
        cfg.update(dict(data_dir=where, builder_kwargs=TINY, batch_size=8))
        it = pipeline.make_iterator(cfg, "train", seed=0, train=True, process_index=0,
                                    process_count=1)
        batches[where] = [next(it) for _ in range(3)]
    for a, b in zip(*batches.values()):
        for key in ("video", "label", "text"):
            np.testing.assert_array_equal(a[key], b[key])
