"""Class-conditional pixel-space video DiT on the embedded moving-digits dataset.

    python -m vidit.train --config configs/moving_digits.py --workdir runs/moving_digits
    python -m vidit.train --config configs/moving_digits.py:smoke --workdir /tmp/smoke

Variants (after ':', comma-separated): smoke (tiny model, a few steps), size=<tiny|mini|S|...>,
cond=<class|text|none>, objective=<flow|vp> (vp: the DiT paper's diffusion, v-prediction with
zero-terminal-SNR, DDIM sampling).
"""
from vidit import config_lib, diffusion


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, smoke=False, size="mini", cond="class", objective="flow")
    c = config_lib.base_config()
    c.data.num_frames = 8
    c.data.height = c.data.width = 32
    c.data.channels = c.model.channels = 1
    c.data.batch_size = 32

    config_lib.set_size(c.model, arg.size)
    c.model.patch = (1, 4, 4)  # 8 x 8 x 8 = 512 tokens
    c.model.cond = arg.cond
    c.objective = diffusion.default_config(arg.objective)
    if arg.objective == "vp":
        c.objective.schedule = "cosine"
        c.objective.prediction = "v"
        c.objective.zero_terminal_snr = True

    c.optim.lr = 3e-4
    c.optim.warmup_steps = 200
    c.optim.weight_decay = 0.0
    c.ema_decay = 0.999

    c.train.steps = 3000
    c.train.log_every = 50
    c.train.eval_every = 500
    c.train.ckpt_every = 500
    c.sample.steps = 50
    c.sample.guidance = 3.0
    c.sample.num = 10

    if arg.smoke:
        config_lib.make_smoke(c)
    return c
