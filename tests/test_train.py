"""The trainer: sharded == single-device, resume == uninterrupted, bad input, export, CLI."""
import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import moving_digits
from vidit import batches, checkpoint, checks, diffusion, export, run as run_lib, sharding, steps
from vidit import train as train_lib
from vidit.errors import CheckpointError, ConfigError, LoadError
from vidit.train_state import Setup

from tests.helpers import override

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smoke_config(data_dir, **overrides):
    c = moving_digits.get_config("smoke")
    c.data.data_dir = data_dir
    c.train.progress = False
    c.sample.num = 8
    return override(c, **overrides)


def first_batch(c):
    from data_pipelines import pipeline
    return next(pipeline.make_iterator(c.data, "train", seed=0, train=True,
                                       process_index=0, process_count=1))


def run_steps(c, mesh, batch, n):
    setup = Setup(c, mesh)
    objective = diffusion.make_objective(c.objective)
    step = jax.jit(functools.partial(steps.train_step, setup, objective))
    state = setup.init()
    losses = []
    with sharding.use(mesh, c.sharding_rules):
        for _ in range(n):
            state, metrics = step(state, batches.global_batch(batch, mesh))
            losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params)


@pytest.mark.parametrize("layout", [dict(data=2, fsdp=2, tensor=2), dict(data=1, fsdp=4, tensor=2)])
def test_sharded_step_equals_single_device(data_dir, layout):
    c = smoke_config(data_dir)
    batch = first_batch(c)
    single = sharding.make_mesh(dict(fsdp=1), jax.devices()[:1])
    many = sharding.make_mesh(layout)
    losses_1, params_1 = run_steps(c, single, batch, 2)
    losses_8, params_8 = run_steps(c, many, batch, 2)
    np.testing.assert_allclose(losses_8, losses_1, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 params_8, params_1)
    assert losses_1[1] != losses_1[0]  # the step really updated the parameters


def test_adversarial_meanflow_step_sharded_equals_single_device(data_dir):
    """MeanFlow with endpoint rows, the adversarial and the (guided) score term: the
    discriminator's parameters are sharded by the same rules, both players train, and 8 devices
    give the 1-device step."""
    c = moving_digits.get_config("smoke,objective=meanflow")
    c.data.data_dir = data_dir
    # Width 32: 2 channels per GroupNorm group after the strided conv. With 1 (width <= 16) that
    # conv's bias is cancelled exactly, its gradient is rounding noise, and Adam's first step
    # turns noise into +-lr, different on each layout.
    c.model.disc_width, c.model.disc_layers = 32, 2
    c.objective.endpoint_start, c.objective.adversarial_weight = 0, 0.5
    c.objective.score_weight, c.objective.score_guidance = 1.0, 2.0
    batch = first_batch(c)
    init = jax.device_get(Setup(c, sharding.make_mesh(dict(fsdp=1), jax.devices()[:1])).init())
    losses_1, params_1 = run_steps(c, sharding.make_mesh(dict(fsdp=1), jax.devices()[:1]), batch, 2)
    losses_8, params_8 = run_steps(c, sharding.make_mesh(dict(data=2, fsdp=2, tensor=2)), batch, 2)
    np.testing.assert_allclose(losses_8, losses_1, rtol=1e-5)
    # atol 2e-5: Adam divides each gradient by its own size, so an element whose gradient is
    # near its rounding noise moves by a few 1e-6 differently per layout (measured: 2 of the
    # 98k elements of a conv kernel); a wrong gradient moves by the update itself, >= 1e-4.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5),
                 params_8, params_1)
    moved = lambda a, b: float(np.abs(a - b).max())  # noqa: E731
    assert moved(params_1["disc"]["head"]["kernel"], init.params["disc"]["head"]["kernel"]) > 1e-4
    assert moved(params_1["final"]["proj"]["kernel"], init.params["final"]["proj"]["kernel"]) > 1e-4


