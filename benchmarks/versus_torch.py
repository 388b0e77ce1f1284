"""vidit's train step against a PyTorch video DiT on the same CPU, alternated in one run; JSON.

    python benchmarks/versus_torch.py --torch_python /tmp/refenv/bin/python

The reference is diffusers' WanTransformer3DModel in eager PyTorch (benchmarks/torch_reference.py,
run as a worker process under an interpreter that has torch and diffusers; vidit's environment
never does). vidit runs three steps at the same sizes (default 6 blocks x 384, 6 heads, MLP
1536, one 4 x 32 x 32 x 4 clip, patch 1x2x2 = 1024 tokens, 16 cached 4096-wide text tokens):

- `wan`: vidit's port of the same architecture (vidit/models/wan.py): the like-for-like pair;
- `dit-text`: vidit's own DiT with cross-attention to the same text tokens;
- `dit-class`: vidit's DiT conditioned on a class label.

Each round runs --steps steps of every vidit model, then of the torch model, then both matmul
probes; this machine's speed drifts by up to 2x between runs, so what the JSON reports per model
is the median over rounds of (torch step time / vidit step time), with its spread: > 1 means
vidit is faster. FLOP/s and MFU (against each framework's own matmul probe, measured in the same
rounds) use vidit's analytic count (vidit/flops.py); the torch model's is that of vidit's `wan`,
the same architecture (PyTorch's FlopCounterMode misses CPU attention, see torch_reference.py).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train_step  # noqa: E402  (benchmarks/train_step.py: the vidit side)
from vidit import flops, metrics  # noqa: E402

MODELS = {"wan": ["--model", "wan"], "dit-text": ["--cond", "text"], "dit-class": []}
PAUSE_S = 0.3  # between frameworks, so neither's idle worker threads spin into the other's time


class TorchWorker:
    def __init__(self, python: str, args: list[str]):
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_reference.py")
        self.proc = subprocess.Popen([python, script, "--serve", *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the torch worker exited; run benchmarks/torch_reference.py "
                               "with that interpreter to see why")
        return json.loads(line)

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self):
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        self.proc.wait(timeout=60)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--torch_python", required=True, help="an interpreter with torch + diffusers")
    p.add_argument("--models", default="wan,dit-text,dit-class")
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--mlp", type=int, default=1536)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--text_tokens", type=int, default=16)
    p.add_argument("--steps", type=int, default=3, help="timed steps per model per round")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()

    sizes = ["--depth", str(args.depth), "--width", str(args.width), "--heads", str(args.heads),
             "--mlp", str(args.mlp), "--batch", str(args.batch),
             "--text_tokens", str(args.text_tokens)]
    names = args.models.split(",")
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        raise SystemExit(f"--models: unknown {unknown}; choose from {sorted(MODELS)}")
    benches = {n: train_step.Bench(train_step.parser().parse_args(sizes + MODELS[n]))
               for n in names}
    worker = TorchWorker(args.torch_python, sizes)
    times = {n: [] for n in names + ["torch"]}
    ratios = {n: [] for n in names}
    jax_peaks, torch_peaks = [], []
    try:
        for _ in range(args.rounds):
            medians = {}
            for n, bench in benches.items():
                these = bench.steps(args.steps)
                times[n] += these
                medians[n] = float(np.median(these))
            time.sleep(PAUSE_S)
            these = worker.ask(f"steps {args.steps}")["times"]
            times["torch"] += these
            time.sleep(PAUSE_S)
            for n in names:
                ratios[n].append(float(np.median(these)) / medians[n])
            jax_peaks.append(metrics.measure_matmul_peak())
            time.sleep(PAUSE_S)
            torch_peaks.append(worker.ask("probe")["peak"])
            time.sleep(PAUSE_S)
    finally:
        worker.close()

    wan_args = train_step.parser().parse_args(sizes + MODELS["wan"])
    wan_cfg = train_step.benchmark_config(wan_args)
    torch_flops = flops.train_flops_per_step(wan_cfg.model, wan_cfg.data)
    torch_time = float(np.median(times["torch"]))
    result = {
        "sizes": {"depth": args.depth, "width": args.width, "heads": args.heads,
                  "mlp": args.mlp, "batch": args.batch, "clip": [4, 32, 32, 4],
                  "patch": [1, 2, 2], "text_tokens": args.text_tokens, "text_width": 4096},
        "rounds": args.rounds, "steps_per_round": args.steps,
        "torch": {**worker.info, "step_time_s": torch_time,
                  "flops_per_step": torch_flops, "flops_per_s": torch_flops / torch_time,
                  "mfu": torch_flops / torch_time / float(np.median(torch_peaks)),
                  "matmul_peak_flops_per_s": float(np.median(torch_peaks))},
        "jax_matmul_peak_flops_per_s": float(np.median(jax_peaks)),
        "vidit": {},
    }
    for n, bench in benches.items():
        t = float(np.median(times[n]))
        result["vidit"][n] = {
            "params": bench.setup.num_params(), "flops_per_step": bench.step_flops,
            "step_time_s": t, "flops_per_s": bench.step_flops / t,
            "mfu": bench.step_flops / t / float(np.median(jax_peaks)),
            # > 1: vidit's step is faster than PyTorch's.
            "torch_time_over_vidit_time": float(np.median(ratios[n])),
            "ratio_per_round": [round(r, 3) for r in ratios[n]],
            "ratio_spread": [round(min(ratios[n]), 3), round(max(ratios[n]), 3)],
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
