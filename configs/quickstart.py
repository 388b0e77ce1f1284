"""The README's first run: a small class-conditional video DiT on embedded moving digits (CPU).

    python -m vidit.train --config configs/quickstart.py --workdir runs/quickstart

The moving_digits recipe (4 x 128 DiT, batch 8) on 4-frame clips instead of 8: 128 tokens per
clip, so a step costs about half as much and the run takes twice the steps in the same time;
digit shapes need more updates, not longer clips. Samples (one per digit 0-9) land in
runs/quickstart/samples/. Its time and sample quality: docs/quickstart.

Variants: smoke, objective=<flow|meanflow|...> (as in moving_digits; docs/few_step/README.md
compares :objective=meanflow with flow at this budget).
"""
from configs import moving_digits
from vidit import config_lib


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, smoke=False, objective="flow")
    c = moving_digits.get_config(f"objective={arg.objective}")
    c.data.num_frames = 4  # 2 x 8 x 8 = 128 tokens with the (2, 4, 4) patch
    c.train.steps = 4800  # sized to the README's time budget on 2 CPU cores
    c.optim.warmup_steps = 100
    c.train.eval_every = 1600
    c.train.ckpt_every = 1600
    if arg.smoke:
        config_lib.make_smoke(c)
    return c
