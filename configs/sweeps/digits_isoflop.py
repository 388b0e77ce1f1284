"""IsoFLOP sweep on the embedded moving digits: 4 model sizes x 3 compute budgets, 2-core CPU.

    python -m vidit.sweep --sweep configs/sweeps/digits_isoflop.py --workdir runs/sweep
    python -m vidit.sweep --analyze runs/sweep --predict 1e15

Sizes span 25k to 1.3M parameters; budgets 1e12, 3e12 and 1e13 training FLOPs (each point's
steps = budget / the FLOP counter's FLOPs per step). Sized to run in about an hour on 2 CPU
cores (docs/sweep).
"""
import ml_collections


def get_config():
    s = ml_collections.ConfigDict()
    s.base = "configs/moving_digits.py"
    s.base_arg = ""
    s.sizes = [dict(depth=2, width=32, heads=2), dict(depth=2, width=64, heads=2),
               dict(depth=3, width=96, heads=2), dict(depth=4, width=128, heads=2)]
    s.budgets = [1e12, 3e12, 1e13]
    s.lrs = [1e-3]
    s.min_steps = 20
    # Points only need their losses: no samples, one checkpoint at the end, eval at the end.
    s.overrides = ["train.eval_every=0", "train.ckpt_every=0", "sample.num=0",
                   "train.log_every=50", "train.progress=False", "train.eval_batches=8"]
    return s
