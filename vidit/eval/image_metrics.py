"""Image quality metrics of reconstructions: PSNR and SSIM of videos (or images) in [-1, 1]."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def psnr(a, b, data_range: float = 2.0):
    """Peak signal-to-noise ratio in dB of [B, ...] videos in [-1, 1] (range 2), per sample over
    all its frames/pixels/channels, averaged over the batch. Identical samples give inf."""
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    mse = jnp.mean(jnp.square(a - b).reshape(a.shape[0], -1), axis=1)
    return jnp.mean(10.0 * jnp.log10(data_range ** 2 / mse))


def _gaussian_window(size: int, sigma: float):
    x = jnp.arange(size, dtype=jnp.float32) - (size - 1) / 2
    g = jnp.exp(-0.5 * jnp.square(x / sigma))
    return g / jnp.sum(g)


def _filter_valid(x, g, axis):
    """Valid-mode 1D correlation of x with window g along `axis`."""
    n = x.shape[axis] - g.shape[0] + 1
    return sum(g[i] * jax.lax.slice_in_dim(x, i, i + n, axis=axis) for i in range(g.shape[0]))


def ssim(a, b, data_range: float = 2.0, window: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03):
    """Mean SSIM (Wang et al. 2004) of videos [B, T, H, W, C] in [-1, 1]: an 11x11 Gaussian window
    (sigma 1.5, valid filtering, shrunk to the frame for frames under 11 pixels) per frame and
    channel, averaged over pixels, channels, frames and the batch. [B, H, W, C] images also work."""
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    if a.ndim == 4:
        a, b = a[:, None], b[:, None]
    h, w = a.shape[2], a.shape[3]
    size = min(window, h, w)
    size -= 1 - size % 2  # odd
    g = _gaussian_window(size, sigma)

    def blur(x):
        return _filter_valid(_filter_valid(x, g, 2), g, 3)

    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return jnp.mean(s)
