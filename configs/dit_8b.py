"""8B video DiT (28 x 4096, 32 heads of 128) on 32x64x64x16 latents: 32768 tokens per clip.

    python -m vidit.compile --config configs/dit_8b.py --topology v5p:8x8x8
Compiled for v5p:8x8x8 (512 chips): FSDP 128 x Ulysses sequence 4, global batch 128; 10.4B
parameters; captions as cached T5-XXL embeddings. Per-chip memory of the compiled step:
docs/compile.
"""
from configs import pod_common
from vidit import config_lib


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, smoke=False)
    c = pod_common.latent_video_config(depth=28, width=4096, heads=32, latent_clip=(32, 64, 64, 16),
                                       batch=128, mesh=dict(data=1, fsdp=-1, tensor=1, sequence=4))
    if arg.smoke:
        pod_common.make_smoke(c)
    return c