def test_params_are_sharded_as_the_rules_say(data_dir):
    c = smoke_config(data_dir)
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
    setup = Setup(c, mesh)
    state = setup.init()
    fc1 = state.params["blocks"][1]["mlp"]["fc1"]["kernel"]  # [embed, mlp]
    assert fc1.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    moments = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(state.opt_state)
               if "blocks'][1]['mlp']['fc1']['kernel']" in jax.tree_util.keystr(path)]
    assert len(moments) == 2  # Adam's mu and nu, each sharded like its parameter
    assert all(m.sharding.spec == fc1.sharding.spec for m in moments)
    # Scanned layers: the same rule, with the stacked 'layers' axis unsharded.
    c.model.scan_layers = True
    stacked = Setup(c, mesh).init().params["blocks"]["mlp"]["fc1"]["kernel"]
    assert stacked.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")


def test_resume_equals_uninterrupted(data_dir, tmp_path):
    c = smoke_config(data_dir)
    straight = train_lib.train(c, str(tmp_path / "a"))
    first = train_lib.train(c, str(tmp_path / "b"), stop_at=3)
    assert first["stopped_for"] == "stop_at=3" and first["step"] == 3
    second = train_lib.train(c, str(tmp_path / "b"))
    assert second["step"] == 6
    resumed = first["losses"] + second["losses"]
    assert len(straight["losses"]) == 6
    np.testing.assert_allclose(resumed, straight["losses"], rtol=1e-6)
    assert straight["eval_loss"] == pytest.approx(second["eval_loss"], rel=1e-6)
    assert os.path.exists(tmp_path / "a" / "samples" / "step_0000006.gif")
    assert os.path.exists(tmp_path / "a" / "samples" / "step_0000006.mp4")
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "a" / "tensorboard"))


def test_corrupt_checkpoint_falls_back_and_other_config_is_refused(data_dir, tmp_path, caplog):
    c = smoke_config(data_dir, **{"train.steps": 4, "train.ckpt_every": 2})
    workdir = str(tmp_path / "run")
    train_lib.train(c, workdir, stop_at=4)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    assert sorted(os.listdir(ckpt_dir)) == ["2", "4"]
    # Corrupt every file of the newest checkpoint's train state.
    for root, _, files in os.walk(os.path.join(ckpt_dir, "4", "state")):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")
    setup = Setup(c, sharding.make_mesh(c.mesh))
    from data_pipelines import pipeline
    it = pipeline.make_iterator(c.data, "train", seed=c.seed, train=True)
    with caplog.at_level("WARNING", logger="vidit"):
        step, _ = checkpoint.Checkpointer(ckpt_dir).restore(setup.abstract, it, c)
    assert step == 2
    assert "checkpoint step 4" in caplog.text and "falling back to step 2" in caplog.text
    assert os.path.isdir(os.path.join(workdir, "bad_checkpoints", "4"))  # kept, not deleted

    other = smoke_config(data_dir, **{"model.width": 32})
    with pytest.raises(CheckpointError, match="model.width"):
        train_lib.train(other, workdir)

    # The last remaining checkpoint is never moved aside: the run stops and names it.
    for root, _, files in os.walk(os.path.join(ckpt_dir, "2", "state")):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")
    with pytest.raises(CheckpointError, match="step 2 .* the only one left"):
        checkpoint.Checkpointer(ckpt_dir, backoff_s=0.01).restore(setup.abstract, it, c)
    assert os.listdir(ckpt_dir) == ["2"]


def test_restore_retries_transient_errors_before_giving_up(data_dir, tmp_path, monkeypatch):
    c = smoke_config(data_dir, **{"train.steps": 4, "train.ckpt_every": 2})
    workdir = str(tmp_path / "run")
    train_lib.train(c, workdir, stop_at=4)
    setup = Setup(c, sharding.make_mesh(c.mesh))
    from data_pipelines import pipeline
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), backoff_s=0.01)
    real, calls = ckpt.manager.restore, []

    def flaky(step, args=None, failures=2):
        calls.append(step)
        if len(calls) <= failures:
            raise ConnectionError("connection reset by peer")
        return real(step, args=args)

    monkeypatch.setattr(ckpt.manager, "restore", flaky)
    it = pipeline.make_iterator(c.data, "train", seed=c.seed, train=True)
    step, _ = ckpt.restore(setup.abstract, it, c)
    assert step == 4 and calls[:3] == [4, 4, 4]  # two failed reads, then the read that worked

    monkeypatch.setattr(ckpt.manager, "restore", lambda *a, **k: (_ for _ in ()).throw(
        TimeoutError("read timed out")))
    with pytest.raises(CheckpointError, match="step 4 .* transient, so nothing was moved"):
        ckpt.restore(setup.abstract, it, c)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]


