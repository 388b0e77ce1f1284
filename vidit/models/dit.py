"""Video DiT: a transformer over 3D spacetime patches with adaLN-Zero conditioning.

x [B, T, H, W, C] -> patches [B, N, P] -> tokens [B, N, width] -> blocks -> patches -> video.
Conditioning vector c = embed(t) + embed(class) or pooled text; with text, every block also
cross-attends to the text tokens. Position enters only through 3D RoPE on q and k, so any
(T, H, W) that divides by the patch size works with the same parameters.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from vidit import sharding
from vidit.errors import ConfigError
from vidit.models import context_parallel, discriminator, layers, mup
from vidit.models.attention import attention
from vidit.models.layers import Dense, RMSNorm
from vidit.models.text_encoder import TextEncoder

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
COND_KINDS = ("class", "text", "none")
# The image-to-video condition (config.model.first_frame): 'first_frame' [B, T, H, W, C] whose
# frame 0 is the clean first frame, 'first_frame_mask' [B] bool where it is given.
FIRST_FRAME_KEYS = ("first_frame", "first_frame_mask")

# Logical names of the activations that flow between blocks.
TOKENS = ("activation_batch", "activation_length", "activation_embed")
HEADS = ("activation_batch", "activation_length", "activation_heads", "activation_kv")


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


def _scaled(q, factor: float):
    """q times muP's attention-logit factor (1 under standard parametrisation: no op)."""
    return q if factor == 1.0 else q * jnp.asarray(factor, q.dtype)


class SelfAttention(nnx.Module):
    def __init__(self, cfg, *, rngs, dtype, param_dtype):
        width, heads = cfg.width, cfg.heads
        head_dim = width // heads
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.qkv = Dense((width,), (3, heads, head_dim), ("embed", None, "heads", "kv"), **kw)
        self.q_norm = RMSNorm(head_dim, rngs=rngs, param_dtype=param_dtype)
        self.k_norm = RMSNorm(head_dim, rngs=rngs, param_dtype=param_dtype)
        self.out = Dense((heads, head_dim), (width,), ("heads", "kv", "embed"), **kw)
        self.backend = cfg.attention
        self.strategy = cfg.get("sequence_parallel", "ulysses")
        self.logit_scale = mup.attention_multiplier(cfg)

    def __call__(self, x, rope):
        qkv = self.qkv(x)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q = layers.apply_rope(_scaled(self.q_norm(q), self.logit_scale), *rope)
        k = layers.apply_rope(self.k_norm(k), *rope)
        q, k, v = (sharding.constrain(a, HEADS) for a in (q, k, v))
        y = context_parallel.self_attention(q, k, v, backend=self.backend, strategy=self.strategy)
        return self.out(sharding.constrain(y, HEADS))


class CrossAttention(nnx.Module):
    """Video tokens attend to text tokens (padding masked)."""

    def __init__(self, cfg, *, rngs, dtype, param_dtype):
        width, heads, text_width = cfg.width, cfg.heads, cfg.text_width
        head_dim = width // heads
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.q = Dense((width,), (heads, head_dim), ("embed", "heads", "kv"), **kw)
        self.kv = Dense((text_width,), (2, heads, head_dim), ("embed", None, "heads", "kv"), **kw)
        self.q_norm = RMSNorm(head_dim, rngs=rngs, param_dtype=param_dtype)
        self.k_norm = RMSNorm(head_dim, rngs=rngs, param_dtype=param_dtype)
        self.out = Dense((heads, head_dim), (width,), ("heads", "kv", "embed"), **kw,
                         kernel_init=nnx.initializers.zeros)
        self.backend = cfg.attention
        self.logit_scale = mup.attention_multiplier(cfg)

    def __call__(self, x, text, text_mask):
        q = _scaled(self.q_norm(self.q(x)), self.logit_scale)
        kv = self.kv(text)
        k, v = self.k_norm(kv[:, :, 0]), kv[:, :, 1]
        return self.out(attention(q, k, v, text_mask, backend=self.backend))


class DiTBlock(nnx.Module):
    """adaLN-Zero block: gates are zero at init, so the block starts as the identity."""

    def __init__(self, cfg, *, rngs, dtype, param_dtype):
        width = cfg.width
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.ada = Dense((width,), (6, width), ("embed", None, "mlp"), **kw,
                         kernel_init=nnx.initializers.zeros)
        self.attn = SelfAttention(cfg, **kw)
        self.cross = CrossAttention(cfg, **kw) if cfg.cond == "text" else None
        self.mlp = layers.Mlp(width, int(width * cfg.mlp_ratio), **kw)

    def __call__(self, x, c, rope, text=None, text_mask=None):
        shift1, scale1, gate1, shift2, scale2, gate2 = jnp.moveaxis(
            self.ada(jax.nn.silu(c)), 1, 0)
        h = modulate(layers.layer_norm(x), shift1, scale1)
        x = x + gate1[:, None] * self.attn(h, rope)
        if self.cross is not None:
            x = x + self.cross(layers.layer_norm(x), text, text_mask)
        h = modulate(layers.layer_norm(x), shift2, scale2)
        x = x + gate2[:, None] * self.mlp(h)
        return sharding.constrain(x, TOKENS)


