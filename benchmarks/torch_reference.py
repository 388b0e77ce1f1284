#!/usr/bin/env python3
"""The PyTorch reference for vidit's train-step speed: diffusers' WanTransformer3DModel (eager,
float32) trained one step at a time - forward, MSE against a fixed target, backward, AdamW -
at the sizes of benchmarks/train_step.py's text-conditioned setting. Prints JSON.

PyTorch never enters vidit's own environment; run this with the reference virtualenv of
tests/fixtures/wan/make_fixtures.py (torch 2.13.0+cpu, diffusers 0.42.1):

    /tmp/refenv/bin/python benchmarks/torch_reference.py            # alone: s/step, FLOP/s
    python benchmarks/versus_torch.py --torch_python /tmp/refenv/bin/python   # A/B with vidit

--serve turns it into the worker benchmarks/versus_torch.py drives over stdin/stdout, one JSON
line per command: `steps N` (N timed steps), `probe` (a 2048^3 float32 matmul, the same probe
as vidit.metrics.measure_matmul_peak) and `quit`.

`flop_counter_flops_per_step` is torch.utils.flop_counter.FlopCounterMode's count of one step
(2 per multiply-accumulate). On CPU it misses scaled_dot_product_attention (torch 2.13 registers
no FLOP formula for the CPU flash kernel), so versus_torch.py rates both frameworks by vidit's
analytic count of the same architecture (vidit/flops.py's Wan count).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def build(args):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    head_dim = args.width // args.heads
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=args.heads, attention_head_dim=head_dim,
        in_channels=args.channels, out_channels=args.channels, text_dim=args.text_width,
        freq_dim=256, ffn_dim=args.mlp, num_layers=args.depth, cross_attn_norm=True,
        eps=1e-6, rope_max_seq_len=1024)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    shape = (args.batch, args.channels, args.frames, args.res, args.res)  # diffusers' B C F H W
    x = torch.rand(shape, generator=g) * 2 - 1
    target = torch.randn(shape, generator=g)
    t = torch.full((args.batch,), 500.0)
    text = torch.randn((args.batch, args.text_tokens, args.text_width), generator=g)

    def step():
        opt.zero_grad(set_to_none=True)
        out = model(hidden_states=x, timestep=t, encoder_hidden_states=text,
                    return_dict=False)[0]
        loss = torch.mean((out - target) ** 2)
        loss.backward()
        opt.step()
        return loss

    return model, step


def timed_steps(step, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def matmul_peak(size: int = 2048, repeats: int = 5) -> float:
    a, b = torch.ones(size, size), torch.ones(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2.0 * size**3 / best


def count_flops(step) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--mlp", type=int, default=1536)
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--res", type=int, default=32)
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--text_tokens", type=int, default=16)
    p.add_argument("--text_width", type=int, default=4096)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--alternations", type=int, default=5)
    p.add_argument("--serve", action="store_true", help="the worker of versus_torch.py")
    return p


def main():
    args = parser().parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, step = build(args)
    for _ in range(3):  # warm-up: the first steps allocate (1.6 s against 0.09 s at tiny sizes)
        step()
    info = {"framework": f"torch {torch.__version__}", "threads": torch.get_num_threads(),
            "model": "diffusers WanTransformer3DModel",
            "params": sum(p.numel() for p in model.parameters()),
            "flop_counter_flops_per_step": count_flops(step)}
    if args.serve:
        print(json.dumps(info), flush=True)
        for line in sys.stdin:
            cmd = line.split()
            if not cmd or cmd[0] == "quit":
                break
            if cmd[0] == "steps":
                print(json.dumps({"times": timed_steps(step, int(cmd[1]))}), flush=True)
            elif cmd[0] == "probe":
                print(json.dumps({"peak": matmul_peak()}), flush=True)
            else:
                print(json.dumps({"error": f"unknown command {cmd[0]!r}"}), flush=True)
        return
    times, rounds = [], []
    for _ in range(args.alternations):
        these = timed_steps(step, args.steps)
        times += these
        rounds.append((sorted(these)[len(these) // 2], matmul_peak()))
    med = sorted(times)[len(times) // 2]
    info.update(step_time_s=med, step_times_s=[round(x, 4) for x in times],
                matmul_peaks_flops_per_s=[pk for _, pk in rounds])
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
