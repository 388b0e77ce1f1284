"""The one default config every experiment file starts from, and the model size table.

Experiment files under configs/ are small: `get_config(arg)` calls `base_config()` and changes
what differs. `arg` is the text after ':' in `--config configs/x.py:arg`, e.g. "smoke" or
"size=B,smoke"; see `parse_arg`.
"""
from __future__ import annotations

import ml_collections

from data_pipelines import data_config
from vidit import diffusion, sharding
from vidit.models import layers

# depth, width, heads (DiT paper sizes, plus tiny ones for tests and CPU runs)
SIZES = {
    "tiny": (2, 64, 2),
    "mini": (6, 192, 3),
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """'smoke,size=B' -> {'smoke': True, 'size': 'B'} over the given defaults.

    Only keys named in `defaults` are accepted, so a mistyped variant is an error.
    """
    out = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        if key not in out:
            raise ValueError(f"config variant '{key}' is unknown; valid: {sorted(out)}")
        default = out[key]
        if not value:
            out[key] = True
        elif isinstance(default, bool):
            out[key] = value.lower() in ("1", "true", "yes")
        elif isinstance(default, int):
            out[key] = int(value)
        elif isinstance(default, float):
            out[key] = float(value)
        else:
            out[key] = value
    return ml_collections.ConfigDict(out)


def set_size(model: ml_collections.ConfigDict, size: str) -> None:
    if size not in SIZES:
        raise ValueError(f"model size '{size}' is unknown; valid: {sorted(SIZES)}")
    model.size = size
    model.depth, model.width, model.heads = SIZES[size]


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.data = data_config.defaults()  # one table for the trainer and the pipeline

    c.model = dict(
        size="S",
        depth=12,
        width=384,
        heads=6,
        mlp_ratio=4.0,
        patch=(1, 2, 2),  # (time, height, width)
        channels=1,  # set to data.channels by experiment files
        cond="class",  # class | text | none
        num_classes=10,
        text_len=40,  # caption tokens
        # The caption encoder (vidit/text_encoders.py): 'byte' is trained with the DiT
        # (text_width/depth/heads size it); 't5' and 'minilm' are frozen pretrained encoders
        # (a Hugging Face folder at `path`; '' = minilm's packaged copy) whose output width
        # must equal text_width. online: run the frozen encoder in the train step on the
        # pipeline's tokens, instead of reading embeddings cached by encode_text. dtype: the
        # frozen encoder's parameters and compute ('' = float32 params, model.dtype compute).
        text_encoder=dict(kind="byte", path="", online=False, dtype=""),
        text_width=128,
        text_depth=2,
        text_heads=4,
        rope_theta=10000.0,
        dtype="float32",  # compute dtype
        param_dtype="float32",
        # False: a Python loop over blocks, faster on CPU than one lax.scan, whose backward
        # stacks and slices every layer's residuals (docs/speed). The pod configs scan
        # (compile time independent of depth).
        scan_layers=False,
        remat="none",  # none | dots_saveable | full
        attention="chunked",  # chunked | dense | xla (see vidit/models/attention.py)
        sequence_parallel="ulysses",  # ulysses | ring | gspmd, when mesh.sequence > 1
        interval_input=False,  # a second time input h = t - r (MeanFlow); zero-initialised
        time_scale=layers.DIT_TIME_SCALE,  # t and h enter the time embedding as time_scale * t
        # > 0: a patch discriminator of this base width (and depth) beside the DiT, trained by
        # MeanFlow's adversarial term (objective.adversarial_weight); 0: none, no parameters.
        disc_width=0,
        disc_layers=3,
        # Image-to-video: the model also sees a clean first frame (the clip's first latent
        # frame) and its mask as extra input channels, as Wan 2.1 I2V does; trained on a share
        # train.first_frame_prob of the examples, sampled with `vidit.sample --image`.
        first_frame=False,
        # 'mup': maximal-update parametrisation (vidit/models/mup.py), anchored at a base model
        # of mup_base_width (and mup_base_heads; 0 = this model's heads): a learning rate tuned
        # at the base width transfers to wider models. 'standard': DiT's own.
        parametrization="standard",
        mup_base_width=128,
        mup_base_heads=0,
    )

    # Only the chosen objective's fields: a field of another objective is a config error.
    # VP configs use diffusion.default_config("vp").
    c.objective = diffusion.default_config("flow")

    c.optim = dict(
        # adamw, or muon: Muon (Jordan et al. 2024; optax.contrib.muon) on the blocks' weight
        # matrices, its updates scaled to AdamW's RMS so lr carries over; AdamW on the rest.
        name="adamw",
        muon_beta=0.95,  # Muon's momentum
        # Newton-Schulz iterations that orthogonalise each update; 3 made the quickstart's step
        # 19% cheaper and its samples 5.6 points worse (docs/quickstart).
        muon_ns_steps=5,
        # Dense modules inside the blocks that stay on AdamW, by attribute name (e.g. "ada", the
        # adaLN modulation): fewer Newton-Schulz products per step.
        muon_exclude=(),
        lr=1e-4,
        schedule="cosine",  # cosine | constant (both after linear warmup)
        warmup_steps=100,
        end_lr_fraction=0.1,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        weight_decay=0.0,
        clip_norm=1.0,
        grad_accum=1,
    )
    # The EMA's decay is min(ema_decay, warmup) (train_state.ema_decay_at). ema_power 0: the
    # warmup (1 + step) / (10 + step) keeps the average over roughly the last tenth of training,
    # so 0.999 only takes over after ~9000 steps and any ema_decay >= 0.998 is the same for a
    # 4800-step run. ema_power p > 0: EDM2's power-function EMA, (1 - 1/(step + 1))^(p + 1),
    # a fixed share of the run at any length (its mean age is steps / (p + 2): p = 8 is about
    # the warmup's average, p = 16 half as long).
    c.ema_decay = 0.999
    c.ema_power = 0.0

    c.train = dict(
        steps=1000,
        cond_drop_prob=0.1,
        first_frame_prob=0.5,  # with model.first_frame: examples given their first frame
        log_every=10,
        eval_every=250,
        eval_batches=2,
        eval_times=8,  # fixed-t validation loss at this many evenly spaced t
        ckpt_every=250,
        keep_ckpts=3,
        sample_every=0,  # 0 = only at the end
        nonfinite="skip",  # skip the update | stop the run
        # Stop (with the last good checkpoint) after this many consecutive skipped updates:
        # a run that only skips has diverged. 0 = never.
        max_skipped_steps=20,
        # A progress bar on a terminal; elsewhere (CI, SLURM, TPU VM logs) a line every
        # progress_every_s seconds (vidit/progress.py). False: the metrics line every log_every.
        progress=True,
        progress_every_s=30.0,
    )

    c.sample = dict(
        steps=50,
        guidance=4.0,
        num=8,
        seed=0,
        fps=8,
    )

    # ICI sizes within a slice (one may be -1 = the rest), dcn_* sizes across slices, num_slices
    # for devices without slice_index (sharding.MESH_DEFAULTS says more).
    c.mesh = dict(sharding.MESH_DEFAULTS)
    c.sharding_rules = [list(rule) for rule in sharding.DEFAULT_RULES]
    return c


def make_smoke(c: ml_collections.ConfigDict) -> None:
    """Shrinks any config to a seconds-long CPU run: every config file offers it as ':smoke'."""
    set_size(c.model, "tiny")
    c.data.batch_size = 8
    c.data.builder_kwargs = {"num_train": 64, "num_validation": 16}
    c.optim.warmup_steps = 2
    c.train.steps = 6
    c.train.log_every = 2
    c.train.eval_every = 0
    c.train.eval_batches = 1
    c.train.eval_times = 2
    c.train.ckpt_every = 3
    c.sample.steps = 4
    c.sample.num = 8