class FinalLayer(nnx.Module):
    def __init__(self, width, patch_dim, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        zeros = nnx.initializers.zeros
        self.ada = Dense((width,), (2, width), ("embed", None, "mlp"), **kw, kernel_init=zeros)
        self.proj = Dense((width,), (patch_dim,), ("embed", "patch"), **kw, kernel_init=zeros)

    def __call__(self, x, c):
        shift, scale = jnp.moveaxis(self.ada(jax.nn.silu(c)), 1, 0)
        return self.proj(modulate(layers.layer_norm(x), shift, scale))


def check_stack(cfg) -> None:
    """Config errors of a transformer stack: heads that do not split the width, an unknown
    remat policy."""
    if cfg.width % cfg.heads:
        raise ConfigError(
            f"config.model.width={cfg.width} does not divide by config.model.heads={cfg.heads}")
    if cfg.remat not in REMAT_POLICIES:
        raise ConfigError(
            f"config.model.remat='{cfg.remat}' is not one of {sorted(REMAT_POLICIES)}")


def make_blocks(make, cfg, rngs):
    """cfg.depth blocks make(rngs=...) stacked on a leading 'layers' axis (for scan), or a
    plain list (shared by the DiTs of vidit/models)."""
    if not cfg.scan_layers:
        return nnx.List([make(rngs=rngs) for _ in range(cfg.depth)])

    @nnx.split_rngs(splits=cfg.depth)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def stacked(rngs):
        return make(rngs=rngs)

    return stacked(rngs)


def run_blocks(blocks, block_fn, h, cfg):
    """h through every block (block_fn(block, h) -> h), rematerialised by cfg.remat, as a
    Python loop or one lax.scan over the stacked blocks (cfg.scan_layers)."""
    if cfg.remat != "none":
        block_fn = nnx.remat(block_fn, policy=REMAT_POLICIES[cfg.remat],
                             prevent_cse=not cfg.scan_layers)
    if not cfg.scan_layers:
        for block in blocks:
            h = block_fn(block, h)
        return h

    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    def scan_fn(block, h):
        return block_fn(block, h)

    return scan_fn(blocks, h)


class VideoDiT(nnx.Module):
    """The denoiser: (x_t [B,T,H,W,C], t [B], cond dict[, h [B]]) -> prediction [B,T,H,W,C]."""

    def __init__(self, cfg: Any, *, rngs: nnx.Rngs):
        if cfg.cond not in COND_KINDS:
            raise ConfigError(f"config.model.cond='{cfg.cond}' is not one of {COND_KINDS}")
        check_stack(cfg)
        dtype, param_dtype = layers.dtype_of(cfg.dtype), layers.dtype_of(cfg.param_dtype)
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.cfg = cfg
        self.patch = tuple(cfg.patch)
        self.channels = cfg.channels
        patch_dim = math.prod(self.patch) * cfg.channels
        # Image-to-video: the clean first frame and its mask enter as extra channels.
        self.first_frame = bool(cfg.get("first_frame", False))
        in_dim = math.prod(self.patch) * (2 * cfg.channels + 1) if self.first_frame else patch_dim
        self.patch_embed = Dense((in_dim,), (cfg.width,), ("patch", "embed"), **kw)
        time_scale = cfg.time_scale  # older saved configs get 1000 (checkpoint.ADDED_KEYS)
        self.t_embed = layers.TimestepEmbedder(cfg.width, **kw, time_scale=time_scale,
                                               hidden_init_scale=mup.fixed_init_scale(cfg))
        # MeanFlow/shortcut models also see the interval h = t - r; zero output at init, so a
        # flow checkpoint loads into this model and starts as that flow model.
        self.h_embed = (layers.TimestepEmbedder(cfg.width, **kw, zero_init_output=True,
                                                time_scale=time_scale)
                        if cfg.get("interval_input", False) else None)
        if cfg.cond == "class":  # one extra row: the null label for classifier-free guidance
            # Unit-scale rows, like the timestep embedding grows to within a few hundred steps:
            # at DiT's 0.02 the label stays far weaker than t in short runs and samples ignore it.
            self.class_embed = layers.param(rngs, nnx.initializers.normal(1.0),
                                            (cfg.num_classes + 1, cfg.width), ("vocab", "embed"),
                                            param_dtype)
        if cfg.cond == "text":
            # The byte encoder trains with the DiT; a frozen encoder's output arrives in the
            # condition as text_embedding (vidit/text_encoders.py).
            self.text = TextEncoder(cfg, **kw) if _text_kind(cfg) == "byte" else None
            self.text_pool = Dense((cfg.text_width,), (cfg.width,), ("mlp", "embed"), **kw)
        self.blocks = make_blocks(
            functools.partial(DiTBlock, cfg, dtype=dtype, param_dtype=param_dtype), cfg, rngs)
        self.final = FinalLayer(cfg.width, patch_dim, **kw)
        self.disc = _make_discriminator(cfg, rngs) if cfg.get("disc_width", 0) else None
        self.dtype = dtype

    # -- conditioning ---------------------------------------------------------------------------
    def null_cond(self, cond: dict) -> dict:
        """The unconditional input for classifier-free guidance of the conditions this model
        learns itself, shaped like `cond` (a frozen text encoder's empty caption is data:
        vidit/steps.py adds it)."""
        out = {}
        if "label" in cond:
            out["label"] = jnp.full_like(cond["label"], self.cfg.num_classes)
        if "text" in cond:  # BOS followed by padding: the empty caption
            out["text"] = jnp.zeros_like(cond["text"]).at[:, 0].set(1)
        for key in FIRST_FRAME_KEYS:  # guidance is on the label or caption, never the image
            if key in cond:
                out[key] = cond[key]
        return out

    def _with_first_frame(self, x, cond):
        """x [B, T, H, W, C] -> [B, T, H, W, 2C + 1]: x, the given first frame (zeros where
        none is given, and on every later frame) and the mask marking it."""
        b, t = x.shape[:2]
        given = cond.get("first_frame_mask", jnp.zeros((b,), bool))
        mask = ((jnp.arange(t) == 0)[None, :] & given[:, None]).astype(x.dtype)
        mask = jnp.broadcast_to(mask[:, :, None, None, None], x.shape[:4] + (1,))
        frame = cond.get("first_frame", jnp.zeros_like(x)).astype(x.dtype) * mask
        return jnp.concatenate([x, frame, mask], axis=-1)

    def _condition(self, t, cond, h=None):
        c = self.t_embed(t)
        if self.h_embed is not None:  # no h: the instantaneous velocity, u(z, t, t) = v
            c = c + self.h_embed(jnp.zeros_like(t) if h is None else h)
        elif h is not None:
            raise ConfigError("this objective passes an interval h = t - r; set "
                                       "config.model.interval_input=True")
        text = text_mask = None
        if self.cfg.cond == "class":
            c = c + self.class_embed[...][cond["label"]].astype(self.dtype)
        elif self.cfg.cond == "text":
            if "text_embedding" in cond:  # a frozen encoder's output: mean-pooled over the mask
                text, text_mask = cond["text_embedding"].astype(self.dtype), cond["text_mask"]
                w = text_mask.astype(jnp.float32)[..., None]
                pooled = ((cond["text_embedding"].astype(jnp.float32) * w).sum(1)
                          / jnp.maximum(w.sum(1), 1.0)).astype(self.dtype)
            else:
                text, text_mask, pooled = self.text(cond["text"])
            c = c + self.text_pool(pooled)
        return c, text, text_mask

    # -- forward --------------------------------------------------------------------------------
    def __call__(self, x, t, cond: dict | None = None, h=None):
        cond = cond or {}
        x = x.astype(self.dtype)
        tokens, grid = layers.patchify(self._with_first_frame(x, cond) if self.first_frame else x,
                                       self.patch)
        c, text, text_mask = self._condition(t, cond, h)
        h = sharding.constrain(self.patch_embed(tokens), TOKENS)
        rope = layers.rope_angles(grid, self.cfg.width // self.cfg.heads, self.cfg.rope_theta)
        h = self._run_blocks(h, c, rope, text, text_mask)
        out = self.final(h, c)
        return layers.unpatchify(out, grid, self.patch, self.channels).astype(jnp.float32)

    def discriminate(self, x, cond: dict | None = None, *, frozen: bool = False):
        """Real/fake logits [B, T', H', W', 1] of clips x (class-conditional with cond['label']).

        frozen=True reads the discriminator's parameters through stop_gradient: a generator
        loss on these logits trains the DiT only, never the discriminator."""
        if self.disc is None:
            raise ConfigError("an adversarial term needs a discriminator: set "
                                       "config.model.disc_width > 0 (e.g. 32)")
        disc = discriminator.frozen(self.disc) if frozen else self.disc
        return disc(x, (cond or {}).get("label"))

    def _run_blocks(self, h, c, rope, text, text_mask):
        return run_blocks(self.blocks, lambda block, h: block(h, c, rope, text, text_mask), h,
                          self.cfg)


def _make_discriminator(cfg, rngs):
    """The optional patch discriminator (config.model.disc_width > 0), conditional on the class
    label for class-conditional models. Its parameters sit under 'disc' in the DiT's tree (one
    optimizer, one checkpoint); the DiT's forward pass never runs it."""
    disc_cfg = ml_collections.ConfigDict(dict(
        channels=cfg.channels, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        disc=dict(width=cfg.disc_width, num_layers=cfg.get("disc_layers", 3))))
    num_classes = cfg.num_classes if cfg.cond == "class" else 0
    return discriminator.PatchDiscriminator(disc_cfg, rngs, num_classes=num_classes)


def _text_kind(cfg) -> str:
    return cfg.get("text_encoder", {}).get("kind", "byte")


def build(cfg: Any, seed: int = 0) -> VideoDiT:
    return VideoDiT(cfg, rngs=nnx.Rngs(params=seed))
