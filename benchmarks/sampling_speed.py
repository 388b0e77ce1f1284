"""Wall time of one sampled batch: one-step (MeanFlow/shortcut/distill) vs 50-step flow; JSON.

    python benchmarks/sampling_speed.py                  # moving_digits model, batch 8
    python benchmarks/sampling_speed.py --config configs/moving_digits.py:size=S --batch 4

The same network (the config's model with the interval input, random init: speed does not
depend on the weights) samples a batch from noise through steps.sample, jit-compiled: once with
the few-step objective's jump sampler at --few steps (1: one network call) and once with the flow
objective's Euler sampler at --many steps (50). Both use the same guidance (default 1: one
network call per step; with --guidance W != 1 every call runs on a doubled batch). Compilation
is outside the timing; after --warmup calls, the median of --runs calls is reported.

Each sampler's forward-pass MFU: network calls x forward FLOPs (x2 with guidance, a doubled
batch) per second, over a large f32 matmul's rate measured after that sampler's runs.
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vidit import diffusion, flops, metrics, sharding, steps  # noqa: E402
from vidit.train_state import Setup  # noqa: E402
from vidit import host_malloc  # noqa: E402

host_malloc.tune()  # as the vidit commands do, before JAX starts its threads


def load_config(spec: str):
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("bench_cfg", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def time_sampler(fn, params, noise, cond, *, steps_: int, guidance: float, warmup: int,
                 runs: int) -> dict:
    start = time.perf_counter()
    compiled = fn.lower(params, noise, cond, steps=steps_, guidance=guidance).compile()
    compile_s = time.perf_counter() - start
    for _ in range(warmup):
        jax.block_until_ready(compiled(params, noise, cond))
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        out = jax.block_until_ready(compiled(params, noise, cond))
        times.append(time.perf_counter() - start)
    return {"steps": steps_, "median_s": float(np.median(times)),
            "times_s": [round(t, 5) for t in times], "compile_s": round(compile_s, 2),
            "finite": bool(np.isfinite(np.asarray(out)).all())}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="configs/moving_digits.py")
    p.add_argument("--objective", default="meanflow", choices=["meanflow", "shortcut", "distill"],
                   help="the few-step objective whose sampler runs --few steps")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--few", type=int, default=1)
    p.add_argument("--many", type=int, default=50)
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--runs", type=int, default=7)
    args = p.parse_args()

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = args.config if os.path.isabs(args.config.partition(":")[0]) else os.path.join(
        root, args.config)
    c = load_config(path)
    c.model.interval_input = True  # one network for both samplers
    c.mesh = dict(data=1, fsdp=1, tensor=1, sequence=1)
    mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
    setup = Setup(c, mesh)
    state = setup.init()
    params = jax.tree.map(lambda x: x + 0.01, state.ema_params)  # a non-zero output layer
    d = c.data
    noise = jax.random.normal(jax.random.key(0), (args.batch, d.num_frames, d.height, d.width,
                                                  d.channels))
    cond = ({"label": np.arange(args.batch, dtype=np.int32) % c.model.num_classes}
            if c.model.cond == "class" else {})
    if c.model.cond == "text":
        cond = {"text": np.ones((args.batch, c.model.text_len), np.int32)}

    results = {}
    for key, name, steps_ in (("few", args.objective, args.few), ("many", "flow", args.many)):
        obj = diffusion.make_objective(diffusion.default_config(name))
        fn = jax.jit(functools.partial(steps.sample, setup, obj),
                     static_argnames=("steps", "guidance"))
        with sharding.use(mesh, c.sharding_rules):
            results[key] = {"objective": name, **time_sampler(
                fn, params, noise, cond, steps_=steps_, guidance=args.guidance,
                warmup=args.warmup, runs=args.runs)}
        # Network calls per sample: one per step (MeanFlow/shortcut jumps and Euler alike).
        forward = flops.forward_flops(c.model, d.num_frames, d.height, d.width)["total"]
        calls = steps_ * args.batch * (2 if args.guidance != 1.0 else 1)
        peak = metrics.measure_matmul_peak()
        results[key]["forward_flops_per_s"] = calls * forward / results[key]["median_s"]
        results[key]["matmul_peak_flops_per_s"] = peak
        results[key]["forward_mfu"] = results[key]["forward_flops_per_s"] / peak
    ratio = results["many"]["median_s"] / results["few"]["median_s"]
    print(json.dumps({
        "model": {"size": c.model.get("size"), "depth": c.model.depth, "width": c.model.width,
                  "heads": c.model.heads, "params": setup.num_params(),
                  "patch": list(c.model.patch), "attention": c.model.attention},
        "batch": [args.batch, d.num_frames, d.height, d.width, d.channels],
        "guidance": args.guidance,
        f"{args.few}_step": results["few"],
        f"{args.many}_step": results["many"],
        "speedup": round(ratio, 2),
        "meets_25x": bool(ratio >= 25) if (args.few, args.many) == (1, 50) else None,
        "device": str(jax.devices()[0].platform),
        "cpu_count": os.cpu_count(),
    }, indent=2))


if __name__ == "__main__":
    main()
