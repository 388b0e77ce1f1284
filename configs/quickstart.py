"""The README's first run: a small class-conditional video DiT on embedded moving digits (CPU).

    python -m vidit.train --config configs/quickstart.py --workdir runs/quickstart

The moving_digits recipe (4 x 128 DiT, batch 8) on 4-frame clips instead of 8: 128 tokens per
clip, so a step costs about half as much and the run takes twice the steps in the same time.
At 1200 steps of 8-frame clips the samples were still blobs; digit shapes need more updates,
not longer clips. Samples (one per digit 0-9) land in runs/quickstart/samples/.

Variants: smoke, objective=<flow|meanflow|...> (as in moving_digits; docs/few_step/README.md
compares :objective=meanflow with flow at these 4800 steps and at 2400).
"""
from configs import moving_digits
from vidit import config_lib


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, smoke=False, objective="flow")
    c = moving_digits.get_config(f"objective={arg.objective}")
    c.data.num_frames = 4  # 2 x 8 x 8 = 128 tokens with the (2, 4, 4) patch
    # 4800 steps: 10 min 33 s on the 2 cores from a fresh venv (8 min 47 s of it training);
    # 87% class accuracy (2400 steps: 52-57%)
    c.train.steps = 4800
    c.optim.warmup_steps = 100
    c.train.eval_every = 1600
    c.train.ckpt_every = 1600
    if arg.smoke:
        config_lib.make_smoke(c)
    return c