def test_config_saved_before_a_key_was_added_resumes_as_its_old_value():
    """A run saved before model.time_scale existed trained at 1000 (and before model.disc_width,
    without a discriminator): with the keys filled in it matches today's flow config (resume
    goes on) and still differs from a MeanFlow config at 1."""
    now = moving_digits.get_config("smoke").to_dict()
    saved = json.loads(json.dumps(now))
    for key in ("time_scale", "disc_width", "disc_layers"):
        del saved["model"][key]
    assert checkpoint.config_mismatch(saved, now) == [
        "model.disc_layers: checkpoint=None now=3", "model.disc_width: checkpoint=None now=0",
        "model.time_scale: checkpoint=None now=1000.0"]
    assert checkpoint.config_mismatch(checkpoint.with_added_keys(saved), now) == []
    now["model"]["time_scale"] = 1.0
    assert checkpoint.config_mismatch(saved, now) == [
        "model.time_scale: checkpoint=1000.0 now=1.0"]
    assert checkpoint.with_added_keys({"seed": 0}) == {"seed": 0}  # no model section: no key
    # A VAE's config gets no DiT keys: a VAE run resumes.
    from configs import vae_moving_digits
    vae_cfg = vae_moving_digits.get_config("smoke").to_dict()
    saved = checkpoint.with_added_keys(json.loads(json.dumps(vae_cfg)))
    assert checkpoint.config_mismatch(saved, checkpoint.with_added_keys(vae_cfg)) == []


def test_nonfinite_update_is_skipped_or_stops(data_dir, tmp_path):
    c = smoke_config(data_dir)
    mesh = sharding.make_mesh(c.mesh)
    setup = Setup(c, mesh)
    objective = diffusion.make_objective(c.objective)
    batch = first_batch(c)
    batch["video"][0, 0, 0, 0, 0] = np.nan
    state = setup.init()
    before = jax.device_get(state.params)
    with sharding.use(mesh, c.sharding_rules):
        state, metrics = jax.jit(functools.partial(steps.train_step, setup, objective))(
            state, batches.global_batch(batch, mesh))
    assert not bool(metrics["finite"]) and int(state.step) == 1
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), before)

    # An absurd learning rate makes the weights overflow: the run stops and says why.
    c = smoke_config(data_dir, **{"optim.lr": 1e38, "optim.clip_norm": 0.0,
                                  "train.nonfinite": "stop", "train.log_every": 1})
    summary = train_lib.train(c, str(tmp_path / "stop"))
    assert summary["stopped_for"].startswith("non-finite loss at step")
    assert summary["step"] < c.train.steps and summary["failed"]

    # Skipping: from step 2 on every update overflows (Adam's first step is lr-sized, finite),
    # so every step is skipped; after max_skipped_steps in a row the run stops, and its newest
    # checkpoint holds the last finite weights.
    c = smoke_config(data_dir, **{"optim.lr": 1e38, "optim.clip_norm": 0.0, "optim.warmup_steps": 0,
                                  "train.max_skipped_steps": 3, "train.log_every": 1,
                                  "train.steps": 8, "train.ckpt_every": 2})
    summary = train_lib.train(c, str(tmp_path / "skip"))
    assert summary["failed"] and "3 consecutive steps" in summary["stopped_for"]
    assert summary["step"] == 4 and summary["skipped"] == 3
    from vidit import run as run_lib
    last = run_lib.load(str(tmp_path / "skip"))
    assert last.step == 2
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(last.params)))


def test_an_error_in_the_loop_finishes_the_save_in_flight(data_dir, tmp_path, monkeypatch):
    c = smoke_config(data_dir, **{"train.steps": 6, "train.ckpt_every": 3, "train.log_every": 1})
    from vidit import metrics

    def scalars(self, step, values):
        if step == 4:
            raise RuntimeError("disk full")

    monkeypatch.setattr(metrics.MetricWriter, "scalars", scalars)
    with pytest.raises(RuntimeError, match="disk full"):
        train_lib.train(c, str(tmp_path))
    # The step-3 save was written in the background; it is whole when the error comes out.
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3"]
    step, _ = checkpoint.restore_params(tmp_path / "checkpoints",
                                        Setup(c, sharding.make_mesh(c.mesh)).abstract)
    assert step == 3


