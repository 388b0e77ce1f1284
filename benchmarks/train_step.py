"""Train-step speed and MFU of a video DiT config on this machine; prints JSON.

    python benchmarks/train_step.py                       # DiT-S, 4x32x32x4, patch 1x2x2, batch 2
    python benchmarks/train_step.py --size B --batch 4 --attention dense
    python benchmarks/train_step.py --config configs/moving_digits.py
    python benchmarks/train_step.py --depth 6 --width 384 --heads 6 --mlp 1536 --cond text \
        --text_tokens 16 --text_width 4096   # cross-attention to cached T5-width embeddings
    python benchmarks/train_step.py --model wan --depth 6 --width 384 --heads 6 --mlp 1536 \
        --batch 1   # Wan 2.1's block (vidit/models/wan.py) at those sizes

MFU = model FLOPs per second / the measured rate of a large f32 matmul on the same machine in
the same run (there is no datasheet peak for a CPU). FLOPs count 2 per multiply-accumulate.
This machine's speed drifts (up to 2x between runs), so the timed steps and the matmul probe
alternate --alternations times; each alternation gives an MFU and the JSON reports their
median and spread.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vidit import batches, config_lib, diffusion, flops, metrics, sharding, steps  # noqa: E402
from vidit.train_state import Setup  # noqa: E402
from vidit import host_malloc  # noqa: E402

host_malloc.tune()  # as the vidit commands do, before JAX starts its threads


def benchmark_config(args):
    if args.config:
        import importlib.util
        path, _, arg = args.config.partition(":")
        spec = importlib.util.spec_from_file_location("bench_cfg", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        c = module.get_config(arg or None)
    else:
        c = config_lib.base_config()
        config_lib.set_size(c.model, args.size)
        c.data.num_frames, c.data.height, c.data.width = args.frames, args.res, args.res
        c.data.channels = c.model.channels = args.channels
        c.data.batch_size = args.batch
        c.model.patch = tuple(int(p) for p in args.patch.split(","))
        c.model.cond = args.cond
        for key in ("depth", "width", "heads"):  # each overrides --size when given
            if getattr(args, key):
                c.model[key] = getattr(args, key)
        if args.mlp:
            c.model.mlp_ratio = args.mlp / c.model.width
        if args.cond == "text" or args.model == "wan":  # cached embeddings of a frozen
            c.model.cond = "text"                            # encoder, projected in the DiT
            c.model.text_encoder.kind = "t5"
            c.model.text_len = c.data.text_len = args.text_tokens
            c.model.text_width = args.text_width
        if args.model == "wan":  # Wan 2.1's block at these sizes (the torch reference's model)
            from vidit.models import wan
            c.model.update({**wan.COMMON, "channels": args.channels,
                            "patch": c.model.patch, "text_len": args.text_tokens,
                            "text_width": args.text_width})
            c.model.ffn_dim = int(c.model.width * c.model.mlp_ratio)
            c.model.size = "custom"
    for key in ("attention", "dtype", "remat"):
        if getattr(args, key):
            c.model[key] = getattr(args, key)
    if args.scan_layers:
        c.model.scan_layers = args.scan_layers == "true"
    c.mesh = dict(data=1, fsdp=1, tensor=1, sequence=1)
    return c


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="", help="config file[:variant]; overrides the size flags")
    p.add_argument("--model", default="dit", choices=["dit", "wan"],
                   help="vidit's DiT, or Wan 2.1's block (implies text conditioning)")
    p.add_argument("--size", default="S")
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--res", type=int, default=32)
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--patch", default="1,2,2")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--dtype", default="")
    p.add_argument("--attention", default="")
    p.add_argument("--remat", default="")
    p.add_argument("--scan_layers", default="", choices=["", "true", "false"])
    p.add_argument("--depth", type=int, default=0, help="blocks (overrides --size)")
    p.add_argument("--width", type=int, default=0)
    p.add_argument("--heads", type=int, default=0)
    p.add_argument("--mlp", type=int, default=0, help="MLP hidden width")
    p.add_argument("--cond", default="class", choices=["class", "text"])
    p.add_argument("--text_tokens", type=int, default=16)
    p.add_argument("--text_width", type=int, default=4096)
    p.add_argument("--steps", type=int, default=3, help="timed steps per alternation")
    p.add_argument("--alternations", type=int, default=5,
                   help="rounds of (timed steps, matmul probe); MFU is their median")
    p.add_argument("--profile", default="", help="write a JAX profiler trace to this folder")
    p.add_argument("--compiler_option", action="append", default=[], metavar="KEY=VALUE",
                   help="an XLA option for this step's compile (repeatable), e.g. "
                        "xla_cpu_use_onednn=true")
    return p


def compiler_options(pairs: list[str]) -> dict:
    """KEY=VALUE strings -> the compiler_options dict of jax's .compile()."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--compiler_option {pair!r}: expected KEY=VALUE")
        out[key] = {"true": True, "false": False}.get(value.lower(), value)
    return out


