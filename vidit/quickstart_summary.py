"""The summary scripts/quickstart.sh prints at the end: where the samples are, how a quick
evaluation scored them, and the commands to try next.

    python -m vidit.quickstart_summary --workdir runs/quickstart [--started UNIX_TIME]
"""
from __future__ import annotations

import argparse
import json
import time

from vidit import storage


def summary(workdir: str, started: float | None = None) -> str:
    run = storage.path(workdir)
    samples = sorted((run / "samples").glob("*.gif")) if (run / "samples").exists() else []
    lines = ["", "=" * 72, "vidit quickstart: done" + (
        f" in {_minutes(time.time() - started)}" if started else "")]
    if samples:
        last = str(samples[-1])
        lines.append(f"samples (one per digit 0-9): {last} and {last[:-4]}.mp4")
    else:
        lines.append(f"no samples were written under {run / 'samples'}")
    report = run / "eval_quick" / "eval.json"
    if report.exists():
        r = json.loads(report.read_text())
        row = r["results"][0]
        lines.append(
            f"quick evaluation ({r['num']} samples, {row['steps']} steps, guidance "
            f"{r['guidance']:g}): class accuracy {row['class_accuracy']:.0%}, frame agreement "
            f"{row['frame_agreement']:.0%} (a frame classifier trained for "
            f"{r.get('classifier_steps', '?')} steps; docs/quickstart has the full numbers)")
        by_class = [(a, k) for k, a in enumerate(row.get("class_accuracy_by_class") or [])
                    if a is not None]
        if by_class and min(by_class)[0] < 1.0:
            a, k = min(by_class)
            mistakes = [f"{label} as {pred} ({n})" for label, pred, n in row.get("top_confusions", [])]
            lines.append(f"  weakest digit: {k} ({a:.0%}); most frequent mistakes: "
                         + ", ".join(mistakes[:3]))
    lines += [
        "next:",
        f"  python -m vidit.sample --workdir {workdir} --label 7 --num 4 --out seven.gif",
        f"  python -m vidit.export --workdir {workdir} --out {workdir}_export",
        f"  python -m vidit.evaluate --workdir {workdir} --num 500       # the docs' scoring",
        "  python -m vidit.train --config configs/text_digits.py --workdir runs/text  "
        "# text-to-video, frozen MiniLM",
        "(source .venv/bin/activate first; README.md lists every command)",
        "=" * 72,
    ]
    return "\n".join(lines)


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {int(seconds % 60)} s"


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--started", type=float, default=None, help="when the run began (Unix time)")
    args = p.parse_args()
    print(summary(args.workdir, args.started))


if __name__ == "__main__":
    main()
