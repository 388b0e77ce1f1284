"""Fine-tuning Wan 2.1 text-to-video (1.3B or 14B) with flow matching, on cached Wan-VAE latents
and umT5-XXL caption embeddings.

    python -m vidit.compile --config configs/wan21_t2v.py:size=14b,res=720p --topology v5p:2x2x1
    python -m vidit.train --config configs/wan21_t2v.py:size=1.3b \
        --config.model.init_from=Wan2.1-T2V-1.3B-Diffusers/transformer --workdir gs://B/wan

`model.init_from` is a diffusers `transformer/` folder (local or gs://) whose weights start the
run (vidit/wan_weights.py); empty = random init. The data are latents of the Wan VAE (16
channels; 81 frames -> 21 latent frames, 8x spatial) and cached umT5 embeddings
(data_pipelines/encode_text.py). Flow matching as Wan and diffusers train it: t uniform in
[0, 1] (t = 1 is noise, Wan's sigma), shifted by diffusers' flow_shift for the resolution
(3 at 480p, 5 at 720p), the velocity eps - x0 as the target.

With the Wan VAE: vae=FOLDER (a diffusers Wan model folder, or its vae/) makes the data the
81-frame pixel clips at the resolution, the latents those the Wan VAE of FOLDER wrote with
`data_pipelines/encode_latents --autoencoder FOLDER --num_frames 81` (normalised with the VAE's
latents_mean / latents_std, as Wan's pipelines do), and samples decode through it. Without it
the data are the latents themselves (what vidit.compile needs).

Variants: size=1.3b|14b, res=480p|720p, vae=FOLDER, lora=R (LoRA of rank R on the attention projections,
alpha = R; only the adapters train), smoke (a tiny random Wan on the embedded moving digits
with the packaged MiniLM encoder, for CPU tests).
"""
from configs import pod_common
from vidit import config_lib
from vidit.models import wan

# res -> (latent frames, height, width) of 81-frame clips, and diffusers' flow_shift for it
RESOLUTIONS = {"480p": ((21, 60, 104), 3.0), "720p": ((21, 90, 160), 5.0)}
WAN_VAE_COMPRESSION = (4, 8, 8)


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, size="1.3b", res="480p", lora=0, smoke=False, vae="")
    if arg.size not in wan.SIZES or arg.res not in RESOLUTIONS:
        raise ValueError(f"wan21_t2v.py: size is one of {sorted(wan.SIZES)}, res one of "
                         f"{sorted(RESOLUTIONS)}")
    (frames, height, width), shift = RESOLUTIONS[arg.res]
    size = wan.SIZES[arg.size]
    c = pod_common.latent_video_config(
        depth=size["depth"], width=size["width"], heads=size["heads"],
        latent_clip=(frames, height, width, 16), batch=1, lr=1e-5,
        mesh=dict(data=1, fsdp=1, tensor=1, sequence=-1))
    # Global batch 1 (maxdiffusion's Wan setting): every chip holds a slice of the clip's tokens
    # (Ulysses sequence parallelism) and, ZeRO-3 style, a slice of every weight: weights shard
    # over the sequence axis too.
    c.sharding_rules = [["embed", ["fsdp", "sequence"]] if rule[0] == "embed" else rule
                        for rule in c.sharding_rules]
    c.model.update(wan.COMMON)
    c.model.ffn_dim = size["ffn_dim"]
    c.model.size = f"wan2.1-{arg.size}"
    c.model.text_encoder = dict(kind="t5", path="", online=False, dtype="bfloat16")  # umT5-XXL
    c.model.init_from = ""
    # LoRA (vidit/models/lora.py): rank 0 = full fine-tuning. The adapters sit on every
    # attention projection (self and cross), as diffusers' Wan LoRA trainers place them; only
    # they train, and `vidit.export` merges them into the diffusers folder it writes.
    c.model.lora = dict(rank=arg.lora, alpha=float(arg.lora),
                        targets=("self_attn/q", "self_attn/k", "self_attn/v", "self_attn/out",
                                 "cross_attn/q", "cross_attn/k", "cross_attn/v",
                                 "cross_attn/out"))
    if arg.lora:
        c.optim.lr = 1e-4  # adapters start at zero: the usual LoRA rate
    c.objective.time_sampling = "uniform"
    c.objective.shift = shift
    c.optim.weight_decay = 0.0
    c.optim.warmup_steps = 100
    c.ema_decay = 0.0  # fine-tuning: the EMA of a short run lags; sample the weights themselves
    if arg.vae:
        st, sh, sw = WAN_VAE_COMPRESSION
        c.data.autoencoder = arg.vae
        c.data.num_frames = 1 + (frames - 1) * st
        c.data.height, c.data.width, c.data.channels = height * sh, width * sw, 3
        c.data.name = "wan_latents"  # encode_latents --name wan_latents --out DIR
    if arg.smoke:
        pod_common.make_smoke(c)
        c.model.update(dict(depth=2, width=48, heads=2, ffn_dim=96, freq_dim=32,
                            channels=1, patch=(2, 4, 4)))
        # Captions of the embedded digits through the packaged MiniLM, run in the step.
        c.model.text_encoder = dict(kind="minilm", path="", online=True, dtype="")
        c.model.text_width = 384
        c.model.text_len = c.data.text_len = 16
        c.data.builder_kwargs = {**c.data.builder_kwargs, "captions": "varied"}
    return c