class Bench:
    """A compiled train step of the benchmark's config with its state and a fixed batch."""

    def __init__(self, args):
        self.args = args
        c = self.config = benchmark_config(args)
        mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
        self.setup = Setup(c, mesh)
        objective = diffusion.make_objective(c.objective)
        self.state = self.setup.init()
        rng = np.random.default_rng(0)
        batch, frozen = {}, {}
        for key, spec in batches.abstract_batch(c, mesh).items():
            if spec.dtype == jnp.bool_:
                batch[key] = jnp.ones(spec.shape, bool)
            elif key == "label":
                batch[key] = jnp.asarray(rng.integers(0, 10, spec.shape).astype(np.int32))
            elif key == "text":
                batch[key] = jnp.ones(spec.shape, jnp.int32)
            else:
                batch[key] = jnp.asarray(rng.uniform(-1, 1, spec.shape).astype(np.float32))
        if "text_embedding" in batch:  # the empty caption's embedding, for guidance dropout
            frozen["null_text"] = {"text_embedding": batch["text_embedding"][:1],
                                   "text_mask": batch["text_mask"][:1]}
        self.batch, self.frozen = batch, frozen
        step = steps.jit_train_step(self.setup, objective)
        t0 = time.perf_counter()
        with sharding.use(mesh, c.sharding_rules):
            self.compiled = step.lower(self.state, batch, frozen).compile(
                compiler_options(args.compiler_option) or None)
        self.compile_s = time.perf_counter() - t0
        self.steps(1)  # warm-up
        d = c.data
        self.forward = flops.forward_flops(c.model, d.num_frames, d.height, d.width)
        self.step_flops = flops.train_flops_per_step(c.model, d)

    def steps(self, n: int) -> list[float]:
        """Run n steps; their wall times in seconds."""
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            self.state, self.metrics = self.compiled(self.state, self.batch, self.frozen)
            jax.block_until_ready(self.metrics)
            times.append(time.perf_counter() - t0)
        return times

    def describe(self) -> dict:
        c, d = self.config, self.config.data
        mlp = c.model.get("ffn_dim") or int(c.model.width * c.model.mlp_ratio)
        return {
            "model": {"kind": c.model.get("kind", "dit"), "size": c.model.get("size"),
                      "depth": c.model.depth, "width": c.model.width, "heads": c.model.heads,
                      "mlp": mlp, "params": self.setup.num_params(),
                      "patch": list(c.model.patch), "attention": c.model.attention,
                      "dtype": c.model.dtype, "remat": c.model.remat},
            "input": [d.batch_size, d.num_frames, d.height, d.width, d.channels],
            "tokens_per_sample": self.forward["tokens"],
            "flops_convention": "FLOPs (2 per multiply-accumulate); train = 3 x forward",
            "model_flops_per_step": self.step_flops,
            "attention_flops_fraction": self.forward["attention"] / self.forward["total"],
            "compile_s": round(self.compile_s, 2),
            "compiler_options": compiler_options(self.args.compiler_option),
            "cond": c.model.cond,
            "text_tokens": c.model.text_len if c.model.cond == "text" else 0,
        }


def main():
    args = parser().parse_args()
    bench = Bench(args)
    if args.profile:
        jax.profiler.start_trace(args.profile, create_perfetto_trace=True)
    times, peaks, rounds = [], [], []
    for _ in range(args.alternations):
        these = bench.steps(args.steps)
        peaks.append(metrics.measure_matmul_peak())
        times += these
        rounds.append((float(np.median(these)), peaks[-1]))
    if args.profile:
        jax.profiler.stop_trace()

    step_flops = bench.step_flops
    step_time = float(np.median(times))
    mfus = [step_flops / t / pk for t, pk in rounds]
    d = bench.config.data
    result = {
        **bench.describe(),
        "step_time_s": step_time,
        "step_times_s": [round(t, 4) for t in times],
        "tokens_per_s": bench.forward["tokens"] * d.batch_size / step_time,
        "model_flops_per_s": step_flops / step_time,
        "matmul_peak_flops_per_s": float(np.median(peaks)),
        "matmul_peaks_flops_per_s": peaks,
        # One MFU per alternation (its steps' median time over its own matmul probe).
        "mfu": float(np.median(mfus)),
        "mfu_per_alternation": [round(x, 4) for x in mfus],
        "mfu_spread": [round(min(mfus), 4), round(max(mfus), 4)],
        "loss_finite": bool(bench.metrics["finite"]),
        "devices": str(jax.devices()[0].platform),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
