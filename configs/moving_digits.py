"""Class-conditional pixel-space video DiT on the embedded moving-digits dataset.

    python -m vidit.train --config configs/moving_digits.py --workdir runs/moving_digits
    python -m vidit.train --config configs/moving_digits.py:smoke --workdir /tmp/smoke

Variants (after ':', comma-separated): smoke (tiny model, a few steps), size=<digits|tiny|mini|S|...>
(digits, the default: 4 blocks x 128 wide), cond=<class|text|none>,
objective=<flow|vp|meanflow|shortcut|distill> (vp: the DiT paper's diffusion, v-prediction with
zero-terminal-SNR, DDIM sampling; meanflow: one-step average-velocity model, sample with
--steps 1; shortcut: step-size-conditioned model with EMA self-consistency targets, no jvp,
sample with --steps 1, 2 or 4; distill: a MeanFlow student of a trained flow teacher).

Distillation needs the teacher, a workdir of this config (or its export); the student starts as
that teacher, learns its guidance-3 velocity, and samples without guidance:

    python -m vidit.train --config configs/moving_digits.py --workdir runs/digits
    python -m vidit.train --config configs/moving_digits.py:objective=distill \
        --workdir runs/digits_distill --config.objective.teacher_workdir=runs/digits
    python -m vidit.sample --workdir runs/digits_distill --steps 1 --out one_step.gif

Distillation is measured in docs/few_step/README.md (a flow teacher at
--config.model.time_scale=1, guidance 4, lr 5e-4): one step reached 21-30%, below MeanFlow
trained from scratch. The shortcut recipe (learning rate, steps, fractions) is not tuned: at the
quickstart's 4800 steps and guidance 4 it scored 32.6% / 48.6% / 64.4% at 1 / 2 / 4 steps.
"""
from vidit import config_lib, diffusion


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, smoke=False, size="digits", cond="class", objective="flow")
    c = config_lib.base_config()
    c.data.num_frames = 8
    c.data.height = c.data.width = 32
    c.data.channels = c.model.channels = 1
    # Small batches, many steps: on 2 CPU cores a batch of 8 runs 2.6 steps/s against 1.1 for 16
    # and 0.5 for 32, and early in training more updates beat bigger ones.
    c.data.batch_size = 8

    if arg.size == "digits":  # 4 x 128, 2 heads: 1.3M parameters, enough for 10 digit shapes
        c.model.size = "digits"
        c.model.depth, c.model.width, c.model.heads = 4, 128, 2
    else:
        config_lib.set_size(c.model, arg.size)
    c.model.patch = (2, 4, 4)  # 4 x 8 x 8 = 256 tokens
    c.model.cond = arg.cond
    c.objective = diffusion.default_config(arg.objective)
    if arg.objective in ("meanflow", "shortcut", "distill"):  # also sees h = t - r (or d)
        c.model.interval_input = True
    if arg.objective == "shortcut":
        c.objective.consistency_fraction = 0.25  # 2 of the 8 rows (the paper's 1/8 is 1 row)
    if arg.objective == "vp":
        c.objective.schedule = "cosine"
        c.objective.prediction = "v"
        c.objective.zero_terminal_snr = True

    c.optim.lr = 1e-3
    c.optim.warmup_steps = 100
    c.optim.weight_decay = 0.0
    c.ema_decay = 0.999

    c.train.steps = 5000  # measured: 39 min on 2 CPU cores (some other load), 97% class accuracy
    c.train.log_every = 100
    c.train.eval_every = 1000
    c.train.ckpt_every = 1000
    c.sample.steps = 50
    c.sample.guidance = 3.0
    c.sample.num = 10

    if arg.objective == "shortcut":
        c.sample.steps = 4  # a trained step size (d = 1/4); 1 and 2 work too
    if arg.objective == "meanflow":  # guidance trained in (w = 4), one network call per sample
        # t and h enter the time embedding unscaled: at DiT's 1000 t the jvp's du/dt is dominated
        # by the fast sinusoids. At the quickstart's 4800 steps one-step accuracy was 41% at
        # 1000 and 68% at 1 (docs/few_step/README.md). Flow keeps 1000 (87% there, 78% at 1), so
        # starting from a flow checkpoint of this config needs --config.model.time_scale=1000.
        c.model.time_scale = 1.0
        # Measured at 4800 steps, 500 samples, one step: w = 3 65.0%, w = 4 with mix 0.8 75.4%,
        # w = 5 with mix 0.8 62.6%, each one seed. Seeds 1-4 of w = 4 scored 49.4-62.6% (mean
        # of 5: 60.4%), so one step spreads ~26 points between seeds: w = 3 vs 4 is not settled.
        c.objective.guidance = 4.0
        c.objective.guidance_mix = 0.8
        # For the last third of training, 2 extra rows per batch pull the one-step jump toward
        # the model's own two-step jump, their loss weighted (MeanFlowObjective docstring).
        # Measured before the score term, at 4800 steps, 500 samples, seeds 0-4, one step: 60.4%
        # without the rows, 69.6% at weight 1, 73.2% at weight 10 (each seed +0.4 to +9.2 over
        # weight 1); 4 rows instead of 2 gained nothing, weight 100 destabilised two of four
        # seeds (docs/few_step).
        # With the score term below, the weight is 5: this regression pulls the one-step sample
        # back toward the smear the score term pulls apart. From scratch on seeds 5-8, one step:
        # weight 10 80.8% / FD 3.62, weight 5 83.8% / 3.86; weight 2 scored higher still on
        # seeds 5 and 6 but with FD 2.1x flow's best and recall down (docs/few_step).
        c.objective.endpoint_fraction = 0.25
        c.objective.endpoint_start = c.train.get_ref("steps") * 2 // 3  # follows train.steps
        c.objective.endpoint_weight = 5.0
        # Those rows' one-step samples are also pulled toward the model's own guided denoising of
        # them (score distillation, guided at 3 times the trained-in guidance). Measured from
        # step 3200 of seeds 0-4, 500 samples, one step: 70.8% without, 79.6% at guidance 2,
        # 82.8% at 3 (+6.6 to +14.6 by seed), 82.4% at 4 with FD up (all at endpoint weight 10).
        c.objective.score_weight = 10.0
        c.objective.score_guidance = 3.0
        c.sample.guidance = 1.0
        c.sample.steps = 1
    if arg.objective == "distill":  # a fine-tune of the teacher, guidance distilled in
        c.objective.guidance = c.sample.guidance
        c.sample.guidance = 1.0
        c.sample.steps = 1
        c.optim.lr = 3e-4
        c.train.steps = 2000

    if arg.smoke:
        config_lib.make_smoke(c)
    return c
