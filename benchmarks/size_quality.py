"""How sample quality holds up at sizes a moving-digits model did or did not train on; prints JSON.

    python benchmarks/size_quality.py --workdir runs/quickstart \
        --sizes 4x32x32,8x32x32,4x32x48,4x48x32,4x48x48 --num 100

For each size (frames x height x width) it samples --num class-conditional videos (labels cycling
over 0..9, the run's sampler settings unless --steps/--guidance) and scores them with the
project's frame classifier (vidit/eval/classifier.py, trained on 32x32 moving-digits frames and
cached): every frame is cropped to the 32x32 window centred on its brightest mass (the digit is
16x16; a 32x32 frame is kept as it is), classified, and the video's class is the mean of its
frames' logits. Reports class accuracy and frame agreement (the share of frames whose own class
matches the video's: identity stability over time) per size, plus whether the size was trained.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vidit import run as run_lib, sample as sample_lib  # noqa: E402
from vidit.eval import classifier, metrics  # noqa: E402
from data_pipelines import buckets as bucket_lib  # noqa: E402

CROP = 32


def crop_to_digit(videos: np.ndarray) -> np.ndarray:
    """[N, T, H, W, C] in [-1, 1] -> [N, T, 32, 32, C]: each frame's 32x32 window centred on its
    brightness centroid, kept inside the frame."""
    n, t, h, w, c = videos.shape
    if (h, w) == (CROP, CROP):
        return videos
    out = np.empty((n, t, CROP, CROP, c), videos.dtype)
    weight = np.clip(videos.mean(-1) + 1.0, 0, None)  # background -1 -> 0
    ys, xs = np.arange(h)[:, None], np.arange(w)[None, :]
    for i in range(n):
        for j in range(t):
            mass = weight[i, j].sum() + 1e-6
            cy = int(round((weight[i, j] * ys).sum() / mass))
            cx = int(round((weight[i, j] * xs).sum() / mass))
            top = min(max(cy - CROP // 2, 0), h - CROP)
            left = min(max(cx - CROP // 2, 0), w - CROP)
            out[i, j] = videos[i, j, top:top + CROP, left:left + CROP]
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--sizes", default="4x32x32,8x32x32,4x32x48,4x48x32,4x48x48")
    p.add_argument("--num", type=int, default=100)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--classifier_steps", type=int, default=classifier.DEFAULT_STEPS)
    args = p.parse_args()

    config = run_lib.load(args.workdir).config
    d = config.data
    trained = {b.shape for b in bucket_lib.from_config(d)}
    cache = os.path.expanduser(f"~/.cache/vidit/classifiers/moving_digits_32x32x1_f{d.num_frames}")
    with contextlib.redirect_stdout(sys.stderr):  # stdout is the JSON only
        model = classifier.get_or_train_classifier(cache, steps=args.classifier_steps)
    rows = []
    for size in args.sizes.split(","):
        frames, height, width = (int(n) for n in size.split("x"))
        start = time.perf_counter()
        videos, labels = [], []
        for first in range(0, args.num, args.batch):
            num = min(args.batch, args.num - first)
            v, _ = sample_lib.generate(args.workdir, num=num, steps_=args.steps,
                                       guidance=args.guidance, seed=first, frames=frames,
                                       height=height, width=width)
            videos.append(v)
            labels.append(np.arange(num) % config.model.num_classes)
        videos, labels = np.concatenate(videos), np.concatenate(labels)
        crops = crop_to_digit(videos)
        frame_pred = classifier.per_frame(model, crops)[1].argmax(-1)
        video_pred, _ = classifier.classify_videos(model, crops)
        rows.append({"size": size, "trained": (frames, height, width) in trained,
                     "num": int(len(labels)),
                     "accuracy": round(metrics.class_accuracy(video_pred, labels), 4),
                     "frame_agreement": round(metrics.frame_agreement(frame_pred, video_pred), 4),
                     "seconds": round(time.perf_counter() - start, 1)})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(json.dumps({"workdir": args.workdir, "trained_sizes": sorted("x".join(map(str, s))
                                                                       for s in trained),
                      "sampler": {"steps": args.steps or config.sample.steps,
                                  "guidance": (config.sample.guidance if args.guidance is None
                                               else args.guidance)},
                      "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