@pytest.mark.parametrize("mesh_cfg, message", [
    (dict(data=3, fsdp=1, tensor=1, sequence=1), "multiply to 3"),
    (dict(data=-1, fsdp=3), "do not divide"),
])
def test_bad_mesh_is_rejected(mesh_cfg, message):
    with pytest.raises(ConfigError, match=message):
        sharding.make_mesh(mesh_cfg)


def test_bad_batch_is_rejected(data_dir, tmp_path):
    c = smoke_config(data_dir, **{"data.batch_size": 12})
    with pytest.raises(ConfigError, match="config.data.batch_size=12"):
        train_lib.train(c, str(tmp_path))


def test_export_round_trip_and_shape_check(data_dir, tmp_path):
    c = smoke_config(data_dir, **{"train.steps": 2, "train.ckpt_every": 2})
    workdir, out = str(tmp_path / "run"), str(tmp_path / "export")
    train_lib.train(c, workdir, stop_at=2)
    export.export(workdir, out)
    from_workdir, from_export = run_lib.load(workdir), run_lib.load(out)
    assert from_workdir.step == 2 and run_lib.load(workdir, step=2).step == 2
    assert from_export.step is None
    with pytest.raises(LoadError, match=r"no checkpoint at step 1; it has steps \[2\]"):
        run_lib.load(workdir, step=1)
    with pytest.raises(LoadError, match="is an export"):
        run_lib.load(out, step=2)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(from_export.params),
                 jax.device_get(from_workdir.params))
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    cfg["model"]["mlp_ratio"] = 2.0
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(LoadError, match="mlp/fc1/kernel"):
        run_lib.load(out)


def test_sampler_is_deterministic(data_dir):
    c = smoke_config(data_dir)
    mesh = sharding.make_mesh(c.mesh)
    setup = Setup(c, mesh)
    objective = diffusion.make_objective(c.objective)
    state = setup.init()
    params = jax.tree.map(lambda p: p + 0.01, state.params)  # non-zero output layer
    fn = jax.jit(functools.partial(steps.sample, setup, objective), static_argnames=("steps", "guidance"))
    noise = jax.random.normal(jax.random.key(0), (8, 8, 32, 32, 1))
    cond = {"label": np.arange(8, dtype=np.int32)}
    a = fn(params, noise, cond, steps=3, guidance=2.0)
    b = fn(params, noise, cond, steps=3, guidance=2.0)
    other = fn(params, noise * 0.5, cond, steps=3, guidance=2.0)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(a), np.asarray(other))


def _cli(*args, timeout=600, cwd=ROOT, pythonpath=True):
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if pythonpath:
        env["PYTHONPATH"] = ROOT
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_cli_rejects_unknown_config_key(tmp_path):
    r = _cli("-m", "vidit.train", "--config", "configs/moving_digits.py:smoke",
             "--workdir", str(tmp_path), "--config.model.widht=3")
    assert r.returncode != 0 and "widht" in r.stderr


def test_cli_rejects_unknown_variant(tmp_path):
    r = _cli("-m", "vidit.train", "--config", "configs/moving_digits.py:smok",
             "--workdir", str(tmp_path))
    assert r.returncode != 0 and "smok" in r.stderr


@pytest.mark.slow
def test_cli_train_sample_export(data_dir, tmp_path):
    """From another folder: a config that imports its sibling (quickstart -> moving_digits)
    still loads (vidit.cli.make_importable)."""
    workdir = str(tmp_path / "run")
    r = _cli("-m", "vidit.train", "--config", os.path.join(ROOT, "configs/quickstart.py:smoke"),
             "--workdir", workdir, f"--config.data.data_dir={data_dir}",
             cwd=str(tmp_path), pythonpath=False)
    assert r.returncode == 0, r.stderr[-3000:]
    # stderr is a pipe, not a terminal: progress comes as log lines, never bar redraws
    assert "train: 6/6 steps (100%)" in r.stderr and "\r" not in r.stderr
    assert os.path.exists(os.path.join(workdir, "samples", "step_0000006.mp4"))
    r = _cli("-m", "vidit.export", "--workdir", workdir, "--out", str(tmp_path / "exp"))
    assert r.returncode == 0, r.stderr[-3000:]
    r = _cli("-m", "vidit.sample", "--workdir", str(tmp_path / "exp"), "--num", "2",
             "--label", "3", "--steps", "2", "--out", str(tmp_path / "s.gif"))
    assert r.returncode == 0 and os.path.getsize(tmp_path / "s.gif") > 0, r.stderr[-3000:]
    r = _cli("-m", "vidit.sample", "--workdir", str(tmp_path / "missing"), "--out",
             str(tmp_path / "x.gif"))
    assert r.returncode != 0 and "missing does not exist" in r.stderr


