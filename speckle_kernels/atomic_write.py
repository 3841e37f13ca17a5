"""The one way this package writes a file: a temp file beside the target, then os.replace.

Data caches, checkpoints, reports, figures, benchmark results and denoised images all go
through `atomic_file`, so a crash or a full disk never leaves a half-written file under the
final name, and an existing file is replaced only when the caller allows it.
"""
from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_file(path: str | os.PathLike, *, overwrite: bool = True):
    """Yield a binary file object; on a clean exit its bytes replace `path` in one step.

    overwrite=False raises FileExistsError (naming the path) when `path` exists, before
    anything is written. On any exception the temp file is removed and `path` is untouched.
    """
    path = Path(path)
    if not overwrite and path.exists():
        raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    # open(..., "x") rather than mkstemp: the file gets the umask's permissions, not 0600
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, overwrite: bool = True) -> None:
    with atomic_file(path, overwrite=overwrite) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str, *, overwrite: bool = True) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), overwrite=overwrite)
