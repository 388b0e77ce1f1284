"""1B video DiT (24 x 1536, 12 heads of 128) on 16x32x32x16 latents: 4096 tokens per clip.

    python -m vidit.compile --config configs/dit_1b.py --topology v5p:4x4x4
Meant for v5p-128 (64 chips): FSDP 64, global batch 256. Per-chip memory of the compiled step:
docs/compile.
"""
from configs import pod_common
from vidit import config_lib


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, smoke=False)
    c = pod_common.latent_video_config(depth=24, width=1536, heads=12, latent_clip=(16, 32, 32, 16),
                                       batch=256, mesh=dict(data=1, fsdp=-1, tensor=1, sequence=1))
    if arg.smoke:
        pod_common.make_smoke(c)
    return c