@pytest.mark.slow
def test_sigterm_saves_and_resume_continues(data_dir, tmp_path):
    """Preemption: SIGTERM mid-run writes a checkpoint and exits 0; the same command resumes."""
    import signal
    import time

    workdir = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "vidit.train", "--config", "configs/moving_digits.py:smoke",
           "--workdir", workdir, f"--config.data.data_dir={data_dir}",
           "--config.train.progress=False", "--config.train.steps=1000",
           "--config.train.log_every=1", "--config.train.ckpt_every=0"]
    log_path = tmp_path / "log.txt"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while "step 3:" not in log_path.read_text() and time.time() < deadline:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, log_path.read_text()[-3000:]
    text = log_path.read_text()
    assert "saving a checkpoint and exiting" in text and "preemption signal" in text
    saved = [int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit()]
    assert len(saved) == 1 and 3 <= saved[0] < 1000
    r = _cli("-m", "vidit.train", "--config", "configs/moving_digits.py:smoke", "--workdir",
             workdir, f"--config.data.data_dir={data_dir}", "--config.train.progress=False",
             "--config.train.steps=1000", "--config.train.ckpt_every=0",
             f"--stop_at={saved[0] + 2}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from step {saved[0]}" in r.stderr
    assert str(saved[0] + 2) in os.listdir(os.path.join(workdir, "checkpoints"))


def test_gradient_accumulation_averages_micro_batches(data_dir):
    """grad_accum=2: the loss (and update) is the mean over the two halves of the batch."""
    c = smoke_config(data_dir, **{"optim.grad_accum": 2, "train.cond_drop_prob": 0.0})
    mesh = sharding.make_mesh(dict(fsdp=1), jax.devices()[:1])
    setup = Setup(c, mesh)
    objective = diffusion.make_objective(c.objective)
    state = setup.init()
    batch = first_batch(c)
    _, metrics = jax.jit(functools.partial(steps.train_step, setup, objective))(state, batch)
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), 0)
    halves = []
    for i in range(2):
        part = {k: v[i * 4:(i + 1) * 4] for k, v in batch.items()}
        _, loss_rng = jax.random.split(jax.random.fold_in(rng, i))
        loss, _ = objective.loss(setup.model(state.params), part["video"],
                                 {"label": part["label"]}, loss_rng)
        halves.append(float(loss))
    np.testing.assert_allclose(float(metrics["loss"]), np.mean(halves), rtol=1e-5)


def test_power_ema_weights_each_step_by_its_power():
    """ema_power p: after N steps the EMA is sum_k k^p theta_k / sum_k k^p (EDM2's power EMA),
    whatever N; p = 0 keeps the (1 + s) / (10 + s) warmup; ema_decay caps both."""
    from vidit.train_state import ema_decay_at, ema_update
    p, n = 16.0, 400
    theta = np.random.default_rng(0).normal(size=n + 1)  # theta[k]: the weights after step k
    ema = np.float32(theta[0])
    for s in range(n):
        ema = ema_update(ema, np.float32(theta[s + 1]), 1.0, s, p)
    k = np.arange(1, n + 1, dtype=np.float64)
    np.testing.assert_allclose(float(ema), (k ** p * theta[1:]).sum() / (k ** p).sum(),
                               rtol=0.02)
    np.testing.assert_allclose([float(ema_decay_at(s, 0.999)) for s in (0, 90)], [0.1, 0.91])
    assert float(ema_decay_at(10 ** 6, 0.999, p)) == np.float32(0.999)


