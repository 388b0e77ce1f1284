"""Is the input pipeline a bottleneck? Grain pipeline clips/s vs train-step clips/s; prints JSON.

    python benchmarks/pipeline_throughput.py
    python benchmarks/pipeline_throughput.py --configs configs/quickstart.py --batches 200
    python benchmarks/pipeline_throughput.py --workers 2 --latent ""  # also 2 workers, no latent

For each pixel config (--configs):
  * pipeline: the trainer's own train iterator (`pipeline.make_iterator(config.data, "train",
    seed=config.seed, train=True)`, as vidit/train.py builds it: ArrayRecord read, decode, random
    temporal crop, resize, scale, batch), with the config's data.num_workers and with 0 workers
    (and any --workers); after --warmup batches, --batches batches are timed;
  * step: the jitted train step (steps.jit_train_step, as benchmarks/train_step.py times it: one
    compile, one warm-up call, then the median of --steps blocked calls) on one real batch;
  * ratio = pipeline clips/s / step clips/s; the pipeline is not the bottleneck when it is > 1;
  * trainer_loop: --loop_steps iterations of the trainer's loop on a fresh train iterator (next
    batch, global_batch, step, blocking only at the end), the two sharing the cores as they do
    in training.

Latent part (--latent, default cached,online; '' skips it), with configs/vae_moving_digits.py's
VAE at RANDOM params (numpy draws, not trained; speed does not depend on the weights): the
encoder's clips/s (jitted Autoencoder.encode_raw, what encode_latents runs) on a
latent_digits-shaped batch, and the latent DiT train step of configs/latent_digits.py (cached:
latents in the batch; online: pixel clips encoded inside the step). vidit/autoencoder.py reads
the VAE's structure from a run folder (config.json + latent_stats.json); the benchmark writes a
stub one in a temporary folder (the VAE config, identity statistics) and passes the random
params as the step argument, so no trained checkpoint is needed.

A worker count whose pipeline fails to start is reported with its error instead of a rate.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from train_step import benchmark_config  # noqa: E402  (the config loader of train_step.py)

from vidit import autoencoder as autoencoder_lib, batches, checks, diffusion  # noqa: E402
from vidit import host_malloc, latent_stats, run as run_lib, sharding, steps  # noqa: E402
from vidit.train_state import Setup  # noqa: E402

host_malloc.tune()  # as the vidit commands do, before JAX starts its threads


_START = time.perf_counter()


def progress(msg: str) -> None:
    """Progress on stderr (the JSON goes to stdout)."""
    print(f"[{time.perf_counter() - _START:6.1f}s] {msg}", file=sys.stderr, flush=True)


def load_config(spec: str):
    """config file[:variant], on one device (benchmarks/train_step.py's benchmark_config)."""
    return benchmark_config(argparse.Namespace(config=spec, attention="", dtype="", remat="",
                                               scan_layers=""))


def clips_of(batch: dict) -> int:
    return int(len(batch["label"]))


# ---------------------------------------------------------------------------------------------
def pipeline_rate(config, workers: int, batches: int, warmup: int) -> dict:
    """clips/s of the trainer's train iterator with `workers` Grain worker processes."""
    from data_pipelines import pipeline
    data = config.data.copy_and_resolve_references()
    data.num_workers = workers
    progress(f"pipeline {workers} workers")
    t0 = time.perf_counter()
    it = pipeline.make_iterator(data, "train", seed=config.seed, train=True)
    for _ in range(warmup):
        next(it)
    warmup_s = time.perf_counter() - t0
    clips = 0
    t0 = time.perf_counter()
    for _ in range(batches):
        clips += clips_of(next(it))
    elapsed = time.perf_counter() - t0
    if hasattr(it, "close"):
        it.close()  # stops worker processes, if any
    return {"num_workers": workers, "batches": batches, "clips": clips,
            "seconds": round(elapsed, 4), "clips_per_s": clips / elapsed,
            "startup_and_warmup_s": round(warmup_s, 2)}


def step_rate(config, batch: dict, nsteps: int, autoencoder=None, loop_steps: int = 0) -> dict:
    """Median time of the compiled train step on `batch` (as benchmarks/train_step.py times it),
    and, with loop_steps, the trainer loop's time per step over that many steps of a fresh
    train iterator (its start-up and first batch excluded). `autoencoder`: a latent DiT's."""
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    checks.validate(config, mesh, autoencoder=autoencoder)
    setup = Setup(config, mesh, autoencoder=autoencoder)
    frozen = {} if autoencoder is None else {"autoencoder": autoencoder.params}
    objective = diffusion.make_objective(config.objective)
    state = setup.init()
    step = steps.jit_train_step(setup, objective)
    progress(f"train step: compiling (batch {config.data.batch_size})")
    with sharding.use(mesh, config.sharding_rules):
        gbatch = batches.global_batch(batch, mesh)
        t0 = time.perf_counter()
        compiled = step.lower(state, gbatch, frozen).compile()
        compile_s = time.perf_counter() - t0
        state, m = compiled(state, gbatch, frozen)  # warm-up
        jax.block_until_ready(m)
        times = []
        for _ in range(nsteps):
            t0 = time.perf_counter()
            state, m = compiled(state, gbatch, frozen)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t0)
        step_time = float(np.median(times))
        result = {"global_batch": int(config.data.batch_size), "params": setup.num_params(),
                  "compile_s": round(compile_s, 2), "step_time_s": step_time,
                  "step_times_s": [round(t, 4) for t in times],
                  "clips_per_s": config.data.batch_size / step_time,
                  "loss_finite": bool(m["finite"])}
        if loop_steps:  # vidit/train.py's loop: it blocks only when it logs
            from data_pipelines import pipeline
            train_iter = pipeline.make_iterator(config.data, "train", seed=config.seed, train=True)
            next(train_iter)  # the iterator's start-up is not the loop's cost
            t0 = time.perf_counter()
            for _ in range(loop_steps):
                local = next(train_iter)
                state, m = compiled(state, batches.global_batch(local, mesh), frozen)
            jax.block_until_ready((state, m))
            loop_s = (time.perf_counter() - t0) / loop_steps
            del train_iter
            result["trainer_loop"] = {
                "steps": loop_steps, "step_time_s": loop_s,
                "clips_per_s": config.data.batch_size / loop_s,
                "slowdown_vs_step_alone": loop_s / step_time}
    return result


