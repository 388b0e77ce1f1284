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
    w, depth = model.width, model.depth
    hidden = int(w * model.mlp_ratio)
    n = tokens(model, frames, height, width)
    patch_dim = math.prod(model.patch) * model.channels

    per_token_block = 4 * w * w + 2 * w * hidden  # qkv + out, mlp
    per_sample_block = 6 * w * w  # adaLN modulation from c
    attention = 4 * n * n * w  # 2 n^2 w for q k^T, 2 n^2 w for weights @ v
    text = 0
    if model.cond == "text":
        tw, lt = model.text_width, model.text_len
        per_token_block += 2 * w * w  # cross-attention q and out projections
        per_sample_block += 2 * tw * w * lt  # cross-attention k, v from text tokens
        attention += 4 * n * lt * w
        text = 2 * lt * model.text_depth * (12 * tw * tw) + 2 * tw * w  # encoder + pooled proj
        text += model.text_depth * 4 * lt * lt * tw
    matmul = 2 * depth * (n * per_token_block + per_sample_block)
    matmul += 2 * n * patch_dim * w * 2  # patch embed in, final projection out
    matmul += 2 * (256 * w + w * w + 2 * w * w)  # timestep MLP, final adaLN
    attention *= depth
    return {"tokens": n, "matmul": matmul + text, "attention": attention,
            "total": matmul + text + attention}


def train_flops_per_step(model: Any, data: Any) -> float:
    """Model FLOPs of one optimizer step over the global batch."""
    f = forward_flops(model, data.num_frames, data.height, data.width)["total"]
    return 3.0 * f * data.batch_size


def count_params(model: Any) -> int:
    """Parameter count from the config (checked against the real model in the tests)."""
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
        total += depth * cross
        text_block = (tw * 3 * tw + 3 * tw) + (tw * tw + tw) + (tw * 4 * tw + 4 * tw) + (4 * tw * tw + tw)
        total += 258 * tw + lt * tw + model.text_depth * text_block + tw * w + w
    return total
