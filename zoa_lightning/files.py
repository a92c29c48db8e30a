"""Writing files whole: the one atomic writer of the project, and the checksum its caches keep beside their files.

:func:`atomic_write` writes to a temporary file in the target's folder and renames it over the target, so a reader
(another process, a resumed run) sees either the old file or the new one, never half of one, and concurrent writers
of the same file cannot damage it (the last rename wins). Results, plots, the stream and quantization caches and the
demo weights all go through it. Pure Python, no torch.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

__all__ = ["atomic_write", "sha256_of"]

_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)


def atomic_write(path: str | os.PathLike[str], data: bytes | str, *, mode: int | None = None) -> Path:
    """Write ``data`` to ``path`` whole: through a temporary file in the same folder, flushed to disk, then renamed.

    The temporary file ``.<name>.<pid>.<random>.tmp`` is unique per process and call, and is removed if anything
    fails (also on ``KeyboardInterrupt``); ``path`` is then left as it was. The new file gets the permissions of an
    ordinary new file, ``0o666`` less the process's umask (e.g. ``0o644`` under the usual umask ``0o022``), unless
    ``mode`` says otherwise; an existing file's permissions are not kept.

    Args:
        path: the file to write; its folder must exist.
        data: the content; a ``str`` is written as UTF-8, exactly as given (no newline translation).
        mode: permission bits for the new file (e.g. ``0o644``), applied regardless of the umask; ``None`` for what
            the umask gives.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        OSError: if the folder is missing or not writable, or the disk is full (the temporary file is removed).

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> atomic_write(folder / "a.txt", "hello").read_text()
        'hello'
    """
    target = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    while True:
        tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            # os.open with 0o666 lets the kernel apply the umask, as for any new file (tempfile.mkstemp would give
            # 0o600 whatever the umask).
            handle = os.open(tmp, _OPEN_FLAGS, 0o666)
        except FileExistsError:  # pragma: no cover - a 32-bit random name taken by this very process
            continue
        break
    try:
        with os.fdopen(handle, "wb") as file:
            if mode is not None:
                os.chmod(tmp, mode)
            file.write(payload)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def sha256_of(data: bytes | bytearray | memoryview) -> str:
    """Return the hexadecimal SHA-256 of ``data`` (any C-contiguous buffer: bytes, a ``memoryview``, a numpy array).

    Example:
        >>> sha256_of(b"")[:16]
        'e3b0c44298fc1c14'
    """
    return hashlib.sha256(data).hexdigest()
