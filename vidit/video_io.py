"""Writing videos: [-1, 1] float clips -> a tiled grid -> GIF (Pillow) or MP4 (PyAV via imageio),
to a local path or a bucket (encoded in memory, then written whole)."""
from __future__ import annotations

import io
import math
import os

import numpy as np

from vidit import storage


def to_uint8(x) -> np.ndarray:
    return np.clip(np.round((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def tile(videos: np.ndarray, cols: int | None = None, pad: int = 2) -> np.ndarray:
    """[N, T, H, W, C] -> [T, rows*(H+pad)+pad, cols*(W+pad)+pad, C] with grey separators."""
    n, t, h, w, c = videos.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    out = np.full((t, rows * (h + pad) + pad, cols * (w + pad) + pad, c), 64, videos.dtype)
    for i in range(n):
        r, q = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        out[:, y:y + h, x:x + w] = videos[i]
    return out


def upscale(frames: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upscaling so small clips are visible in a viewer."""
    return frames.repeat(factor, axis=1).repeat(factor, axis=2) if factor > 1 else frames


def write_video(path, frames: np.ndarray, fps: int = 8) -> str:
    """Writes uint8 frames [T, H, W, C] (C = 1 or 3) to .gif or .mp4 (local or gs://)."""
    import imageio.v3 as iio

    ext = os.path.splitext(os.fspath(path))[1].lower()
    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, axis=-1)
    buf = io.BytesIO()  # the MP4 muxer needs a seekable file: encode in memory
    if ext == ".gif":
        iio.imwrite(buf, frames, extension=".gif", duration=1000 / fps, loop=0)
    elif ext == ".mp4":
        # H.264 wants even sizes; pad by one pixel where needed.
        h, w = frames.shape[1:3]
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
        iio.imwrite(buf, frames, extension=".mp4", plugin="pyav", codec="libx264", fps=fps)
    else:
        raise ValueError(f"unsupported video extension '{ext}' in {path}: use .gif or .mp4")
    storage.write_atomic(path, buf.getvalue())
    return os.fspath(path)


def write_grid(path, videos, fps: int = 8, scale: int = 4) -> str:
    """Float videos [N, T, H, W, C] in [-1, 1] -> one tiled, upscaled video file."""
    return write_video(path, upscale(tile(to_uint8(videos)), scale), fps)
