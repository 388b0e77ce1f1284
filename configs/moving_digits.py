"""Class-conditional pixel-space video DiT on the embedded moving-digits dataset.

    python -m vidit.train --config configs/moving_digits.py --workdir runs/moving_digits
    python -m vidit.train --config configs/moving_digits.py:smoke --workdir /tmp/smoke

Variants (after ':', comma-separated): smoke (tiny model, a few steps), size=<digits|tiny|mini|S|...>
shapes=mixed (clips at native sizes in buckets: images, 4/8/16 frames, square/wide/tall),
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

docs/few_step/README.md measures the few-step objectives at the quickstart's budget: MeanFlow
is the recipe tuned there; distillation and the shortcut recipe (learning rate, steps,
fractions) are not tuned.
"""
from vidit import config_lib, diffusion

# Buckets of the 'mixed' moving digits (every frame count and canvas it draws, 16-frame clips
# training as 8); batch sizes follow config.data's: tokens per batch stay level with
# data.num_frames x height x width at data.batch_size (data_pipelines/buckets.py).
MIXED_BUCKETS = ("8x32x32, 8x32x48, 8x48x32, 4x32x32, 4x32x48, 4x48x32, "
                 "1x32x32, 1x32x48, 1x48x32")


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, smoke=False, size="digits", cond="class", objective="flow",
                               shapes="square")
    c = config_lib.base_config()
    c.data.num_frames = 8
    c.data.height = c.data.width = 32
    c.data.channels = c.model.channels = 1
    # Small batches, many steps: on a few CPU cores step time grows with the batch, and early in
    # training more updates beat bigger ones (docs/quickstart).
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

    c.train.steps = 5000  # time and sample quality on 2 CPU cores: docs/quickstart
    c.train.log_every = 100
    c.train.eval_every = 1000
    c.train.ckpt_every = 1000
    c.sample.steps = 50
    c.sample.guidance = 3.0
    c.sample.num = 10

    if arg.objective == "shortcut":
        c.sample.steps = 4  # a trained step size (d = 1/4); 1 and 2 work too
    if arg.objective == "meanflow":  # guidance trained in, one network call per sample
        # t and h enter the time embedding unscaled: at DiT's 1000 t the jvp's du/dt is dominated
        # by the fast sinusoids. Flow keeps 1000, so starting from a flow checkpoint of this
        # config needs --config.model.time_scale=1000.
        c.model.time_scale = 1.0
        # Trained-in classifier-free guidance w = 4, its target mixed with the model's own
        # guided velocity (guidance_mix, MeanFlow eq. 21): samples then use guidance 1.
        c.objective.guidance = 4.0
        c.objective.guidance_mix = 0.8
        # For the last third of training, 2 extra rows per batch pull the one-step jump toward
        # the model's own two-step jump (MeanFlowObjective docstring); their weight is lower
        # than without the score term below, whose pull this regression would otherwise undo.
        c.objective.endpoint_fraction = 0.25
        c.objective.endpoint_start = c.train.get_ref("steps") * 2 // 3  # follows train.steps
        c.objective.endpoint_weight = 5.0
        # Those rows' one-step samples are also pulled toward the model's own guided denoising
        # of them (score distillation, at 3 times the trained-in guidance).
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
    if arg.shapes == "mixed":  # images and 4/8-frame clips, square, 3:2 and 2:3 (buckets.py)
        c.data.builder_kwargs = {**c.data.builder_kwargs, "shapes": "mixed"}
        c.data.buckets = MIXED_BUCKETS
        c.model.patch = (1, 4, 4)  # a 1-frame image has no pair of frames to patch together
    return c