def test_config_ema_power_reaches_the_train_step(data_dir):
    """A power EMA starts at the weights themselves (decay 0 at step 0); the warmup does not."""
    mesh = sharding.make_mesh(dict(fsdp=1), jax.devices()[:1])
    for power, same in ((16.0, True), (0.0, False)):
        c = smoke_config(data_dir, ema_power=power)
        setup = Setup(c, mesh)
        step = jax.jit(functools.partial(steps.train_step, setup,
                                         diffusion.make_objective(c.objective)))
        state, _ = step(setup.init(), first_batch(c))
        gap = max(float(np.abs(np.asarray(e) - np.asarray(q)).max())
                  for e, q in zip(jax.tree.leaves(state.ema_params), jax.tree.leaves(state.params)))
        assert (gap == 0.0) == same, (power, gap)


@pytest.mark.parametrize("scan", [False, True])
def test_muon_orthogonalises_the_block_matrices_and_adams_the_rest(data_dir, scan):
    """optim.name='muon': the first update of a block's weight matrix is lr * 0.2 *
    sqrt(max(fan_in, fan_out)) times a near-orthogonal matrix (Muon's 5 Newton-Schulz steps put
    the singular values in about [0.7, 1.2], the smallest of a square matrix lower; a stacked
    projection such as qkv's q, k, v each on its own), where the gradient's own singular values
    spread widely; the patch embedding takes AdamW's first step; the train step runs."""
    from vidit.train_state import MUON_RMS
    c = smoke_config(data_dir, **{"optim.name": "muon", "optim.warmup_steps": 0,
                                  "optim.schedule": "constant", "optim.lr": 1e-2,
                                  "optim.clip_norm": 0.0, "model.scan_layers": scan})
    mesh = sharding.make_mesh(dict(fsdp=1), jax.devices()[:1])
    setup = Setup(c, mesh)
    state = setup.init()
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(p.size % 97), p.shape),
                         state.params)
    updates, _ = setup.tx.update(grads, setup.tx.init(state.params), state.params)
    qkv = np.asarray(updates["blocks"]["attn"]["qkv"]["kernel"] if scan else
                     updates["blocks"][0]["attn"]["qkv"]["kernel"])
    if scan:
        qkv = qkv[0]
    width = qkv.shape[0]
    for i in range(3):  # q, k and v: each [width, heads * head_dim] on its own
        m = qkv[:, i].reshape(width, -1)
        scale = 1e-2 * MUON_RMS * np.sqrt(max(m.shape))
        sv = np.linalg.svd(m / scale, compute_uv=False)
        assert sv.max() < 1.3 and np.mean((sv > 0.6) & (sv < 1.3)) >= 0.9, sv
        g = np.asarray(grads["blocks"]["attn"]["qkv"]["kernel"][0] if scan else
                       grads["blocks"][0]["attn"]["qkv"]["kernel"])[:, i].reshape(width, -1)
        g_sv = np.linalg.svd(g, compute_uv=False)
        assert np.mean((g_sv / np.median(g_sv) > 0.6) & (g_sv / np.median(g_sv) < 1.3)) < 0.6
    # Nesterov AdamW's first step: |update| = lr * (1 + b1 / (1 + b1)) on every entry.
    patch = np.asarray(updates["patch_embed"]["kernel"])
    np.testing.assert_allclose(np.abs(patch), 1e-2 * (1 + 0.9 / 1.9), rtol=1e-3)
    assert setup.tx.init(state.params) is not None
    step = jax.jit(functools.partial(steps.train_step, setup,
                                     diffusion.make_objective(c.objective)))
    state, m = step(state, first_batch(c))
    assert bool(m["finite"])