def pixel_config(spec: str, args) -> dict:
    from data_pipelines import pipeline
    c = load_config(spec)
    d = c.data
    counts = [int(d.num_workers)] + [0] + [int(w) for w in args.workers.split(",") if w]
    counts = list(dict.fromkeys(counts))
    batch = next(pipeline.make_iterator(d, "train", seed=c.seed, train=True))
    step = step_rate(c, batch, args.steps, loop_steps=args.loop_steps)
    pipes = {}
    for w in counts:
        try:
            pipes[f"workers_{w}"] = pipeline_rate(c, w, args.batches, args.warmup)
        except Exception as e:  # noqa: BLE001  (a failing worker setup is a result, not a crash)
            if not w:
                raise
            progress(f"pipeline with {w} workers failed: {type(e).__name__}")
            pipes[f"workers_{w}"] = {"num_workers": w, "error": f"{type(e).__name__}: "
                                     f"{str(e).splitlines()[0]}"}
    config_rate = pipes[f"workers_{int(d.num_workers)}"].get("clips_per_s", 0.0)
    return {
        "clip": [int(d.num_frames), int(d.height), int(d.width), int(d.channels)],
        "global_batch": int(d.batch_size),
        "config_num_workers": int(d.num_workers),
        "pipeline": pipes,
        "step": step,
        "ratio_pipeline_over_step": {k: v["clips_per_s"] / step["clips_per_s"]
                                     for k, v in pipes.items() if "clips_per_s" in v},
        "pipeline_not_bottleneck": bool(config_rate / step["clips_per_s"] > 1),
    }


