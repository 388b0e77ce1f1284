"""Where one-step samples differ from many-step ones drawn from the same noise.

    python docs/few_step/one_step_error.py --workdir runs/mf --num 200 --png one_two_four.png

Samples `--num` class-conditional clips at 1, 2 and 4 steps with `vidit.evaluate.generate`
(the same noise for every step count) from the run's EMA parameters, and prints, for each pair
of step counts, the mean squared pixel difference over all pixels, over digit pixels (> 0 in
the 4-step sample) and over the background, its correlation with the noise, and the share of
its energy above a 2 x 2 spatial average (high frequencies). Used for the session-11 table in
README.md beside this file.
"""
import argparse

import numpy as np

from vidit import evaluate, export

STEPS = (1, 2, 4)


def high_frequency_share(err: np.ndarray) -> float:
    """Share of err's energy [N, T, H, W, C] left after subtracting its 2 x 2 block average."""
    n, t, h, w, c = err.shape
    blocks = err.reshape(n, t, h // 2, 2, w // 2, 2, c).mean(axis=(3, 5), keepdims=True)
    low = np.broadcast_to(blocks, (n, t, h // 2, 2, w // 2, 2, c)).reshape(err.shape)
    return float(np.sum((err - low) ** 2) / np.sum(err ** 2))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--num", type=int, default=200)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--png", help="also write 5 samples per step count (rows) here")
    args = parser.parse_args()

    config, setup, params, step = export.load(args.workdir)
    if setup.autoencoder is not None:  # the noise would be latent, the samples pixels
        raise SystemExit(f"{args.workdir} is a latent DiT; this script compares pixel-space runs")
    labels = np.arange(args.num) % config.model.num_classes
    samples = {k: evaluate.generate(config, setup, params, labels, k, 1.0, args.batch,
                                    ae_params=None)[0] for k in STEPS}
    noise = np.concatenate([np.asarray(evaluate.chunk_noise(0, i, args.batch, samples[1].shape[1:]))
                            for i in range(0, args.num, args.batch)])[:args.num]
    digits = samples[STEPS[-1]] > 0.0
    print(f"{args.workdir} step {step}, {args.num} samples; digit pixels: {digits.mean():.3f}")
    for a, b in [(1, 4), (2, 4), (1, 2)]:
        err = samples[a] - samples[b]
        corr = np.sum(err * noise) / np.sqrt(np.sum(err ** 2) * np.sum(noise ** 2))
        print(f"{a} vs {b} steps: all {np.mean(err ** 2):.3f}, digits {np.mean(err[digits] ** 2):.3f}, "
              f"background {np.mean(err[~digits] ** 2):.3f}, correlation with the noise "
              f"{corr:.3f}, high-frequency share {high_frequency_share(err):.2f}")
    if args.png:
        from PIL import Image
        pick = [1, 4, 5, 7, 9]  # five classes, as drawn in the docs' figure
        rows = [np.concatenate([np.concatenate(list(clip[..., 0]), axis=1)
                                for clip in samples[k][pick]], axis=1) for k in STEPS]
        img = ((np.clip(np.concatenate(rows), -1, 1) + 1) * 127.5).astype(np.uint8)
        Image.fromarray(img).resize((img.shape[1] * 2, img.shape[0] * 2), Image.NEAREST).save(args.png)


if __name__ == "__main__":
    main()
