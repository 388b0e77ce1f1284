"""What the pod-scale configs (dit_1b, dit_8b, dit_30b) share: a text-conditioned latent-video
DiT in bf16 with f32 master weights, full remat, splash attention with Ulysses sequence
parallelism, FSDP over most chips. Not a config file itself: each dit_*.py names its size,
clip and mesh, and says which slice it was compiled for (`python -m vidit.compile`).
"""
from vidit import config_lib


def latent_video_config(*, depth, width, heads, latent_clip, batch, mesh, lr=1e-4):
    """latent_clip = (frames, height, width, channels) of the autoencoder's latents."""
    c = config_lib.base_config()
    c.model.depth, c.model.width, c.model.heads = depth, width, heads
    c.model.size = "custom"
    c.model.patch = (1, 2, 2)
    c.model.cond = "text"
    # Captions through a frozen T5-XXL-shaped encoder (T5 v1.1 XXL or umT5-XXL: 4096 wide),
    # 512 tokens, whose embeddings are cached in the dataset (data_pipelines/encode_text.py):
    # the train step never runs the encoder. path: its Hugging Face folder, for encode_text
    # and for sampling with a prompt.
    c.model.text_encoder = dict(kind="t5", path="", online=False, dtype="bfloat16")
    c.model.text_width = 4096
    c.model.text_len = c.data.text_len = 512
    c.model.dtype, c.model.param_dtype = "bfloat16", "float32"
    c.model.remat = "full"
    c.model.scan_layers = True  # one compiled layer: compile time independent of depth
    c.model.attention = "splash"
    c.model.sequence_parallel = "ulysses"
    frames, height, width_, channels = latent_clip
    c.data.num_frames, c.data.height, c.data.width = frames, height, width_
    c.data.channels = c.model.channels = channels
    c.data.batch_size = batch
    c.mesh.update(mesh)  # ICI sizes; dcn_* (multi-slice) stay 1 unless overridden
    c.optim.lr = lr
    c.optim.warmup_steps = 1000
    c.train.steps = 200_000
    c.train.eval_every = 5000
    c.train.ckpt_every = 1000
    c.train.progress = False
    return c


def make_smoke(c):
    """The ':smoke' variant of a pod config: the same code paths on CPU and the embedded data."""
    config_lib.make_smoke(c)
    c.model.attention, c.model.dtype, c.model.remat = "chunked", "float32", "none"
    c.model.text_encoder = dict(kind="byte", path="", online=False, dtype="")
    c.model.text_width, c.model.text_depth, c.model.text_heads = 64, 1, 2
    c.model.text_len = c.data.text_len = 40
    c.data.name = "moving_digits"
    c.data.num_frames, c.data.height, c.data.width = 8, 32, 32
    c.data.channels = c.model.channels = 1
    c.model.patch = (2, 4, 4)
    c.mesh.update(dict(data=-1, fsdp=1, tensor=1, sequence=1))
