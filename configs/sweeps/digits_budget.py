"""What a budget needs, measured on the embedded moving digits: L(N, D) and the optimal learning
rate and batch size as functions of model size and data (docs/sweep).

    python -m vidit.sweep --sweep configs/sweeps/digits_budget.py --workdir runs/budget
    python -m vidit.sweep --analyze runs/budget --predict 1e14

Three muP models (widths 32, 64, 128; 2 blocks, head dim 32; muP anchored at width 64, where
docs/mup found the learning rate) x two data budgets (3,200 and 9,600 training clips seen, the
same for every size and batch: steps = clips / batch) x four learning rates a factor 2 apart
(4e-3 to 3.2e-2: around that optimum, and below it, where the smaller batches want to be) x
three batch sizes: 72 points; each group of twelve at one (N, D) gives the optimal learning rate
and batch size there. About an hour on 2 CPU cores.
"""
import ml_collections


def get_config():
    s = ml_collections.ConfigDict()
    s.base = "configs/moving_digits.py"
    s.base_arg = ""
    s.sizes = [dict(depth=2, width=32, heads=1), dict(depth=2, width=64, heads=2),
               dict(depth=2, width=128, heads=4)]
    s.examples = [3200, 9600]
    s.lrs = [4e-3, 8e-3, 1.6e-2, 3.2e-2]
    s.batch_sizes = [4, 8, 16]
    s.overrides = ["model.parametrization=mup", "model.mup_base_width=64",
                   "model.mup_base_heads=2", "data.num_frames=4",
                   "train.eval_every=0", "train.ckpt_every=0", "sample.num=0",
                   "train.log_every=100", "train.progress=False", "train.eval_batches=8"]
    return s
