"""Training in shape buckets vs one fixed shape of the same token count; prints JSON.

    python benchmarks/buckets.py
    python benchmarks/buckets.py --buckets "4x32x32,2x32x64,2x64x32,1x64x64,16x16x16" --rounds 5

A DiT (default DiT-S, 4 latent channels, patch 1x2x2) trains with the trainer's own pieces: one
compiled step per shape (distributed.CompiledOnce, as vidit.train) and device time per step
measured off the loop's thread (metrics.StepTimes). Each round runs --steps steps of the
reference shape alone (the fixed-shape run), then --steps steps drawn at random from the
buckets (the bucketed run, a new shape on most steps). Every bucket has the reference's tokens
per batch, so their tokens/s should match the reference's; the JSON gives each bucket's median
tokens/s over the reference's median from the same run, and the compiled step's temporary
memory per shape (XLA's memory_analysis).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_pipelines import buckets as bucket_lib  # noqa: E402
from vidit import config_lib, diffusion, distributed, flops, metrics, sharding, steps  # noqa: E402
from vidit.train_state import Setup  # noqa: E402
from vidit import host_malloc  # noqa: E402

host_malloc.tune()  # as the vidit commands do, before JAX starts its threads


def make_batch(rng, bucket: bucket_lib.Bucket, channels: int) -> dict:
    return {"video": jnp.asarray(rng.uniform(-1, 1, (bucket.batch_size,) + bucket.shape
                                             + (channels,)).astype(np.float32)),
            "label": jnp.asarray(rng.integers(0, 10, bucket.batch_size).astype(np.int32))}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", default="S")
    p.add_argument("--reference", default="4x32x32", help="the fixed shape FxHxW")
    p.add_argument("--buckets", default="4x32x32,2x32x64,2x64x32,1x64x64,16x16x16")
    p.add_argument("--batch", type=int, default=2, help="the reference's batch")
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--patch", default="1,2,2")
    p.add_argument("--steps", type=int, default=12, help="steps per run per round")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()

    frames, height, width = (int(n) for n in args.reference.split("x"))
    c = config_lib.base_config()
    config_lib.set_size(c.model, args.size)
    c.data.num_frames, c.data.height, c.data.width = frames, height, width
    c.data.channels = c.model.channels = args.channels
    c.data.batch_size = args.batch
    c.data.bucket_batch_multiple = 1
    c.data.buckets = args.buckets
    c.model.patch = tuple(int(n) for n in args.patch.split(","))
    c.mesh = dict(data=1, fsdp=1, tensor=1, sequence=1)
    buckets = bucket_lib.from_config(c.data)
    reference = bucket_lib.Bucket(frames, height, width, args.batch)

    mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
    setup = Setup(c, mesh)
    objective = diffusion.make_objective(c.objective)
    state = setup.init()
    step = distributed.CompiledOnce(steps.jit_train_step(setup, objective), "train_step")
    rng = np.random.default_rng(0)
    data = {b.name: make_batch(rng, b, args.channels) for b in buckets + [reference]}
    cost = {b.name: flops.train_cost(c, b.shape + (args.channels,), b.batch_size)
            for b in buckets + [reference]}
    timer = metrics.StepTimes()

    def run(names, tag):
        nonlocal state
        for name in names:
            with sharding.use(mesh, c.sharding_rules):
                state, m = step(state, data[name], {})
            timer.add((tag, name), m["loss"])
        jax.block_until_ready(m)

    run([b.name for b in buckets] + [reference.name], "warmup")  # compile every shape
    memory = {}
    for key, compiled in step.compiled.items():
        analysis = compiled.memory_analysis()
        shape = key[-1][-2][0]  # the video's shape (the last leaves: label, video)
        memory["x".join(str(n) for n in shape[1:4])] = (
            int(analysis.temp_size_in_bytes) if analysis is not None else None)
    timer.take()
    peaks = []
    for r in range(args.rounds):
        run([reference.name] * args.steps, "fixed")
        order = rng.choice(len(buckets), args.steps * len(buckets))
        run([buckets[i].name for i in order], "bucketed")
        peaks.append(metrics.measure_matmul_peak())
    times = timer.take()
    timer.close()
    peak = float(np.median(peaks))

    def summary(times_s, name):
        t = float(np.median(times_s))
        flops_, tokens = cost[name]
        return {"step_s": round(t, 5), "tokens_per_s": round(tokens / t, 1),
                "mfu": round(flops_ / t / peak, 4), "steps": len(times_s),
                "tokens_per_step": tokens, "temp_bytes": memory.get(name)}

    fixed = summary(times[("fixed", reference.name)], reference.name)
    per_bucket = {}
    for b in buckets:
        s = summary(times[("bucketed", b.name)], b.name)
        s["tokens_per_s_vs_fixed"] = round(s["tokens_per_s"] / fixed["tokens_per_s"], 3)
        per_bucket[b.name] = s
    print(json.dumps({
        "model": {"size": args.size, "params": setup.num_params(), "patch": list(c.model.patch)},
        "reference": {"shape": reference.name, "batch": args.batch, **fixed},
        "buckets": per_bucket,
        "worst_ratio": min(s["tokens_per_s_vs_fixed"] for s in per_bucket.values()),
        "matmul_peak_flops_per_s": peak,
        "devices": jax.devices()[0].platform,
    }, indent=2))


if __name__ == "__main__":
    main()
