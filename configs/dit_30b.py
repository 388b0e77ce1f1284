"""30B video DiT, Movie-Gen-like (48 x 6144, 48 heads of 128) on 32x96x96x16 latents (16 s of
768 px video at 16 fps through an 8x8x8 autoencoder): 73,728 tokens per clip.

    python -m vidit.compile --config configs/dit_30b.py --topology v5p:8x8x8
Compiled for v5p:8x8x8 (512 chips): FSDP 64 x Ulysses sequence 8, global batch 64; 38.8B
parameters (adaLN modulation is a third of them); captions as cached T5-XXL embeddings.
Per-chip memory of the compiled step: docs/compile.
"""
from configs import pod_common
from vidit import config_lib


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, smoke=False)
    c = pod_common.latent_video_config(depth=48, width=6144, heads=48, latent_clip=(32, 96, 96, 16),
                                       batch=64, mesh=dict(data=1, fsdp=-1, tensor=1, sequence=8))
    if arg.smoke:
        pod_common.make_smoke(c)
    return c
