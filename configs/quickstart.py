"""The README's first run: a small class-conditional video DiT on embedded moving digits (CPU).

    python -m vidit.train --config configs/quickstart.py --workdir runs/quickstart

The moving_digits recipe (4 x 128 DiT, batch 8) on 4-frame clips instead of 8: 128 tokens per
clip, so a step costs about half as much; digit shapes need more updates, not longer clips.
Twice moving_digits' learning rate, stratified training times, a power-function EMA, Muon on
the blocks' weight matrices and guidance 5: 99.2 / 98.8 / 97.8 / 99.2% class accuracy on
training seeds 0-3 after 3200 steps (50 sampling steps; 98.6 / 98.6 / 97.8 / 99.4% with the
25 it samples with), 6-16 minutes of training on 2 CPU cores (AdamW for 4800 steps, about
the same wall: 94.95% over four seeds). Samples (one per digit 0-9) land in
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
    c.optim.warmup_steps = 100
    c.train.steps = 4800  # the few-step objectives' budget; flow takes 3200 Muon steps below
    if arg.objective == "flow":
        # lr 2e-3 (moving_digits: 1e-3) and guidance 5: 96.8% class accuracy (seed 0, 500
        # samples, independent times) where 1e-3 gave 91.0% at guidance 5 and 78.4% at 3.
        # 3600 steps at 2e-3: 93.8%; 3e-3 for 3600 steps: 90.0%. docs/quickstart.
        c.optim.lr = 2e-3
        c.sample.guidance = 5.0
        # Stratified training times (one per eighth of the time distribution in each batch of
        # 8): at batch 8, independent draws leave whole ranges of noise levels out of a step.
        # Seeds 0 / 1 / 2: 95.2 / 93.6 / 94.6% against 96.8 / 94.4 / 89.8% (docs/quickstart).
        c.objective.stratified = True
        # EDM2's power-function EMA (Karras et al. 2024) at p = 16: an average half as long as
        # the (1 + s) / (10 + s) warmup's (mean age 270 steps against ~480). Seeds 0-3: 96.2 /
        # 94.6 / 94.4 / 94.6% against 95.2 / 93.6 / 94.6 / 93.6%, and every seed's digits keep
        # their class in more frames; a longer average (p = 3) lost 1.6 points (docs/quickstart).
        c.ema_power = 16.0
        # Muon (Jordan et al. 2024) on the blocks' weight matrices, AdamW on the rest
        # (train_state.make_optimizer). A step costs 1.5-1.7x AdamW's on this small model (the
        # Newton-Schulz products of 48 small matrices), so 3200 steps take about the wall time
        # of AdamW's 4800. Seeds 0-3: 99.2 / 98.8 / 97.8 / 99.2% class accuracy, frame
        # agreement 0.93 / 0.91 / 0.93 / 0.96, against 96.2 / 94.6 / 94.4 / 94.6% and
        # 0.87 / 0.87 / 0.85 / 0.90 for AdamW at 4800 steps. 1600 steps: 87.8% (docs/quickstart).
        c.optim.name = "muon"
        c.train.steps = 3200
        # 25 Euler steps sample as well as 50 at half the time (the quick evaluation's and the
        # samples'): seeds 0-3 98.6 / 98.6 / 97.8 / 99.4%, frame agreement 0.91-0.95, against
        # 99.2 / 98.8 / 97.8 / 99.2% at 50 steps, the same checkpoints (docs/quickstart).
        c.sample.steps = 25
    c.train.eval_every = c.train.ckpt_every = c.train.steps // 2
    if arg.smoke:
        config_lib.make_smoke(c)
    return c
