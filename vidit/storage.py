"""Files on a local disk or in a cloud bucket (gs://...), through one path type.

Every file vidit reads or writes goes through `etils.epath` (what Orbax and TFDS use), whose
gs:// backend is gcsfs: `--workdir gs://bucket/run` works as a local folder does. A bucket has
no folders and no appends, so the few operations that differ are here:

- `path` turns a user's string into an epath.Path (`~` expanded, local paths made absolute).
- `append_text` / `append_line` append to a small text file (a rewrite on a bucket).
- `write_atomic` writes a file whole, so a reader never sees half of it (a local rename; an
  object upload is already all-or-nothing).
- `local_copy` gives a local file for libraries that read only local files (safetensors'
  bfloat16 loader); `staged` gives a local folder for writers that write only local files
  (TFDS/ArrayRecord) and uploads it when they are done.

Caches (the XLA cache, the frame classifier) stay on the local disk.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator

from etils import epath


def is_local(p) -> bool:
    return "://" not in os.fspath(p)


def path(p) -> epath.Path:
    """A user's path (str or Path) as an epath.Path; local ones expanded and absolute."""
    p = os.fspath(p)
    return epath.Path(os.path.abspath(os.path.expanduser(p)) if is_local(p) else p)


def append_text(file, text: str) -> None:
    """Appends to a small text file (read and rewritten on a bucket, which cannot append)."""
    file = path(file)
    if is_local(file):
        file.parent.mkdir(parents=True, exist_ok=True)
        with file.open("a") as f:
            f.write(text)
        return
    old = file.read_text() if file.exists() else ""
    file.write_text(old + text)


def append_line(file, line: str) -> None:
    append_text(file, line + "\n")


def write_atomic(file, data: bytes | str) -> None:
    """Writes `file` whole: a reader sees the old file or the new one, never part of it."""
    file = path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    data = data.encode() if isinstance(data, str) else data
    if not is_local(file):
        file.write_bytes(data)  # an object upload is all-or-nothing
        return
    tmp = file.parent / f".{file.name}.tmp{os.getpid()}"
    tmp.write_bytes(data)
    os.replace(tmp, file)


@contextlib.contextmanager
def local_copy(file) -> Iterator[str]:
    """A local path holding `file`'s bytes (the file itself when it is local)."""
    file = path(file)
    if is_local(file):
        yield os.fspath(file)
        return
    with tempfile.TemporaryDirectory(prefix="vidit_") as tmp:
        local = os.path.join(tmp, file.name)
        with open(local, "wb") as f:
            f.write(file.read_bytes())
        yield local


def upload_tree(local_dir: str, dest) -> None:
    """Copies a local folder's files under `dest` (a bucket or a local folder)."""
    dest = path(dest)
    for root, _, files in os.walk(local_dir):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), local_dir)
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(os.path.join(root, name), "rb") as f:
                target.write_bytes(f.read())


@contextlib.contextmanager
def staged(dest) -> Iterator[str]:
    """A local folder to write into for libraries that write only local files (TFDS's
    ArrayRecord writer): `dest` itself when it is local, else a temporary folder whose files
    are uploaded under `dest` when the block ends without an error."""
    dest = path(dest)
    if is_local(dest):
        os.makedirs(dest, exist_ok=True)
        yield os.fspath(dest)
        return
    tmp = tempfile.mkdtemp(prefix="vidit_stage_")
    try:
        yield tmp
        upload_tree(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
