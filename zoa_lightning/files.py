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

__all__ = [
    "DamagedFileError",
    "atomic_write",
    "checksum_path",
    "publish_verified",
    "read_verified",
    "sha256_of",
    "verify_file",
    "write_verified",
]

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


class DamagedFileError(ValueError):
    """A file whose content does not match the checksum written beside it (or that has no checksum to check)."""


def checksum_path(path: str | os.PathLike[str]) -> Path:
    """The checksum file kept beside ``path``: the same name with ``.sha256`` appended."""
    target = Path(path)
    return target.with_name(target.name + ".sha256")


def write_verified(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` atomically and its SHA-256 beside it (:func:`checksum_path`), for :func:`read_verified`.

    A crash between the two writes leaves a file and a checksum that disagree: the next :func:`read_verified` says
    so instead of trusting either.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> read_verified(write_verified(folder / "a.bin", b"data"))
        b'data'
    """
    target = atomic_write(path, data)
    atomic_write(checksum_path(target), sha256_of(data) + "\n")
    return target


def read_verified(path: str | os.PathLike[str]) -> bytes:
    """Read a file written by :func:`write_verified`, checking its content against the checksum beside it.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        DamagedFileError: if the checksum file is missing or unreadable, or the content does not match it (the
            message names the file).
    """
    target = Path(path)
    data = target.read_bytes()
    _check(target, sha256_of(data))
    return data


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def publish_verified(written: str | os.PathLike[str], path: str | os.PathLike[str]) -> Path:
    """Move a file another writer produced (``written``, in ``path``'s folder) to ``path``, with its checksum beside it.

    For files written by code that cannot write into memory first (e.g. Lightning's ``save_checkpoint``): the content
    is hashed in blocks, the file renamed over ``path`` (atomic), then the checksum written (:func:`checksum_path`).
    """
    source, target = Path(written), Path(path)
    digest = _file_sha256(source)
    os.replace(source, target)
    atomic_write(checksum_path(target), digest + "\n")
    return target


def verify_file(path: str | os.PathLike[str]) -> Path:
    """Check a file against the checksum beside it (block by block, for large files); returns ``path``.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        DamagedFileError: if the checksum file is missing or unreadable, or the content does not match it.
    """
    target = Path(path)
    if not target.is_file():
        raise FileNotFoundError(f"no such file: {target}")
    _check(target, _file_sha256(target))
    return target


def _check(target: Path, digest: str) -> None:
    """Raise :class:`DamagedFileError` unless ``digest`` is the checksum written beside ``target``."""
    sidecar = checksum_path(target)
    try:
        expected = sidecar.read_text().strip()
    except (OSError, UnicodeDecodeError) as error:
        raise DamagedFileError(f"{target} has no readable checksum file {sidecar.name} ({error})") from error
    if digest != expected:
        raise DamagedFileError(f"{target} does not match its checksum ({sidecar.name}): the file is damaged")
