"""The one way this package writes a file: a temp file beside the target, then one rename.

Data caches, checkpoints, reports, figures, exported networks, benchmark results and denoised
images all go through `atomic_path` (for writers that want a file name) or `atomic_file` (for
writers that take a file object), so a crash or a full disk never leaves a half-written file
under the final name, and an existing file is replaced only when the caller allows it.
"""
from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike, *, overwrite: bool = True):
    """Yield a temp path beside `path` (same suffix, so format-sniffing writers agree); on a
    clean exit its bytes are synced and moved to `path` in one step.

    overwrite=False raises FileExistsError (naming the path) when `path` exists, before anything
    is written, and publishes with os.link, which fails if `path` appeared meanwhile: no
    overwrite even in a race. On any exception the temp file is removed and `path` is untouched.
    """
    path = Path(path)
    if not overwrite and path.exists():
        raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    # a name of our own rather than mkstemp: the file gets the umask's permissions, not 0600
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{secrets.token_hex(4)}.tmp{path.suffix}")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_file(path: str | os.PathLike, *, overwrite: bool = True):
    """Yield a binary file object whose bytes replace `path` on a clean exit (atomic_path)."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        with open(tmp, "xb") as f:
            yield f


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, overwrite: bool = True) -> None:
    with atomic_file(path, overwrite=overwrite) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str, *, overwrite: bool = True) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), overwrite=overwrite)
