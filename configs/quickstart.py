"""The README's first run: a small class-conditional video DiT on embedded moving digits (CPU).

    python -m vidit.train --config configs/quickstart.py --workdir runs/quickstart

About 25 minutes on 2 CPU cores today (0.4 steps/s); samples (one row per digit 0-9) land in
runs/quickstart/samples/. `configs/moving_digits.py` is the same data with a bigger budget.
"""
from configs import moving_digits
from vidit import config_lib


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, smoke=False)
    c = moving_digits.get_config("size=tiny")
    c.model.depth, c.model.width, c.model.heads = 4, 128, 2
    c.model.patch = (2, 4, 4)  # 4 x 8 x 8 = 256 tokens per clip
    c.data.batch_size = 32
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 50
    c.train.steps = 600
    c.train.eval_every = 200
    c.train.ckpt_every = 200
    c.sample.num = 10
    if arg.smoke:
        config_lib.make_smoke(c)
    return c
