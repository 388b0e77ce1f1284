"""Learning-rate transfer across widths on the embedded moving digits (docs/mup).

    python -m vidit.sweep --sweep configs/sweeps/digits_lr_transfer.py:mup --workdir runs/lr_mup
    python -m vidit.sweep --sweep configs/sweeps/digits_lr_transfer.py:standard --workdir runs/lr_sp
    python docs/mup/lr_transfer.py runs/lr_sp runs/lr_mup

Three widths (64, 128, 256; 2 blocks, head dim 32) x seven learning rates a factor 2 apart, every
point the same 400 steps of 4-frame clips, under the parametrisation the argument names. muP is
anchored at width 64 (mup_base_width), so at that width both parametrisations are the same
model and the same run: the best learning rate there is the one muP should carry to the wider
models. Sized for about 20 minutes per parametrisation on 2 CPU cores.
"""
import ml_collections

PARAMETRIZATIONS = ("standard", "mup")


def get_config(arg: str = "mup"):
    if arg not in PARAMETRIZATIONS:
        raise ValueError(f"digits_lr_transfer.py:{arg}: the argument is one of {PARAMETRIZATIONS}")
    s = ml_collections.ConfigDict()
    s.base = "configs/moving_digits.py"
    s.base_arg = ""
    s.sizes = [dict(depth=2, width=64, heads=2), dict(depth=2, width=128, heads=4),
               dict(depth=2, width=256, heads=8)]
    s.steps = 400
    s.lrs = [2.0 ** -e for e in range(9, 2, -1)]  # 2e-3 ... 0.125
    s.overrides = [f"model.parametrization={arg}", "model.mup_base_width=64",
                   "model.mup_base_heads=2", "data.num_frames=4",
                   "train.eval_every=0", "train.ckpt_every=0", "sample.num=0",
                   "train.log_every=100", "train.progress=False", "train.eval_batches=8"]
    return s
