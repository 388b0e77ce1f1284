"""Table and plot of a learning-rate transfer experiment: the same LR sweep under standard
parametrisation and muP (configs/sweeps/digits_lr_transfer.py), one results.json each.

    python docs/mup/lr_transfer.py runs/lr_sp runs/lr_mup --out docs/mup

Prints the markdown table (validation loss per width and learning rate, the best marked, and
the best learning rate's shift across widths in grid steps) and writes lr_transfer.png.
"""
import argparse
import json
import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load(folder):
    rows = json.load(open(os.path.join(folder, "results.json")))
    table = {}
    for r in rows:
        lr = r.get("lr", r.get("optim.lr"))
        table.setdefault(int(r["model.width"]), {})[float(lr)] = r["eval_loss"]
    return table


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("standard")
    ap.add_argument("mup")
    ap.add_argument("--out", default="docs/mup")
    args = ap.parse_args()
    runs = {"standard": load(args.standard), "muP": load(args.mup)}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, (name, table) in zip(axes, runs.items()):
        lrs = sorted({lr for row in table.values() for lr in row})
        print(f"\n{name}\n")
        print("| width | " + " | ".join(f"{lr:.2g}" for lr in lrs) + " | best lr |")
        print("|---" * (len(lrs) + 2) + "|")
        best = {}
        for width, row in sorted(table.items()):
            best[width] = min(row, key=row.get)
            cells = [(f"**{row[lr]:.4f}**" if lr == best[width] else f"{row[lr]:.4f}")
                     if lr in row else "" for lr in lrs]
            print(f"| {width} | " + " | ".join(cells) + f" | {best[width]:.2g} |")
            ax.plot(sorted(row), [row[lr] for lr in sorted(row)], "o-", label=f"width {width}")
        steps = [math.log2(best[w] / best[min(best)]) for w in sorted(best)]
        print(f"\nbest lr shift from the narrowest width, in grid steps (x2): "
              + ", ".join(f"{w}: {s:+.0f}" for w, s in zip(sorted(best), steps)))
        ax.set(xscale="log", xlabel="learning rate", title=name)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("validation loss (fixed t)")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "lr_transfer.png"), dpi=110)


if __name__ == "__main__":
    main()