# ---------------------------------------------------------------------------------------------
def stub_vae_dir(vae_spec: str) -> str:
    """A VAE folder's config and identity latent statistics (no weights: the params are random
    and passed to the step directly)."""
    vc = load_config(vae_spec)
    path = tempfile.mkdtemp(prefix="vidit_stub_vae_")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(vc.to_dict(), f, indent=2, default=str)
    n = int(vc.model.latent_channels)
    with open(os.path.join(path, latent_stats.STATS_FILE), "w") as f:
        json.dump({"mean": [0.0] * n, "std": [1.0] * n,
                   "note": "benchmark stub: identity statistics, not measured"}, f)
    return path


def random_vae_params(ae: autoencoder_lib.Autoencoder, seed: int = 0):
    """Random VAE params of the right shapes, drawn in numpy (no compile): norm scales 1, biases
    0, other weights normal with std 1/sqrt(fan-in). Speed does not depend on the values."""
    from flax import nnx
    from vidit.models import vae
    abstract = nnx.eval_shape(lambda: vae.VideoVAE(ae.model_cfg, nnx.Rngs(params=seed)))
    shapes = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "scale":
            return jnp.ones(leaf.shape, leaf.dtype)
        if name == "bias" or len(leaf.shape) < 2:
            return jnp.zeros(leaf.shape, leaf.dtype)
        fan_in = int(np.prod(leaf.shape[:-1]))
        return jnp.asarray(rng.standard_normal(leaf.shape) / np.sqrt(fan_in), leaf.dtype)
    return jax.tree_util.tree_map_with_path(draw, shapes)


