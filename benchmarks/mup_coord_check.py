"""muP's coordinate check for the DiT: activation change per layer against width; prints JSON.

    python benchmarks/mup_coord_check.py --widths 64,128,256,512 --plot docs/mup/coord_check.png

For each parametrisation, a DiT of each width (2 blocks, head dim 32, patch 1x4x4 on 4x16x16
clips) trains a few Adam steps on one fixed random regression batch (vidit.mup_check.
coordinate_check); each layer's RMS activation change from init is reported per width. Under
muP the curves are flat in width; under standard parametrisation the hidden layers' grow
about linearly (Yang et al. 2022, "Tensor Programs V", section 7).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vidit import config_lib, mup_check  # noqa: E402
from vidit.models import mup  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--widths", default="64,128,256,512")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--plot", default="")
    args = ap.parse_args()
    widths = [int(w) for w in args.widths.split(",")]
    out = {"widths": widths, "steps": args.steps, "lr": args.lr, "base_width": widths[0]}
    for kind in mup.PARAMETRIZATIONS:
        c = config_lib.base_config().model
        c.depth, c.width, c.heads, c.patch = 2, widths[0], widths[0] // 32, (1, 4, 4)
        c.parametrization, c.mup_base_width, c.mup_base_heads = kind, widths[0], widths[0] // 32
        r = mup_check.coordinate_check(c, widths, steps=args.steps, lr=args.lr)
        out[kind] = {layer: [r[w][layer] for w in widths] for layer in r[widths[0]]}
    print(json.dumps(out, indent=1))
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
        for ax, kind in zip(axes, mup.PARAMETRIZATIONS):
            for layer, values in out[kind].items():
                ax.plot(widths, values, "o-", label=layer)
            ax.set(xscale="log", yscale="log", xlabel="width", title=kind)
            ax.legend(fontsize=8)
        axes[0].set_ylabel(f"RMS activation change after {args.steps} Adam steps")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)


if __name__ == "__main__":
    main()