def test_muon_options_exclude_modules_and_set_newton_schulz_steps(data_dir):
    """optim.muon_exclude keeps the named block modules (adaLN's 'ada') on AdamW: their first
    update is Nesterov AdamW's +-lr * (1 + b1 / (1 + b1)); optim.muon_ns_steps sets how far each
    update is orthogonalised: one Newton-Schulz step leaves the singular values spread wider
    than five."""
    def first_updates(**overrides):
        c = smoke_config(data_dir, **{"optim.name": "muon", "optim.warmup_steps": 0,
                                      "optim.schedule": "constant", "optim.lr": 1e-2,
                                      "optim.clip_norm": 0.0, **overrides})
        setup = Setup(c, sharding.make_mesh(dict(fsdp=1), jax.devices()[:1]))
        params = setup.init().params
        grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(p.size % 97), p.shape),
                             params)
        return setup.tx.update(grads, setup.tx.init(params), params)[0]["blocks"][0]

    adam_step = 1e-2 * (1 + 0.9 / 1.9)
    default = first_updates()
    assert not np.allclose(np.abs(np.asarray(default["ada"]["kernel"])), adam_step, rtol=1e-3)
    excluded = first_updates(**{"optim.muon_exclude": ("ada",)})
    np.testing.assert_allclose(np.abs(np.asarray(excluded["ada"]["kernel"])), adam_step,
                               rtol=1e-3)
    np.testing.assert_allclose(excluded["attn"]["qkv"]["kernel"],
                               default["attn"]["qkv"]["kernel"], rtol=1e-5, atol=1e-8)

    def spread(update):  # q's singular values: max / median
        q = np.asarray(update["attn"]["qkv"]["kernel"])[:, 0]
        sv = np.linalg.svd(q.reshape(q.shape[0], -1), compute_uv=False)
        return sv.max() / np.median(sv)

    assert spread(first_updates(**{"optim.muon_ns_steps": 1})) > 1.5 * spread(default)
    with pytest.raises(ConfigError, match=r"muon_exclude names \['adaln'\]"):
        first_updates(**{"optim.muon_exclude": ("adaln",)})
    with pytest.raises(ConfigError, match="muon_ns_steps=0"):
        first_updates(**{"optim.muon_ns_steps": 0})


def test_muon_refuses_what_it_cannot_train(data_dir):
    c = smoke_config(data_dir, **{"optim.name": "lion"})
    with pytest.raises(ConfigError, match="config.optim.name='lion'"):
        Setup(c, sharding.make_mesh(dict(fsdp=1), jax.devices()[:1]))


def test_evaluate_reports_every_step_count(data_dir, tmp_path, monkeypatch):
    """vidit.evaluate end to end on a smoke run (an untrained classifier stands in: fast)."""
    from flax import nnx
    from vidit import evaluate
    from vidit.eval import classifier

    c = smoke_config(data_dir, **{"train.steps": 2, "train.ckpt_every": 2, "sample.steps": 3})
    workdir = str(tmp_path / "run")
    train_lib.train(c, workdir, stop_at=2)
    asked = []
    monkeypatch.setattr(evaluate, "classifier_for", lambda data_cfg, steps: asked.append(
        steps) or classifier.FrameClassifier(rngs=nnx.Rngs(0)))
    report = evaluate.evaluate(workdir, step_counts=[1, 2], num=12, batch=8,
                               classifier_steps=600)
    assert [r["steps"] for r in report["results"]] == [1, 2]
    assert asked == [600] and report["classifier_steps"] == 600  # the quickstart's quick check
    for r in report["results"]:
        assert 0.0 <= r["class_accuracy"] <= 1.0 and r["frechet_distance"] >= 0
        assert 0.0 <= r["frame_agreement"] <= 1.0
        assert 0.0 <= r["precision"] <= 1.0 and 0.0 <= r["recall"] <= 1.0
        assert r["samples_per_s"] > 0
    assert "| 2 |" in evaluate.markdown(report)
    # Without step counts: the run's own sampler (config.sample.steps), as the quickstart samples.
    default = evaluate.evaluate(workdir, num=4, batch=4, classifier_steps=600)
    assert [r["steps"] for r in default["results"]] == [3]


def test_evaluate_classifier_only_caches_the_scorer_for_a_config(data_dir, tmp_path,
                                                                 monkeypatch):
    """`vidit.evaluate --config ... --classifier_only` (the quickstart trains its quick check's
    classifier beside the model): trained for the config's data, cached where the evaluation
    of the trained run looks, which then loads it instead of training another."""
    from vidit import evaluate
    from vidit.eval import classifier

    monkeypatch.setenv("VIDIT_CACHE", str(tmp_path / "cache"))
    c = smoke_config(data_dir)
    evaluate.prepare_classifier(c, 5)
    (cached,) = (tmp_path / "cache" / "classifiers").iterdir()
    assert "_steps5" in cached.name and classifier.saved_info(cached)["extra"]["steps"] == 5
    trained = []
    monkeypatch.setattr(classifier, "train_classifier", lambda *a, **k: trained.append(1))
    assert isinstance(evaluate.classifier_for(c.data, 5), classifier.FrameClassifier)
    assert not trained
    with c.unlocked():
        c.data.autoencoder = str(tmp_path / "vae")  # a latent DiT: scored on its VAE's pixels
    with pytest.raises(ValueError, match="pixel-space config"):
        evaluate.prepare_classifier(c, 5)


