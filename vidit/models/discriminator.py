"""The 3D patch discriminator and its hinge losses: the optional GAN term of the VAE objective
(diffusion/autoencoding.py) and of MeanFlow's one-step samples (diffusion/meanflow.py).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from vidit.models import conv as conv_lib
from vidit.models import layers


class PatchDiscriminator(nnx.Module):
    """3D patch-GAN: strided 3D convs ('same' padding, non-causal: the discriminator sees the
    whole clip) to a map of real/fake logits [B, T', H', W', 1]. Reads cfg.channels and
    cfg.disc.width / cfg.disc.num_layers. (CausalConv3d is used only to hold the parameters.)

    With ``num_classes`` > 0 it is class-conditional by projection (Miyato & Koyama 2018): each
    location's logit gains <embed(label), features>, with one extra row for the null label of
    classifier-free guidance, so it judges "a real clip of this class", not only "a real clip"."""

    def __init__(self, cfg: Any, rngs: nnx.Rngs | None = None, *, seed: int = 0,
                 num_classes: int = 0):
        rngs = rngs if rngs is not None else nnx.Rngs(params=seed)
        dtype, param_dtype = layers.dtype_of(cfg.dtype), layers.dtype_of(cfg.param_dtype)
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        width, n = cfg.disc.width, cfg.disc.num_layers
        convs, norms = [conv_lib.CausalConv3d(cfg.channels, width, (3, 4, 4), **kw)], []
        ch = width
        for i in range(1, n):
            out = width * min(2 ** i, 8)
            convs.append(conv_lib.CausalConv3d(ch, out, (3, 4, 4), **kw))
            norms.append(conv_lib.Norm(out, "group", min(32, out), rngs=rngs,
                                       param_dtype=param_dtype))
            ch = out
        self.convs = nnx.List(convs)
        self.norms = nnx.List(norms)
        self.head = conv_lib.CausalConv3d(ch, 1, (3, 3, 3), **kw)
        # Zero rows: a fresh conditional discriminator starts as the unconditional one.
        self.class_embed = (layers.param(rngs, nnx.initializers.zeros, (num_classes + 1, ch),
                                         ("vocab", "mlp"), param_dtype)
                            if num_classes else None)
        self.dtype = dtype

    @staticmethod
    def _apply(layer, x, stride):
        kt, kh, kw = layer.kernel_size
        pad = tuple(conv_lib.pad_same(n, k, s)
                    for n, k, s in zip(x.shape[1:4], (kt, kh, kw), stride))
        y = conv_lib.conv3d(x, layer.kernel[...], stride, pad, layer.dtype)
        return y + layer.bias[...].astype(layer.dtype)

    def __call__(self, x, label=None):
        h = jax.nn.leaky_relu(self._apply(self.convs[0], x.astype(self.dtype), (1, 2, 2)), 0.2)
        for conv, norm in zip(self.convs[1:], self.norms):
            h = jax.nn.leaky_relu(norm(self._apply(conv, h, (2, 2, 2))), 0.2)
        logits = self._apply(self.head, h, (1, 1, 1)).astype(jnp.float32)
        if self.class_embed is None or label is None:
            return logits
        # A one-hot matmul, not a gather: a partitioned gather of batch-sharded labels sliced
        # from a larger batch (MeanFlow's endpoint rows) sent one row's gradient to row 0 too
        # on an 8-device CPU mesh (tests/test_train.py); the tiny matmul is exact.
        table = self.class_embed[...].astype(jnp.float32)
        e = jax.nn.one_hot(label, table.shape[0], dtype=jnp.float32) @ table  # [B, ch]
        proj = jnp.einsum("bthwc,bc->bthw", h.astype(jnp.float32), e)[..., None]
        return logits + proj


def frozen(module: nnx.Module) -> nnx.Module:
    """A copy of `module` that reads its state through stop_gradient: a loss on its output
    trains what feeds it, never the module (a generator's term on a discriminator)."""
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, jax.lax.stop_gradient(state))


def d_hinge_loss(real_logits, fake_logits):
    """Discriminator hinge loss: mean relu(1 - D(real)) + mean relu(1 + D(fake))."""
    return (jnp.mean(jax.nn.relu(1.0 - real_logits.astype(jnp.float32)))
            + jnp.mean(jax.nn.relu(1.0 + fake_logits.astype(jnp.float32))))


def g_hinge_loss(fake_logits):
    """Generator hinge loss: -mean D(fake)."""
    return -jnp.mean(fake_logits.astype(jnp.float32))
