"""Parameter and FLOP counts of the video DiT, from its config alone.

FLOPs here are floating-point operations (one multiply-accumulate = 2 FLOPs), not the
multiply-accumulates the DiT paper calls "Gflops". Training FLOPs = 3 x forward (backward costs
two forwards); rematerialisation is hardware work, not model work, and is not counted.
"""
from __future__ import annotations

import math
from typing import Any


def tokens(model: Any, frames: int, height: int, width: int) -> int:
    pt, ph, pw = model.patch
    return (frames // pt) * (height // ph) * (width // pw)


def forward_flops(model: Any, frames: int, height: int, width: int) -> dict:
    """Forward FLOPs for ONE sample, split into matmul (weights) and attention (QK^T, AV)."""
    if model.get("kind", "dit") == "wan":
        return wan_forward_flops(model, frames, height, width)
    w, depth = model.width, model.depth
    hidden = int(w * model.mlp_ratio)
    n = tokens(model, frames, height, width)
    patch_dim = math.prod(model.patch) * model.channels

    per_token_block = 4 * w * w + 2 * w * hidden  # qkv + out, mlp
    per_sample_block = 6 * w * w  # adaLN modulation from c
    attention = 4 * n * n * w  # 2 n^2 w for q k^T, 2 n^2 w for weights @ v
    text = cross = 0
    if model.cond == "text":
        tw, lt = model.text_width, model.text_len
        # cross-attention per block: q and out projections, k and v from the text tokens,
        # and the attention itself
        cross = depth * 2 * (n * 2 * w * w + 2 * tw * w * lt + 2 * n * lt * w)
        text = 2 * tw * w  # the pooled projection
        if model.get("text_encoder", {}).get("kind", "byte") == "byte":  # trained with the DiT
            text += 2 * lt * model.text_depth * (12 * tw * tw) + model.text_depth * 4 * lt * lt * tw
    matmul = 2 * depth * (n * per_token_block + per_sample_block)
    matmul += 2 * n * patch_dim * w * 2  # patch embed in, final projection out
    matmul += 2 * (256 * w + w * w + 2 * w * w)  # timestep MLP, final adaLN
    attention *= depth
    return {"tokens": n, "matmul": matmul + text + cross, "attention": attention,
            "text": text + cross, "total": matmul + text + cross + attention}


def train_flops_per_step(model: Any, data: Any) -> float:
    """Model FLOPs of one optimizer step over the global batch."""
    f = forward_flops(model, data.num_frames, data.height, data.width)["total"]
    return 3.0 * f * data.batch_size


def count_params(model: Any) -> int:
    """Parameter count from the config (checked against the real model in the tests)."""
    if model.get("kind", "dit") == "wan":
        return wan_params(model)
    w, depth = model.width, model.depth
    hidden = int(w * model.mlp_ratio)
    head_dim = w // model.heads
    patch_dim = math.prod(model.patch) * model.channels
    block = (w * 3 * w + 3 * w) + (w * w + w) + 2 * head_dim  # attention + qk norms
    block += (w * hidden + hidden) + (hidden * w + w)  # mlp
    block += w * 6 * w + 6 * w  # adaLN
    total = depth * block
    total += patch_dim * w + w  # patch embed
    total += 256 * w + w + w * w + w  # timestep MLP
    total += w * 2 * w + 2 * w + w * patch_dim + patch_dim  # final layer
    if model.cond == "class":
        total += (model.num_classes + 1) * w
    if model.cond == "text":
        tw, lt = model.text_width, model.text_len
        cross = (w * w + w) + (tw * 2 * w + 2 * w) + (w * w + w) + 2 * head_dim
        total += depth * cross + tw * w + w  # cross-attention, pooled projection
        if model.get("text_encoder", {}).get("kind", "byte") == "byte":  # the trained encoder
            text_block = ((tw * 3 * tw + 3 * tw) + (tw * tw + tw) + (tw * 4 * tw + 4 * tw)
                          + (4 * tw * tw + tw))
            total += 258 * tw + lt * tw + model.text_depth * text_block
    return total


def wan_forward_flops(model: Any, frames: int, height: int, width: int) -> dict:
    """Forward FLOPs of one sample of Wan 2.1's DiT (vidit/models/wan.py), its text_len
    caption tokens included."""
    w, depth, f = model.width, model.depth, model.ffn_dim
    n, lt, tw = tokens(model, frames, height, width), model.text_len, model.text_width
    patch_dim = math.prod(model.patch) * model.channels
    per_block = (2 * n * 4 * w * w + 2 * n * 2 * w * f  # self-attention projections, MLP
                 + 2 * n * 2 * w * w + 2 * lt * 2 * w * w)  # cross q/out, cross k/v
    attention = depth * (4 * n * n * w + 4 * n * lt * w)
    top = (2 * n * patch_dim * w * 2  # patch embedding, output projection
           + 2 * (model.freq_dim * w + w * w + 6 * w * w)  # time MLP, shared modulation
           + 2 * lt * (tw * w + w * w))  # the text MLP
    text = depth * (2 * lt * 2 * w * w + 4 * n * lt * w) + 2 * lt * (tw * w + w * w)
    matmul = depth * per_block + top
    return {"tokens": n, "matmul": matmul, "attention": attention, "text": text,
            "total": matmul + attention}


def wan_params(model: Any) -> int:
    w, depth, f, tw = model.width, model.depth, model.ffn_dim, model.text_width
    patch_dim = math.prod(model.patch) * model.channels
    attention = 4 * (w * w + w) + 2 * w  # q, k, v, out and the two across-head norm scales
    block = 2 * attention + (w * f + f) + (f * w + w) + 6 * w  # + MLP + modulation offsets
    block += 2 * w if model.cross_attn_norm else 0
    total = depth * block
    total += patch_dim * w + w + w * patch_dim + patch_dim + 2 * w  # patch in, out, out offsets
    total += model.freq_dim * w + w + w * w + w + w * 6 * w + 6 * w  # time MLP, modulation
    total += tw * w + w + w * w + w  # text MLP
    return total


def conv_flops(fn, *args) -> float:
    """FLOPs of the convolutions in fn(*args), read off its jaxpr (tracing only, no compile):
    2 * output elements * kernel volume * input channels per conv (the VAE is all convs)."""
    import jax

    def walk(jaxpr) -> float:
        total = 0.0
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "conv_general_dilated":
                out = eqn.outvars[0].aval.shape
                kernel = eqn.invars[1].aval.shape  # DHWIO: kt, kh, kw, cin, cout
                total += 2.0 * math.prod(out) * math.prod(kernel[:-1])
            for value in eqn.params.values():
                sub = getattr(value, "jaxpr", value)
                if hasattr(sub, "eqns"):
                    total += walk(sub)
        return total

    return walk(jax.make_jaxpr(fn)(*args).jaxpr)


def train_cost(config: Any, input_shape: tuple[int, int, int, int],
               batch: int | None = None) -> tuple[float, int]:
    """(model FLOPs of one optimizer step over the global batch, tokens per step) for a run's
    config; input_shape is one model input (frames, height, width, channels): the pixel clip,
    or a latent DiT's latent; batch defaults to config.data.batch_size (a bucket has its own).
    A VAE's 'tokens' are its latent positions."""
    b = int(config.data.batch_size if batch is None else batch)
    if config.model.get("kind", "dit") == "vae":
        import jax
        import jax.numpy as jnp
        from flax import nnx
        from vidit.models import vae
        cfg = vae.vae_model_config(config.model)
        model = nnx.eval_shape(lambda: vae.VideoVAE(cfg, nnx.Rngs(0)))
        x = jax.ShapeDtypeStruct((1,) + tuple(input_shape), jnp.float32)
        forward = conv_flops(lambda m, v: m(v), model, x)
        t, h, w, _ = model.latent_shape(x.shape)[1:]
        return 3.0 * forward * b, t * h * w * b
    f, h, w, _ = input_shape
    fwd = forward_flops(config.model, f, h, w)
    return 3.0 * fwd["total"] * b, fwd["tokens"] * b
