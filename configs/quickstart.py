"""The README's first run: a small class-conditional video DiT on embedded moving digits (CPU).

    python -m vidit.train --config configs/quickstart.py --workdir runs/quickstart

The moving_digits recipe (4 x 128 DiT, batch 8) for 1200 steps instead of 5000: about 8-9 minutes
of training on 2 CPU cores at the 2.2-2.6 steps/s the full moving_digits run measured. Samples
(one row per digit 0-9) land in runs/quickstart/samples/.
"""
from configs import moving_digits
from vidit import config_lib


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, smoke=False)
    c = moving_digits.get_config()
    c.train.steps = 1200
    c.optim.warmup_steps = 100
    c.train.eval_every = 400
    c.train.ckpt_every = 400
    if arg.smoke:
        config_lib.make_smoke(c)
    return c