def latent_part(args) -> dict:
    from data_pipelines import pipeline
    notes = []
    vae_dir = stub_vae_dir(args.vae_config)
    ae = autoencoder_lib.Autoencoder(vae_dir, run_lib.read_config(vae_dir),
                                     latent_stats.read(vae_dir))
    params = ae.params = random_vae_params(ae)
    nparams = int(sum(x.size for x in jax.tree.leaves(params)))
    out = {"vae_config": args.vae_config,
           "vae_params": f"random (numpy seed 0: weights normal / sqrt(fan-in), norm scales 1, "
                         f"biases 0), {nparams} encoder+decoder params, NOT trained: throughput "
                         "only (speed does not depend on the weights)",
           "latent_stats": "identity (mean 0, std 1) stub, not measured"}

    # Encoder: a batch shaped as latent_digits (online) feeds its train step: real pixel clips.
    online = load_config(f"{args.latent_config}:latents=online,autoencoder={vae_dir}")
    it = pipeline.make_iterator(online.data, "train", seed=online.seed, train=True)
    pixel_batch = next(it)
    video = jnp.asarray(pixel_batch["video"])
    encode = jax.jit(ae.encode_raw)
    progress("encoder: compiling")
    t0 = time.perf_counter()
    compiled = encode.lower(params, video).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(params, video))  # warm-up
    times = []
    for _ in range(args.encode_calls):
        t0 = time.perf_counter()
        z = compiled(params, video)
        jax.block_until_ready(z)
        times.append(time.perf_counter() - t0)
    t = float(np.median(times))
    out["encoder"] = {"input": list(video.shape), "latent": list(z.shape),
                      "compile_s": round(compile_s, 2), "call_time_s": t,
                      "call_times_s": [round(x, 4) for x in times],
                      "clips_per_s": video.shape[0] / t}

    modes = [m for m in args.latent.split(",") if m]
    out["latent_dit_step"] = {}
    for mode in modes:
        c = load_config(f"{args.latent_config}:latents={mode},autoencoder={vae_dir}")
        entry = {"config": f"{args.latent_config}:latents={mode}"}
        progress(f"latent DiT step, {mode}")
        if mode == "online":
            batch = pixel_batch
        else:  # cached: raw posterior means, shaped as the encoder writes them
            rng = np.random.default_rng(0)
            b = int(c.data.batch_size)
            batch = {"latent": rng.standard_normal((b,) + tuple(z.shape[1:])).astype(np.float32),
                     "label": rng.integers(0, 10, (b,)).astype(np.int32),
                     "text": np.ones((b, int(c.model.text_len)), np.int32)}
            notes.append("latent_digits (cached): its pipeline reads the latent dataset "
                         "encode_latents writes from a trained VAE (none on disk here), so the "
                         "step is timed on random latents of that shape and no pipeline rate or "
                         "ratio is given for it")
        entry["step"] = step_rate(c, batch, args.steps, autoencoder=ae)
        if mode == "online":
            p = pipeline_rate(c, int(c.data.num_workers), args.batches, args.warmup)
            entry["pipeline"] = p
            entry["ratio_pipeline_over_step"] = p["clips_per_s"] / entry["step"]["clips_per_s"]
            entry["pipeline_not_bottleneck"] = bool(entry["ratio_pipeline_over_step"] > 1)
        entry["step_over_encoder_time"] = entry["step"]["step_time_s"] / (
            t * c.data.batch_size / video.shape[0])
        out["latent_dit_step"][mode] = entry
    del it
    shutil.rmtree(vae_dir, ignore_errors=True)
    out["notes"] = notes + [
        "the latent DiT steps run with the random VAE params and a stub VAE folder (config.json "
        "+ identity latent_stats.json in a temp dir): the step's computation is the real one, its "
        "loss values are meaningless",
        "step_over_encoder_time: latent DiT step time / encoder time for the same number of clips"]
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--configs", default="configs/quickstart.py,configs/moving_digits.py",
                   help="comma-separated pixel config files[:variant]")
    p.add_argument("--batches", type=int, default=40, help="timed pipeline batches per run")
    p.add_argument("--warmup", type=int, default=5, help="pipeline batches before the timing")
    p.add_argument("--workers", default="",
                   help="extra Grain worker counts to measure (the config's and 0 always are)")
    p.add_argument("--steps", type=int, default=5, help="timed train steps")
    p.add_argument("--loop_steps", type=int, default=10,
                   help="trainer-loop steps (pipeline + step together); 0 skips")
    p.add_argument("--encode_calls", type=int, default=5, help="timed encoder calls")
    p.add_argument("--latent", default="cached,online",
                   help="latent DiT step modes to time, of cached,online ('' skips the whole "
                        "latent part)")
    p.add_argument("--vae_config", default="configs/vae_moving_digits.py")
    p.add_argument("--latent_config", default="configs/latent_digits.py")
    args = p.parse_args()

    started = time.perf_counter()
    result = {"devices": str(jax.devices()[0].platform), "cpu_count": os.cpu_count(),
              "configs": {}}
    for spec in [s for s in args.configs.split(",") if s]:
        progress(spec)
        result["configs"][spec] = pixel_config(spec, args)
    if args.latent:
        result["latent"] = latent_part(args)
    result["notes"] = [
        "pipeline_not_bottleneck: pipeline clips/s with the config's data.num_workers / the "
        "train step's clips/s > 1; ratio_pipeline_over_step lists every worker count measured",
        "trainer_loop: the train iterator and the step sharing the cores, as in vidit.train; "
        "slowdown_vs_step_alone near 1 means the pipeline costs the loop little",
        "one run on a shared machine: rates are noisy",
    ] + (["the configs' data.num_workers is 0, so 'config's count' and 0 workers are one "
          "measurement"] if all(v["config_num_workers"] == 0
                                for v in result["configs"].values()) and result["configs"] else [])
    result["total_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
