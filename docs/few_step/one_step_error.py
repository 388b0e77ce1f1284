"""Where one-step samples differ from many-step ones drawn from the same noise.

    python docs/few_step/one_step_error.py --workdir runs/mf --num 200 --png one_two_four.png
    python docs/few_step/one_step_error.py --stored   # the measured table, from results.jsonl

Samples `--num` class-conditional clips at 1, 2 and 4 steps with `vidit.evaluate.generate`
(the same noise for every step count) from the run's EMA parameters, and prints, for each pair
of step counts, the mean squared pixel difference over all pixels, over digit pixels (> 0 in
the 4-step sample) and over the background, its correlation with the noise, and the share of
its energy above a 2 x 2 spatial average (high frequencies). Measuring needs a trained MeanFlow
run (README.md beside this file: the table there is the run `ep1-s0`, 2026-12-02). `--stored`
prints that measurement, the `one-step-error-*` rows of results.jsonl, in the same format, to
compare a new run against.
"""
import argparse
import json
import os

import numpy as np

STEPS = (1, 2, 4)
PAIRS = [(1, 4), (2, 4), (1, 2)]
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.jsonl")


def high_frequency_share(err: np.ndarray) -> float:
    """Share of err's energy [N, T, H, W, C] left after subtracting its 2 x 2 block average."""
    n, t, h, w, c = err.shape
    blocks = err.reshape(n, t, h // 2, 2, w // 2, 2, c).mean(axis=(3, 5), keepdims=True)
    low = np.broadcast_to(blocks, (n, t, h // 2, 2, w // 2, 2, c)).reshape(err.shape)
    return float(np.sum((err - low) ** 2) / np.sum(err ** 2))


def print_table(workdir, step, num, digit_pixels, rows):
    """rows: {(a, b): (all, digits, background, correlation, high-frequency share)}."""
    print(f"{workdir} step {step}, {num} samples; digit pixels: {digit_pixels:.3f}")
    for a, b in PAIRS:
        mse, mse_digits, mse_background, corr, hf = rows[(a, b)]
        print(f"{a} vs {b} steps: all {mse:.3f}, digits {mse_digits:.3f}, "
              f"background {mse_background:.3f}, correlation with the noise "
              f"{corr:.3f}, high-frequency share {hf:.2f}")


def print_stored(path=RESULTS):
    with open(path) as f:
        reports = [r["report"] for r in map(json.loads, f) if r["group"] == "one-step-error"]
    rows = {tuple(r["pair"]): (r["all"], r["digits"], r["background"], r["correlation_with_noise"],
                               r["high_frequency_share"]) for r in reports}
    r = reports[0]
    print_table(r["workdir"], r["checkpoint_step"], r["num"], r["digit_pixels"], rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir")
    parser.add_argument("--num", type=int, default=200)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--png", help="also write 5 samples per step count (rows) here")
    parser.add_argument("--stored", action="store_true",
                        help="print the measured table from results.jsonl instead (no run needed)")
    args = parser.parse_args()
    if args.stored:
        print_stored()
        return
    if not args.workdir:
        parser.error("--workdir is required (or --stored)")

    from vidit import evaluate, run as run_lib

    run = run_lib.load(args.workdir)
    step = run.step
    if run.autoencoder is not None:  # the noise would be latent, the samples pixels
        raise SystemExit(f"{args.workdir} is a latent DiT; this script compares pixel-space runs")
    labels = np.arange(args.num) % run.config.model.num_classes
    samples = {k: evaluate.generate(run, labels, k, 1.0, args.batch)[0] for k in STEPS}
    noise = np.concatenate([np.asarray(evaluate.chunk_noise(0, i, args.batch, samples[1].shape[1:]))
                            for i in range(0, args.num, args.batch)])[:args.num]
    digits = samples[STEPS[-1]] > 0.0
    rows = {}
    for a, b in PAIRS:
        err = samples[a] - samples[b]
        corr = np.sum(err * noise) / np.sqrt(np.sum(err ** 2) * np.sum(noise ** 2))
        rows[(a, b)] = (np.mean(err ** 2), np.mean(err[digits] ** 2), np.mean(err[~digits] ** 2),
                        corr, high_frequency_share(err))
    print_table(args.workdir, step, args.num, digits.mean(), rows)
    if args.png:
        from PIL import Image
        pick = [1, 4, 5, 7, 9]  # five classes, as drawn in the docs' figure
        rows = [np.concatenate([np.concatenate(list(clip[..., 0]), axis=1)
                                for clip in samples[k][pick]], axis=1) for k in STEPS]
        img = ((np.clip(np.concatenate(rows), -1, 1) + 1) * 127.5).astype(np.uint8)
        Image.fromarray(img).resize((img.shape[1] * 2, img.shape[0] * 2), Image.NEAREST).save(args.png)


if __name__ == "__main__":
    main()