def test_vp_objective_trains_and_samples(data_dir, tmp_path):
    """The DiT paper's objective runs through the same trainer (config variant objective=vp)."""
    c = moving_digits.get_config("smoke,objective=vp")
    c.data.data_dir = data_dir
    c.train.progress = False
    assert c.objective.name == "vp" and c.objective.prediction == "v"
    summary = train_lib.train(c, str(tmp_path), stop_at=3)
    assert summary["step"] == 3 and all(np.isfinite(summary["losses"]))
    c2 = moving_digits.get_config("smoke")
    c2.data.data_dir = data_dir
    with pytest.raises(CheckpointError, match="objective.name"):
        train_lib.train(c2, str(tmp_path))  # a flow config must not resume a VP run


def test_meanflow_trains_and_samples_in_one_step(data_dir, tmp_path):
    """MeanFlow (with its endpoint rows) through the same trainer; the one-step sampler makes
    finite videos."""
    from vidit import sample as sample_lib
    c = moving_digits.get_config("smoke,objective=meanflow")
    c.data.data_dir = data_dir
    c.train.progress = False
    c.sample.num = 0
    assert c.model.interval_input
    # the endpoint rows start at 2/3 of the (smoke) run: steps 4 and 5 of 6 train them too
    assert c.objective.endpoint_fraction > 0 and c.objective.endpoint_start == 4
    assert c.objective.endpoint_weight > 0 and c.objective.score_weight > 0  # terms on
    summary = train_lib.train(c, str(tmp_path))
    assert summary["step"] == c.train.steps and all(np.isfinite(summary["losses"]))
    videos, _ = sample_lib.generate(str(tmp_path), num=2, label=3, steps_=1)
    assert videos.shape[0] == 2 and np.isfinite(videos).all()
    c.model.interval_input = False
    with pytest.raises(ConfigError, match="interval_input=True"):
        checks.validate(c, sharding.make_mesh(dict(data=-1)))


def test_shortcut_trains_and_samples_in_one_step(data_dir, tmp_path):
    """Shortcut models through the same trainer (EMA targets); one-step samples are finite."""
    from vidit import sample as sample_lib
    c = moving_digits.get_config("smoke,objective=shortcut")
    c.data.data_dir = data_dir
    c.train.progress = False
    c.sample.num = 0
    assert c.model.interval_input and c.objective.consistency_fraction > 0
    summary = train_lib.train(c, str(tmp_path))
    assert summary["step"] == c.train.steps and all(np.isfinite(summary["losses"]))
    videos, _ = sample_lib.generate(str(tmp_path), num=2, label=3, steps_=1)
    assert videos.shape[0] == 2 and np.isfinite(videos).all()


def test_distill_from_a_flow_checkpoint_resumes_and_samples_in_one_step(data_dir, tmp_path):
    """A flow teacher trained for two steps, then a distill student of its Orbax checkpoint: the
    teacher is read from teacher_workdir at every start (not stored in the student's
    checkpoints), a resumed run reads it again, and the student samples in one step."""
    from vidit import sample as sample_lib
    from vidit import teacher as teacher_lib
    teacher_dir, student_dir = str(tmp_path / "teacher"), str(tmp_path / "student")
    train_lib.train(smoke_config(data_dir), teacher_dir, stop_at=2)
    c = moving_digits.get_config("smoke,objective=distill")
    c.data.data_dir = data_dir
    c.train.progress = False
    c.sample.num = 0
    c.objective.teacher_workdir = teacher_dir
    first = train_lib.train(c, student_dir, stop_at=3)
    second = train_lib.train(c, student_dir)
    assert second["step"] == c.train.steps
    assert all(np.isfinite(first["losses"] + second["losses"]))
    videos, _ = sample_lib.generate(student_dir, num=2, label=3, steps_=1)
    assert videos.shape[0] == 2 and np.isfinite(videos).all()
    c.objective.teacher_workdir = str(tmp_path / "gone")
    with pytest.raises(teacher_lib.TeacherError, match="gone"):
        train_lib.train(c, str(tmp_path / "other"))
