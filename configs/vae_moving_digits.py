"""Causal 3D video VAE on the embedded moving-digits dataset (the latent space of latent_digits).

    python -m vidit.train --config configs/vae_moving_digits.py --workdir runs/vae_digits
    python -m vidit.train --config configs/vae_moving_digits.py:smoke --workdir /tmp/vae_smoke

Same trainer, checkpoints, sharding and metrics as a DiT (config.model.kind = 'vae', objective
'vae': L1 + l2_weight * MSE + beta * KL, vidit/diffusion/autoencoding.py). Evaluation is PSNR /
SSIM / L1 of the EMA model's reconstructions of validation clips (eval/psnr, eval/ssim in
TensorBoard and WORKDIR/eval.jsonl); samples/step_*.gif show each input beside its
reconstruction. When the run ends it writes WORKDIR/latent_stats.json (per-channel latent
mean/std over training clips), which latent DiTs normalise with.

Variants (after ':', comma-separated): compression=4x4x4 (default) | 1x4x4 | 4x8x8, smoke, gan
(the hinge patch-GAN term from step train.steps // 2 on, weight 0.1; not tuned).
Clips are 9 frames (1 + 2 * 4: a causal VAE with temporal compression 4 needs 1 + k*4 frames) of
the stored 16, at random offsets when training.
"""
from vidit import config_lib, diffusion
from vidit.models import vae

# latent channels per compression: fewer latent positions get more channels
LATENT_CHANNELS = {(4, 4, 4): 8, (1, 4, 4): 4, (4, 8, 8): 16}


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, smoke=False, compression="4x4x4", gan=False)
    compression = tuple(int(f) for f in arg.compression.split("x"))
    if compression not in LATENT_CHANNELS:
        raise ValueError(f"compression={arg.compression} is not one of "
                         f"{['x'.join(map(str, k)) for k in LATENT_CHANNELS]}")
    c = config_lib.base_config()
    c.data.num_frames = 9
    c.data.height = c.data.width = 32
    c.data.channels = 1
    # Small batches, many steps (a batch of 4 clips is 36 frames).
    c.data.batch_size = 4

    m = vae.default_config(compression)
    m.channels = 1
    # Sized for 2 CPU cores: 16 channels at full resolution, where the cost is; 64 at the
    # latent resolution.
    m.base_width = 16
    m.channel_mult = (1, 2, 4, 4)[: len(m.channel_mult)]
    m.num_res_blocks = 1
    m.latent_channels = LATENT_CHANNELS[compression]
    # GroupNorm per frame: with the bias-free per-pixel RMSNorm ("rms") even one batch of
    # clips would not overfit (docs/latent).
    m.norm = "group"
    m.norm_groups = 8
    m.disc = dict(width=16, num_layers=3)
    del m["loss"]  # the loss weights are config.objective's
    c.model = dict(kind="vae", cond="none", **m.to_dict())

    c.objective = diffusion.default_config("vae")
    c.objective.beta = 1e-6
    # + 200 * MSE: L1 alone pulls sparse strokes to the all-black reconstruction (L1's median);
    # the MSE term keeps them (docs/latent compares the weights).
    c.objective.l2_weight = 200.0
    if arg.gan:
        c.objective.gan_weight = 0.1

    c.optim.lr = 1e-3
    c.optim.warmup_steps = 100
    c.optim.end_lr_fraction = 0.05
    c.optim.weight_decay = 0.0
    # 0.99: at 0.999 the EMA lags the raw params while PSNR is still climbing at the end of a
    # short run (docs/latent).
    c.ema_decay = 0.99

    # Sized to about half an hour on 2 CPU cores (docs/latent has the time and PSNR/SSIM).
    c.train.steps = 2200
    c.train.log_every = 50
    c.train.eval_every = 1100
    c.train.eval_batches = 16  # 64 validation clips
    c.train.ckpt_every = 550
    c.train.cond_drop_prob = 0.0
    c.train.latent_stats_batches = 64  # 256 training clips for latent_stats.json
    c.sample.num = 8

    if arg.smoke:
        # make_smoke's settings, without its DiT size
        c.data.builder_kwargs = {"num_train": 64, "num_validation": 16}
        c.data.batch_size = 8
        c.optim.warmup_steps = 2
        c.train.steps = 6
        c.train.log_every = 2
        c.train.ckpt_every = 3
        c.model.base_width = 8
        c.model.disc = dict(width=8, num_layers=2)
        c.model.norm_groups = 4
        c.train.eval_every = 3
        c.train.eval_batches = 1
        c.train.latent_stats_batches = 2
    if arg.gan:
        c.objective.gan_start = c.train.steps // 2
    return c
